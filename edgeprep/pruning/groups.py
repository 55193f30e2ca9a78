"""Prunable unit groups: what can be removed from a model, what each unit costs, and how to remove it.

A *block* is the layer Adapt-Pruner allocates sparsity to (a transformer block, a residual CNN block);
a *unit group* is one kind of removable unit inside a block (its attention heads, its MLP neurons,
one chain of internal conv channels). Families are found by structure:

  family  block                                       units
  vit     has .attn (qkv/proj/num_heads) and .mlp      heads, mlp
  bert    HF BERT-style layer (attention.self.query;  heads, mlp
          ViT / DeiT: attention.attention.query)
  conv    conv1 -> bn1 -> conv2 [-> bn2 -> conv3]     channels

Groups hold module *paths*, never module objects: surgery swaps modules, so every operation looks
its modules up again.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.pruning import bert, conv, surgery
from edgeprep.pruning.importance import head_scores, neuron_scores, run_hooked_eval

UNIT_KINDS = ("heads", "mlp", "channels")


@dataclass
class UnitGroup:
    block: str  # block path: the layer whose sparsity the allocation sets
    unit: str  # heads | mlp | channels
    family: str  # vit | bert | conv
    module_path: str  # the sub-module holding the units (for targets/ignore and the report)
    names: tuple[str, ...] = ()  # conv: (producer, norm, consumer) attribute names
    positions: Any = None  # tokens (vit/bert) or (producer, consumer) output pixels (conv); set by probe()
    original: int = 0  # units when pruning started
    alive: list[int] = field(default_factory=list)  # original indices of the units still present

    @property
    def key(self) -> str:
        return f"{self.module_path}:{self.unit}"

    @property
    def coarse(self) -> bool:
        """Heads are few and expensive: rounding them first and letting neurons absorb the rest keeps
        each block on its budget."""
        return self.unit == "heads"


# ----------------------------------------------------------------------------- per-family operations
@dataclass(frozen=True)
class GroupOps:
    count: Callable[[nn.Module, UnitGroup], int]
    scores: Callable[[nn.Module, UnitGroup, str, int], torch.Tensor]
    unit_params: Callable[[nn.Module, UnitGroup], int]
    unit_macs: Callable[[nn.Module, UnitGroup], int]
    prune: Callable[[nn.Module, UnitGroup, list[int]], dict[str, Any]]
    width: Callable[[nn.Module, UnitGroup], int] = lambda m, g: 1  # rows per unit (a head: head_dim)


def _vit_heads_macs(model: nn.Module, g: UnitGroup) -> int:
    attn = surgery.find_attention(model, g.block)
    t, hd = g.positions, attn.head_dim
    return t * hd * (3 * attn.qkv.in_features + attn.proj.out_features) + 2 * t * t * hd


def _vit_mlp_macs(model: nn.Module, g: UnitGroup) -> int:
    mlp = surgery.find_mlp(model, g.block)
    return g.positions * (mlp.fc1.in_features + mlp.fc2.out_features)


OPS: dict[tuple[str, str], GroupOps] = {
    ("vit", "heads"): GroupOps(
        count=lambda m, g: surgery.find_attention(m, g.block).num_heads,
        scores=lambda m, g, method, seed: head_scores(surgery.find_attention(m, g.block), method, seed),
        unit_params=lambda m, g: surgery.head_param_count(surgery.find_attention(m, g.block)),
        unit_macs=_vit_heads_macs,
        prune=lambda m, g, keep: surgery.prune_heads(m, g.block, keep),
        width=lambda m, g: surgery.find_attention(m, g.block).head_dim),
    ("vit", "mlp"): GroupOps(
        count=lambda m, g: surgery.find_mlp(m, g.block).fc1.out_features,
        scores=lambda m, g, method, seed: neuron_scores(surgery.find_mlp(m, g.block), method, seed),
        unit_params=lambda m, g: surgery.neuron_param_count(surgery.find_mlp(m, g.block)),
        unit_macs=_vit_mlp_macs,
        prune=lambda m, g, keep: surgery.prune_mlp(m, g.block, keep)),
    ("bert", "heads"): GroupOps(
        count=lambda m, g: bert.self_attention(m.get_submodule(g.block)).num_attention_heads,
        scores=lambda m, g, method, seed: bert.bert_head_scores(m, g.block, method, seed),
        unit_params=lambda m, g: bert.bert_head_params(m, g.block),
        unit_macs=lambda m, g: bert.bert_head_macs(m, g.block, g.positions),
        prune=lambda m, g, keep: bert.prune_bert_heads(m, g.block, keep),
        width=lambda m, g: bert.self_attention(m.get_submodule(g.block)).attention_head_size),
    ("bert", "mlp"): GroupOps(
        count=lambda m, g: m.get_submodule(g.block).intermediate.dense.out_features,
        scores=lambda m, g, method, seed: bert.bert_neuron_scores(m, g.block, method, seed),
        unit_params=lambda m, g: bert.bert_neuron_params(m, g.block),
        unit_macs=lambda m, g: bert.bert_neuron_macs(m, g.block, g.positions),
        prune=lambda m, g, keep: bert.prune_bert_mlp(m, g.block, keep)),
    ("conv", "channels"): GroupOps(
        count=lambda m, g: getattr(m.get_submodule(g.block), g.names[0]).out_channels,
        scores=lambda m, g, method, seed: conv.channel_scores(m, g.block, g.names, method, seed),
        unit_params=lambda m, g: conv.channel_param_count(m, g.block, g.names),
        unit_macs=lambda m, g: conv.channel_macs(m, g.block, g.names, g.positions),
        prune=lambda m, g, keep: conv.prune_conv_channels(m, g.block, keep, *g.names)),
}


def ops(g: UnitGroup) -> GroupOps:
    return OPS[(g.family, g.unit)]


# ----------------------------------------------------------------------------- discovery
def is_vit_block(m: nn.Module) -> bool:
    attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
    return (isinstance(attn, nn.Module) and all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "head_dim"))
            and isinstance(mlp, nn.Module) and isinstance(getattr(mlp, "fc1", None), nn.Linear)
            and isinstance(getattr(mlp, "fc2", None), nn.Linear))


def family_of(module: nn.Module) -> str | None:
    if is_vit_block(module):
        return "vit"
    if bert.is_bert_layer(module):
        return "bert"
    if conv.is_conv_block(module):
        return "conv"
    return None


def _groups_of_block(path: str, module: nn.Module, family: str) -> list[UnitGroup]:
    if family == "vit":
        return [UnitGroup(path, "heads", family, f"{path}.attn" if path else "attn"),
                UnitGroup(path, "mlp", family, f"{path}.mlp" if path else "mlp")]
    if family == "bert":
        return [UnitGroup(path, "heads", family, f"{path}.attention"),
                UnitGroup(path, "mlp", family, f"{path}.intermediate")]
    return [UnitGroup(path, "channels", family, f"{path}.{names[0]}", names=names)
            for names in conv.conv_pairs(module)]


def matches(name: str, pattern: str) -> bool:
    """A recipe target: ``re:<regex>`` searched in the name, else the name itself or a parent of it."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.startswith(pattern + ".")


