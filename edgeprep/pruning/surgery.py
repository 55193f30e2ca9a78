"""Physical removal of attention heads and MLP neurons from our ViT, recorded as data.

Zeroing weights saves nothing on a phone, so every function here builds *smaller* ``nn.Linear``
modules and swaps them in; the exported graph then has the smaller shapes.

Each call returns a decision dict (``{"kind", "block", "keep"}``) holding the kept indices
*relative to the structure at the time of the call*. A checkpoint stores the list of decisions
in order; replaying them on a freshly built model reproduces the structure exactly, after which
the saved weights load strictly. Incremental pruning simply appends more decisions.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgeprep.errors import BadInputError

HEADS_KIND = "vit_heads"
MLP_KIND = "vit_mlp"


def _submodule(model: nn.Module, path: str, where: str) -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        raise BadInputError(f"{where}: no module {path!r} in {type(model).__name__}; "
                            "pass a block path such as 'blocks.0'") from None


def find_attention(model: nn.Module, block_path: str) -> nn.Module:
    """The attention module at ``block_path``: a Block (its ``.attn``) or the Attention itself."""
    mod = _submodule(model, block_path, "prune_heads")
    attn = mod if hasattr(mod, "qkv") else getattr(mod, "attn", None)
    if attn is None or not all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "head_dim")):
        raise BadInputError(f"prune_heads: {block_path!r} is a {type(mod).__name__}, not a ViT block or "
                            "attention with qkv/proj/num_heads/head_dim")
    return attn


def find_mlp(model: nn.Module, block_path: str) -> nn.Module:
    """The MLP at ``block_path``: a Block (its ``.mlp``) or the Mlp itself."""
    mod = _submodule(model, block_path, "prune_mlp")
    mlp = mod if hasattr(mod, "fc1") else getattr(mod, "mlp", None)
    if mlp is None or not all(isinstance(getattr(mlp, a, None), nn.Linear) for a in ("fc1", "fc2")):
        raise BadInputError(f"prune_mlp: {block_path!r} is a {type(mod).__name__}, not a ViT block or "
                            "MLP with fc1/fc2 Linear layers")
    return mlp


def _check_keep(keep: Sequence[int], total: int, what: str) -> list[int]:
    # Sorted and unique: the physical order of the kept units then matches the original order,
    # so a pruned model computes exactly what the original computed without the removed units.
    try:
        idx = [int(i) for i in keep]
    except (TypeError, ValueError):
        raise BadInputError(f"{what}: keep must be a list of integers, got {keep!r}") from None
    if not idx:
        raise BadInputError(f"{what}: keep is empty; at least one unit must remain")
    if len(set(idx)) != len(idx) or any(i < 0 or i >= total for i in idx):
        raise BadInputError(f"{what}: keep {idx} must be distinct indices in [0, {total})")
    return sorted(idx)


def _sliced_linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding ``old``'s weight[rows][:, cols] (and bias[rows]); same dtype/device."""
    w = old.weight.detach()
    b = old.bias.detach() if old.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        b = b.index_select(0, rows.to(w.device)) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    return fill_like(new, old, w, b)


def fill_like(new: nn.Module, old: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    """Copy sliced weight/bias into ``new`` and carry over ``old``'s requires_grad and train mode."""
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    # A frozen layer stays frozen (e.g. a teacher copy or a partly frozen backbone).
    new.weight.requires_grad_(old.weight.requires_grad)
    if b is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    new.train(old.training)
    return new


def head_rows(num_heads: int, head_dim: int, heads: Sequence[int]) -> torch.Tensor:
    """qkv output rows of ``heads``: the forward reshapes qkv to (3, heads, head_dim), so head h
    owns rows s*H*hd + h*hd ... + hd - 1 for each of s = q, k, v."""
    width = num_heads * head_dim
    within = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
    return torch.cat([s * width + within for s in range(3)])


def head_cols(head_dim: int, heads: Sequence[int]) -> torch.Tensor:
    """proj input columns of ``heads`` (the heads are concatenated in order before proj)."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def prune_heads(model: nn.Module, block_path: str, keep_heads: Sequence[int]) -> dict[str, Any]:
    """Keep only ``keep_heads`` of the attention at ``block_path``; returns the decision."""
    attn = find_attention(model, block_path)
    keep = _check_keep(keep_heads, attn.num_heads, f"prune_heads({block_path!r})")
    hd = attn.head_dim
    # head_dim (and so the softmax scale) is unchanged: only whole heads go.
    attn.qkv = _sliced_linear(attn.qkv, rows=head_rows(attn.num_heads, hd, keep))
    attn.proj = _sliced_linear(attn.proj, cols=head_cols(hd, keep))
    attn.num_heads = len(keep)
    return {"kind": HEADS_KIND, "block": block_path, "keep": keep}


def prune_mlp(model: nn.Module, block_path: str, keep_neurons: Sequence[int]) -> dict[str, Any]:
    """Keep only ``keep_neurons`` of the MLP hidden layer at ``block_path``; returns the decision."""
    mlp = find_mlp(model, block_path)
    keep = _check_keep(keep_neurons, mlp.fc1.out_features, f"prune_mlp({block_path!r})")
    idx = torch.tensor(keep, dtype=torch.long)
    # The activation between fc1 and fc2 is elementwise, so neuron j is exactly fc1 row j + fc2 column j.
    mlp.fc1 = _sliced_linear(mlp.fc1, rows=idx)
    mlp.fc2 = _sliced_linear(mlp.fc2, cols=idx)
    return {"kind": MLP_KIND, "block": block_path, "keep": keep}


def head_param_count(attn: nn.Module) -> int:
    """Parameters one head of ``attn`` owns (what removing it saves)."""
    per_row = attn.qkv.in_features + (1 if attn.qkv.bias is not None else 0)
    return attn.head_dim * (3 * per_row + attn.proj.out_features)


def neuron_param_count(mlp: nn.Module) -> int:
    """Parameters one MLP hidden neuron owns: its fc1 row (+bias) and fc2 column."""
    return mlp.fc1.in_features + (1 if mlp.fc1.bias is not None else 0) + mlp.fc2.out_features


_APPLY = {HEADS_KIND: prune_heads, MLP_KIND: prune_mlp}


def apply_decision(model: nn.Module, decision: dict[str, Any]) -> nn.Module:
    """Replay one recorded decision on ``model`` (structure and sliced weights); returns the model."""
    kind = decision.get("kind") if isinstance(decision, dict) else None
    if kind not in _APPLY:
        raise BadInputError(f"unknown pruning decision kind {kind!r}; known: {', '.join(sorted(_APPLY))}")
    block, keep = decision.get("block"), decision.get("keep")
    if not isinstance(block, str) or not isinstance(keep, (list, tuple)):
        raise BadInputError(f"pruning decision {decision!r} needs a string 'block' and a list 'keep'")
    _APPLY[kind](model, block, keep)
    return model
