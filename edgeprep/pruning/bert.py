"""Physical removal of attention heads and intermediate neurons from Hugging Face BERT-style layers.

Recognised by structure, not by class name, so BERT, RoBERTa, MiniLM and their sequence-classification
heads all qualify, and so do the (pre-LN) ViT and DeiT layers of transformers' image classifiers: a
layer with a self-attention module holding ``query`` / ``key`` / ``value`` Linears (at
``attention.self`` in BERT, ``attention.attention`` in ViT / DeiT), ``attention.output.dense``,
``intermediate.dense`` and ``output.dense`` Linear modules. The attention forward reads
``num_attention_heads`` / ``attention_head_size`` / ``all_head_size`` at run time, so updating them
after slicing is all it needs. (transformers' own ``prune_heads`` keeps a set of *original* head
indices; we record kept indices per call instead, like every other edgeprep decision.)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.pruning.importance import finish_scores, random_scores, raw_axis_scores
from edgeprep.pruning.surgery import _check_keep, _sliced_linear

BERT_HEADS_KIND = "bert_heads"
BERT_MLP_KIND = "bert_mlp"


# where the self-attention module sits inside ``layer.attention``: BERT-family, ViT / DeiT
SELF_ATTENTION_NAMES = ("self", "attention")


def self_attention_name(module: nn.Module) -> str | None:
    """``"self"`` or ``"attention"`` (the child of ``module.attention`` holding query / key / value)."""
    outer = getattr(module, "attention", None)
    for name in SELF_ATTENTION_NAMES:
        sa = getattr(outer, name, None) if isinstance(outer, nn.Module) else None
        if isinstance(sa, nn.Module) and hasattr(sa, "num_attention_heads") \
                and all(isinstance(getattr(sa, p, None), nn.Linear) for p in ("query", "key", "value")):
            return name
    return None


def self_attention(layer: nn.Module) -> nn.Module:
    return getattr(layer.attention, self_attention_name(layer))


def is_bert_layer(module: nn.Module) -> bool:
    if self_attention_name(module) is None:
        return False
    try:
        parts = (module.attention.output.dense, module.intermediate.dense, module.output.dense)
    except AttributeError:
        return False
    return all(isinstance(p, nn.Linear) for p in parts)


def _layer(model: nn.Module, path: str, where: str) -> nn.Module:
    try:
        layer = model.get_submodule(path) if path else model
    except AttributeError:
        raise BadInputError(f"{where}: no module {path!r} in {type(model).__name__}") from None
    if not is_bert_layer(layer):
        raise BadInputError(f"{where}: {path!r} is a {type(layer).__name__}, not a BERT-style layer "
                            "(attention.self or attention.attention with query/key/value, attention.output.dense, "
                            "intermediate.dense, output.dense)")
    return layer


def _head_index(num_heads: int, head_dim: int, heads: Sequence[int]) -> torch.Tensor:
    # q, k and v are separate Linears here, each laid out head after head.
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def prune_bert_heads(model: nn.Module, layer_path: str, keep_heads: Sequence[int]) -> dict[str, Any]:
    layer = _layer(model, layer_path, "prune_bert_heads")
    sa = self_attention(layer)
    keep = _check_keep(keep_heads, sa.num_attention_heads, f"prune_bert_heads({layer_path!r})")
    idx = _head_index(sa.num_attention_heads, sa.attention_head_size, keep)
    sa.query = _sliced_linear(sa.query, rows=idx)
    sa.key = _sliced_linear(sa.key, rows=idx)
    sa.value = _sliced_linear(sa.value, rows=idx)
    layer.attention.output.dense = _sliced_linear(layer.attention.output.dense, cols=idx)
    sa.num_attention_heads = len(keep)
    sa.all_head_size = len(keep) * sa.attention_head_size
    return {"kind": BERT_HEADS_KIND, "block": layer_path, "keep": keep}


def prune_bert_mlp(model: nn.Module, layer_path: str, keep_neurons: Sequence[int]) -> dict[str, Any]:
    layer = _layer(model, layer_path, "prune_bert_mlp")
    keep = _check_keep(keep_neurons, layer.intermediate.dense.out_features, f"prune_bert_mlp({layer_path!r})")
    idx = torch.tensor(keep, dtype=torch.long)
    layer.intermediate.dense = _sliced_linear(layer.intermediate.dense, rows=idx)
    layer.output.dense = _sliced_linear(layer.output.dense, cols=idx)
    return {"kind": BERT_MLP_KIND, "block": layer_path, "keep": keep}


def apply_bert_decision(model: nn.Module, decision: dict[str, Any]) -> nn.Module:
    fn = {BERT_HEADS_KIND: prune_bert_heads, BERT_MLP_KIND: prune_bert_mlp}.get(decision.get("kind"))
    if fn is None or not isinstance(decision.get("block"), str) or not isinstance(decision.get("keep"), list):
        raise BadInputError(f"BERT pruning decision {decision!r} needs a known kind, a string 'block' and a list 'keep'")
    fn(model, decision["block"], decision["keep"])
    return model


def _linear_raw(lin: nn.Linear, axis: int, method: str, where: str) -> torch.Tensor:
    total = raw_axis_scores(lin.weight, axis, method, where)
    if axis == 0 and lin.bias is not None:  # a row owns its bias entry; a column does not
        total = total + raw_axis_scores(lin.bias, 0, method, f"{where}.bias")
    return total


def bert_head_scores(model: nn.Module, layer_path: str, method: str, seed: int = 0) -> torch.Tensor:
    layer = _layer(model, layer_path, "bert_head_scores")
    sa = self_attention(layer)
    h, hd = sa.num_attention_heads, sa.attention_head_size
    if method == "random":
        return random_scores(h, seed)
    where = f"{layer_path}.attention.{self_attention_name(layer)}"
    rows = sum(_linear_raw(lin, 0, method, where) for lin in (sa.query, sa.key, sa.value))
    cols = _linear_raw(layer.attention.output.dense, 1, method, f"{layer_path}.attention.output.dense")
    return finish_scores((rows + cols).view(h, hd).sum(1), method)


def bert_neuron_scores(model: nn.Module, layer_path: str, method: str, seed: int = 0) -> torch.Tensor:
    layer = _layer(model, layer_path, "bert_neuron_scores")
    if method == "random":
        return random_scores(layer.intermediate.dense.out_features, seed)
    total = _linear_raw(layer.intermediate.dense, 0, method, f"{layer_path}.intermediate.dense") \
        + _linear_raw(layer.output.dense, 1, method, f"{layer_path}.output.dense")
    return finish_scores(total, method)


def bert_head_params(model: nn.Module, layer_path: str) -> int:
    layer = _layer(model, layer_path, "bert_head_params")
    sa = self_attention(layer)
    per_row = sum(lin.in_features + (1 if lin.bias is not None else 0) for lin in (sa.query, sa.key, sa.value))
    return sa.attention_head_size * (per_row + layer.attention.output.dense.out_features)


def bert_head_macs(model: nn.Module, layer_path: str, tokens: int) -> int:
    layer = _layer(model, layer_path, "bert_head_macs")
    sa = self_attention(layer)
    hd = sa.attention_head_size
    proj = sum(lin.in_features for lin in (sa.query, sa.key, sa.value)) + layer.attention.output.dense.out_features
    return tokens * hd * proj + 2 * tokens * tokens * hd  # projections + (q k^T) + (p v)


def bert_neuron_params(model: nn.Module, layer_path: str) -> int:
    layer = _layer(model, layer_path, "bert_neuron_params")
    fc1, fc2 = layer.intermediate.dense, layer.output.dense
    return fc1.in_features + (1 if fc1.bias is not None else 0) + fc2.out_features


def bert_neuron_macs(model: nn.Module, layer_path: str, tokens: int) -> int:
    layer = _layer(model, layer_path, "bert_neuron_macs")
    return tokens * (layer.intermediate.dense.in_features + layer.output.dense.out_features)
