"""Physical removal of the internal channels of residual CNN blocks (ResNet basic/bottleneck style).

A block with ``conv1 -> bn1 -> act -> conv2 [-> bn2 -> act -> conv3]`` has internal channels that
no other module sees: output channel c of ``conv{i}`` feeds only ``bn{i}[c]`` and input channel c of
``conv{i+1}``. Removing it is exact (the remaining channels compute what they computed before) and
leaves the block's input/output width, and so the residual connections, untouched. The last conv of
a block is coupled to the shortcut and is not pruned here.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.pruning.importance import finish_scores, random_scores, raw_axis_scores
from edgeprep.pruning.surgery import fill_like

CHANNELS_KIND = "conv_channels"


def conv_pairs(block: nn.Module) -> list[tuple[str, str, str]]:
    """(producer conv, its norm, consumer conv) attribute names along ``conv1, bn1, conv2, ...``."""
    pairs = []
    i = 1
    while True:
        prod, norm, cons = (getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None),
                            getattr(block, f"conv{i + 1}", None))
        if not (isinstance(prod, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and isinstance(cons, nn.Conv2d)):
            return pairs
        if prod.groups != 1 or cons.groups != 1:  # depthwise/grouped convs couple channels: not handled
            return pairs
        pairs.append((f"conv{i}", f"bn{i}", f"conv{i + 1}"))
        i += 1


def is_conv_block(module: nn.Module) -> bool:
    return bool(conv_pairs(module))


def _parts(model: nn.Module, block: str, names: Sequence[str], where: str) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.Conv2d]:
    try:
        mod = model.get_submodule(block) if block else model
    except AttributeError:
        raise BadInputError(f"{where}: no module {block!r} in {type(model).__name__}") from None
    prod, norm, cons = (getattr(mod, n, None) for n in names)
    if not (isinstance(prod, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and isinstance(cons, nn.Conv2d)):
        raise BadInputError(f"{where}: {block!r} has no {names[0]} -> {names[1]} -> {names[2]} "
                            "(Conv2d, BatchNorm2d, Conv2d) chain")
    return prod, norm, cons


def _sliced_conv(old: nn.Conv2d, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> nn.Conv2d:
    w = old.weight.detach()
    b = old.bias.detach() if old.bias is not None else None
    if out_idx is not None:
        w = w.index_select(0, out_idx)
        b = b.index_select(0, out_idx) if b is not None else None
    if in_idx is not None:
        w = w.index_select(1, in_idx)
    new = nn.Conv2d(w.shape[1], w.shape[0], old.kernel_size, stride=old.stride, padding=old.padding,
                    dilation=old.dilation, groups=1, bias=b is not None, padding_mode=old.padding_mode,
                    device=w.device, dtype=w.dtype)
    return fill_like(new, old, w, b)


def _sliced_bn(old: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx), eps=old.eps, momentum=old.momentum, affine=old.affine,
                         track_running_stats=old.track_running_stats,
                         device=(old.weight.device if old.weight is not None else None))
    with torch.no_grad():
        if old.affine:
            new.weight.copy_(old.weight.detach()[idx])
            new.bias.copy_(old.bias.detach()[idx])
            new.weight.requires_grad_(old.weight.requires_grad)
            new.bias.requires_grad_(old.bias.requires_grad)
        if old.track_running_stats:
            new.running_mean.copy_(old.running_mean[idx])
            new.running_var.copy_(old.running_var[idx])
            new.num_batches_tracked.copy_(old.num_batches_tracked)
    new.train(old.training)
    return new


def prune_conv_channels(model: nn.Module, block: str, keep: Sequence[int], producer: str = "conv1",
                        norm: str = "bn1", consumer: str = "conv2") -> dict[str, Any]:
    """Keep only channels ``keep`` between ``block.producer`` and ``block.consumer``; returns the decision."""
    where = f"prune_conv_channels({block!r}, {producer})"
    prod, bn, cons = _parts(model, block, (producer, norm, consumer), where)
    try:
        idx_list = sorted({int(i) for i in keep})
    except (TypeError, ValueError):
        raise BadInputError(f"{where}: keep must be a list of integers, got {keep!r}") from None
    if not idx_list or len(idx_list) != len(list(keep)) or idx_list[0] < 0 or idx_list[-1] >= prod.out_channels:
        raise BadInputError(f"{where}: keep must be distinct channel indices in [0, {prod.out_channels}), at least one")
    idx = torch.tensor(idx_list, dtype=torch.long, device=prod.weight.device)
    mod = model.get_submodule(block) if block else model
    setattr(mod, producer, _sliced_conv(prod, out_idx=idx))
    setattr(mod, norm, _sliced_bn(bn, idx))
    setattr(mod, consumer, _sliced_conv(cons, in_idx=idx))
    return {"kind": CHANNELS_KIND, "block": block, "producer": producer, "norm": norm, "consumer": consumer,
            "keep": idx_list}


def apply_channels_decision(model: nn.Module, decision: dict[str, Any]) -> nn.Module:
    try:
        prune_conv_channels(model, decision["block"], decision["keep"], decision.get("producer", "conv1"),
                            decision.get("norm", "bn1"), decision.get("consumer", "conv2"))
    except (KeyError, TypeError):
        raise BadInputError(f"conv_channels decision {decision!r} needs 'block' and 'keep'") from None
    return model


def channel_scores(model: nn.Module, block: str, names: Sequence[str], method: str, seed: int = 0) -> torch.Tensor:
    """[channels] scores: the producer's filter (+bias), the norm's affine entries, the consumer's input slice."""
    prod, bn, cons = _parts(model, block, names, "channel_scores")
    if method == "random":
        return random_scores(prod.out_channels, seed)
    total = raw_axis_scores(prod.weight, 0, method, f"{block}.{names[0]}")
    if prod.bias is not None:
        total = total + raw_axis_scores(prod.bias, 0, method, f"{block}.{names[0]}.bias")
    if bn.affine:
        total = total + raw_axis_scores(bn.weight, 0, method, f"{block}.{names[1]}") \
            + raw_axis_scores(bn.bias, 0, method, f"{block}.{names[1]}.bias")
    total = total + raw_axis_scores(cons.weight, 1, method, f"{block}.{names[2]}")
    return finish_scores(total, method)