def find_groups(model: nn.Module, units: list[str] | None = None, targets: list[str] = (),
                ignore: list[str] = ()) -> list[UnitGroup]:
    """Every prunable unit group of ``model`` (blocks in module order), filtered by units/targets/ignore.

    Raises BadInputError when nothing is prunable or a target matches nothing (a likely typo).
    """
    for u in units or ():
        if u not in UNIT_KINDS:
            raise BadInputError(f"prune: unknown unit {u!r}; valid units: {', '.join(UNIT_KINDS)}")
    found: list[UnitGroup] = []
    families: set[str] = set()
    for path, module in model.named_modules():
        family = family_of(module)
        if family is None:
            continue
        families.add(family)
        found.extend(_groups_of_block(path, module, family))
    if not found:
        raise BadInputError(f"prune: {type(model).__name__} has no block edgeprep can prune (ViT blocks with "
                            "attn/mlp, BERT-style layers, or residual blocks with conv1 -> bn1 -> conv2)")
    available = sorted({g.unit for g in found})
    wanted = [g for g in found if units is None or g.unit in units]
    if not wanted:
        raise BadInputError(f"prune: the model has no {', '.join(units or [])} units; it has: {', '.join(available)}")

    def hit(g: UnitGroup, pattern: str) -> bool:
        return matches(g.block, pattern) or matches(g.module_path, pattern)

    for t in targets:
        if not any(hit(g, t) for g in wanted):
            raise BadInputError(f"prune: target {t!r} matches no prunable block; blocks are e.g. "
                                f"{', '.join(sorted({g.block for g in wanted})[:4])}")
    chosen = [g for g in wanted if (not targets or any(hit(g, t) for t in targets))
              and not any(hit(g, p) for p in ignore)]
    if not chosen:
        raise BadInputError("prune: `ignore` excludes every prunable block; nothing left to prune")
    return chosen


def block_io(model: nn.Module, block: str) -> Callable | None:
    """The layer-importance (input, output) pair function of a block's family (None: the default)."""
    return conv.block_io if family_of(model.get_submodule(block)) == "conv" else None


@torch.no_grad()
def probe_positions(model: nn.Module, groups: list[UnitGroup], run: Callable[[nn.Module], Any]) -> None:
    """Record how many tokens / output pixels each group's matmuls run over (for MAC costs)."""
    seen: dict[str, Any] = {}
    handles = []
    for g in groups:
        if g.family == "conv":
            blk = model.get_submodule(g.block)
            for name in g.names[::2]:  # producer and consumer convs
                mod = getattr(blk, name)
                key = f"{g.block}.{name}"
                handles.append(mod.register_forward_hook(
                    lambda _m, _a, out, key=key: seen.__setitem__(key, out.shape[-2] * out.shape[-1])))
        else:
            key = g.block
            handles.append(model.get_submodule(g.block).register_forward_hook(
                lambda _m, args, kwargs, _out, key=key: seen.__setitem__(
                    key, (args[0] if args else next(iter(kwargs.values()))).shape[1]),
                with_kwargs=True))
    run_hooked_eval(model, handles, run)
    for g in groups:
        if g.family == "conv":
            g.positions = (seen[f"{g.block}.{g.names[0]}"], seen[f"{g.block}.{g.names[2]}"])
        elif g.block in seen:
            g.positions = seen[g.block]
        else:
            raise BadInputError(f"prune: block {g.block!r} did not run in the forward pass")
