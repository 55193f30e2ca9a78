"""How much each prunable unit (head, neuron) and each block matters.

Unit scores (higher = more important, pruned last):
- ``taylor``: first-order Taylor estimate of the loss change when a group is removed,
  sum |w * dL/dw| over the group's weights. Gradients must already be accumulated on the model
  (the caller runs the calibration batches' backward passes; accumulating over several batches
  before scoring is what the paper does, and it is cheaper than scoring per batch).
- ``magnitude``: L2 norm of the group's weights (no data needed).
- ``random``: seeded uniform noise, the baseline of "The Unreasonable Effectiveness of Random Pruning".

Layer importance follows Adapt-Pruner: a block whose output is nearly parallel to its input
changes the residual stream little, so I_l = -mean_tokens cos(input_l, output_l) is low for it
and the allocation gives it more sparsity.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeprep.errors import BadInputError

METHODS = ("taylor", "magnitude", "random")


def _elementwise(p: torch.Tensor, method: str, where: str) -> torch.Tensor:
    """Per-weight contribution; summed over a group it gives that group's score (before sqrt)."""
    w = p.detach()
    if method == "taylor":
        if p.grad is None:
            raise BadInputError(f"{where}: no gradient for taylor importance; run loss.backward() on "
                                "calibration batches first (or use importance: magnitude)")
        return (w * p.grad.detach()).abs().double()
    if method == "magnitude":
        return w.double().square()
    raise BadInputError(f"importance method {method!r} is not one of {', '.join(METHODS)}")


def _finish(total: torch.Tensor, method: str) -> torch.Tensor:
    return total.sqrt() if method == "magnitude" else total


def _random(n: int, seed: int) -> torch.Tensor:
    # A private generator: scoring must not disturb (or depend on) the global RNG state.
    return torch.rand(n, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)


def linear_unit_scores(linear: nn.Linear, axis: str = "out", method: str = "taylor", seed: int = 0) -> torch.Tensor:
    """One score per output row (weight row + bias entry) or per input column of ``linear``."""
    if axis not in ("out", "in"):
        raise ValueError(f"axis must be 'out' or 'in', got {axis!r}")
    n = linear.out_features if axis == "out" else linear.in_features
    if method == "random":
        return _random(n, seed)
    return _finish(_raw(linear, axis, method), method)


def _raw(linear: nn.Linear, axis: str, method: str) -> torch.Tensor:
    """Like linear_unit_scores but before the magnitude sqrt, so groups can add their parts."""
    e = _elementwise(linear.weight, method, type(linear).__name__)
    if axis == "in":  # a column's bias is not its own: the bias survives any column removal
        return e.sum(0)
    return e.sum(1) + (_elementwise(linear.bias, method, "bias") if linear.bias is not None else 0)


def head_scores(attn: nn.Module, method: str = "taylor", seed: int = 0) -> torch.Tensor:
    """[num_heads] scores: each head's q, k, v rows of ``qkv`` (+ bias) and its ``proj`` columns."""
    h, hd = attn.num_heads, attn.head_dim
    if method == "random":
        return _random(h, seed)
    rows = _raw(attn.qkv, "out", method).view(3, h, hd).sum(dim=(0, 2))
    cols = _raw(attn.proj, "in", method).view(h, hd).sum(dim=1)
    return _finish(rows + cols, method)


def neuron_scores(mlp: nn.Module, method: str = "taylor", seed: int = 0) -> torch.Tensor:
    """[hidden] scores: each neuron's ``fc1`` row (+ bias) and ``fc2`` column."""
    if method == "random":
        return _random(mlp.fc1.out_features, seed)
    return _finish(_raw(mlp.fc1, "out", method) + _raw(mlp.fc2, "in", method), method)


def vit_block_paths(model: nn.Module) -> list[str]:
    """Names of the modules that have both an ``attn`` and an ``mlp`` (our ViT's blocks), in order."""
    return [name for name, m in model.named_modules()
            if name and isinstance(getattr(m, "attn", None), nn.Module)
            and isinstance(getattr(m, "mlp", None), nn.Module)]


