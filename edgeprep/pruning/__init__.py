"""Structural pruning (Adapt-Pruner): unit/layer importance, per-layer sparsity allocation and
budget planning, physical removal recorded as replayable decisions, and the prune loop.

  importance.py  Taylor / magnitude / random unit scores; layer importance -mean cos(in, out)
  allocation.py  adaptive / uniform / ERK sparsity, exact budget planning (plan_removals)
  surgery.py     ViT heads and MLP neurons;  bert.py  HF BERT-style layers;  conv.py  CNN channels
  groups.py      which units a model has (found by structure) and what each costs
  engine.py      the incremental prune -> train loop (prune_model)

The decision kinds are listed in the prune stage's replayers (``edgeprep.builtin``), so a pruned checkpoint
rebuilds its smaller modules before the weights are loaded.
"""
from __future__ import annotations

from edgeprep.pruning.allocation import (
                                         adaptive_step,
                                         block_keep_counts,
                                         erk_sparsity,
                                         keep_count,
                                         keep_indices,
                                         lowest_units,
                                         uniform_step,
)
from edgeprep.pruning.importance import (
                                         head_scores,
                                         layer_importance,
                                         linear_unit_scores,
                                         neuron_scores,
                                         normalize_importance,
                                         vit_block_paths,
)
from edgeprep.pruning.surgery import (
                                         HEADS_KIND,
                                         MLP_KIND,
                                         apply_decision,
                                         find_attention,
                                         find_mlp,
                                         head_param_count,
                                         neuron_param_count,
                                         prune_heads,
                                         prune_mlp,
)

__all__ = [
    "HEADS_KIND",
    "MLP_KIND",
    "adaptive_step",
    "apply_decision",
    "block_keep_counts",
    "erk_sparsity",
    "find_attention",
    "find_mlp",
    "head_param_count",
    "head_scores",
    "keep_count",
    "keep_indices",
    "layer_importance",
    "linear_unit_scores",
    "lowest_units",
    "neuron_param_count",
    "neuron_scores",
    "normalize_importance",
    "prune_heads",
    "prune_mlp",
    "uniform_step",
    "vit_block_paths",
]