def channel_param_count(model: nn.Module, block: str, names: Sequence[str]) -> int:
    prod, bn, cons = _parts(model, block, names, "channel_param_count")
    k_prod = prod.weight[0].numel() + (1 if prod.bias is not None else 0)
    return k_prod + (2 if bn.affine else 0) + cons.weight.shape[0] * cons.weight[0, 0].numel()


def channel_macs(model: nn.Module, block: str, names: Sequence[str], positions: tuple[int, int]) -> int:
    """MACs per sample one channel costs: producer output positions x its filter, consumer likewise.

    ``positions`` = (producer output pixels, consumer output pixels), recorded by a probe forward.
    """
    prod, _bn, cons = _parts(model, block, names, "channel_macs")
    return positions[0] * prod.weight[0].numel() + positions[1] * cons.weight.shape[0] * cons.weight[0, 0].numel()


def block_io(block: nn.Module, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-importance pair for a residual CNN block: (shortcut branch, output), channels last.

    The block computes out = act(F(x) + shortcut(x)); comparing out with shortcut(x) measures how much
    the block changes the stream even when it changes the width or resolution (downsampling blocks).
    """
    x = args[0] if args else next(iter(kwargs.values()))
    short = getattr(block, "downsample", None) or getattr(block, "shortcut", None)
    ref = short(x) if isinstance(short, nn.Module) else x
    if ref.shape != output.shape:
        raise BadInputError(f"layer importance: block {type(block).__name__} maps {tuple(x.shape)} to "
                            f"{tuple(output.shape)} without a shortcut module to compare against")
    return ref.movedim(1, -1), output.movedim(1, -1)