@torch.no_grad()
def layer_importance(model: nn.Module, inputs: Sequence[torch.Tensor] | torch.Tensor | dict[str, torch.Tensor],
                     block_paths: Iterable[str] | None = None,
                     io_pair: Callable[[nn.Module, tuple, dict, Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
                     ) -> torch.Tensor:
    """[blocks] I_l = -mean over (batch, tokens) of cos(input_l, output_l), from one forward pass.

    ``io_pair(block, args, kwargs, output) -> (input, output)`` picks the two tensors to compare,
    features on the last axis (default: the first positional input and the first output). A CNN
    block uses it to compare its output with its shortcut branch and to move channels last.
    Runs in eval mode (restored afterwards) so BatchNorm statistics and dropout are untouched.
    """
    paths = list(block_paths) if block_paths is not None else vit_block_paths(model)
    if not paths:
        raise BadInputError(f"layer_importance: no blocks found in {type(model).__name__}; pass block_paths")
    seen: dict[str, torch.Tensor] = {}

    def hook_for(path: str):
        def hook(mod, args, kwargs, output):
            if io_pair is not None:
                x, out = io_pair(mod, args, kwargs, output)
            else:
                x = args[0] if args else next(iter(kwargs.values()))
                out = output[0] if isinstance(output, (tuple, list)) else output
            # cos over the feature (last) axis per token, averaged over every token of the batch.
            cos = F.cosine_similarity(x.double(), out.double(), dim=-1)
            seen[path] = -cos.mean()
        return hook

    handles = [model.get_submodule(p).register_forward_hook(hook_for(p), with_kwargs=True) for p in paths]
    run_hooked_eval(model, handles, lambda m: call_with(m, inputs))
    missing = [p for p in paths if p not in seen]
    if missing:
        raise BadInputError(f"layer_importance: blocks {missing} did not run in the forward pass")
    return torch.stack([seen[p] for p in paths])


def call_with(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if isinstance(inputs, dict):  # keyword inputs, e.g. a Hugging Face batch
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def run_hooked_eval(model: nn.Module, handles: Sequence[Any], run: Callable[[nn.Module], Any]) -> None:
    """``run(model)`` once in eval mode (BatchNorm statistics and dropout untouched), then restore the
    train/eval mode and remove ``handles`` (the forward hooks that recorded what the caller wanted)."""
    was_training = model.training
    model.eval()
    try:
        run(model)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def normalize_importance(importance: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """I^ = (I - mean I) / max|I - mean I| in [-1, 1]; all-equal importance gives zeros (no shift)."""
    imp = torch.as_tensor(importance, dtype=torch.float64).flatten()
    centered = imp - imp.mean()
    scale = centered.abs().max() if imp.numel() else torch.tensor(0.0, dtype=torch.float64)
    # Below rounding noise the layers are equally important: dividing would amplify that noise to +-1.
    if scale <= 1e-12 * max(1.0, imp.abs().max().item()):
        return torch.zeros_like(imp)
    return centered / scale


def raw_axis_scores(param: torch.Tensor, dim: int, method: str, where: str) -> torch.Tensor:
    """[param.shape[dim]] per-slice sums of the method's per-weight contribution (before any sqrt).

    The building block for any unit that owns whole slices of several tensors (a conv channel: its
    filter, its BatchNorm entries and the next conv's input slice); add the parts, then ``finish``.
    """
    e = _elementwise(param, method, where)
    return e.sum(dim=[d for d in range(e.dim()) if d != dim % e.dim()]) if e.dim() > 1 else e


def finish_scores(total: torch.Tensor, method: str) -> torch.Tensor:
    """Turn summed raw contributions into scores (magnitude: the L2 norm of the unit's weights)."""
    return _finish(total, method)


def random_scores(n: int, seed: int) -> torch.Tensor:
    """[n] seeded uniform scores, the random-pruning baseline."""
    return _random(n, seed)
