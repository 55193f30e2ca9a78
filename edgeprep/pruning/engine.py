"""Adapt-Pruner's loop: K pruning stages, each in small adaptive steps, each followed by training.

For pruning stage k of K the removed cost (params or MACs) grows from ratio*(k-1)/K to ratio*k/K of
the model's starting cost, in ``inner_steps`` steps. Each step, on a fresh calibration batch:
  1. layer importance I_l = -mean cos(in_l, out_l), normalized to I^ (adaptive only);
  2. s_l <- clip(s_l + D - A * I^_l, 0, 0.99)  (A = 0 for uniform), then one common offset puts the
     layer-size-weighted mean exactly on this step's budget; ERK sets s from layer shapes instead;
  3. sparsities -> units to remove per group (heads round first, neurons absorb the rest);
  4. unit scores (Taylor: one backward of the task loss) pick which units go; they are removed
     physically.
Then ``train_between`` (distillation from the unpruned teacher in the stage) recovers accuracy on
1/K of the training budget. One-shot is K = 1.

The engine is model-agnostic: a ``Calibration`` gives batches, the forward call and the loss, so the
same loop prunes our ViT and CNN on images and a Hugging Face BERT on token ids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Protocol

import torch
from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.pruning.allocation import (
    MAX_SPARSITY,
    adaptive_step,
    erk_sparsity,
    fit_offset,
    keep_indices,
    plan_removals,
)
from edgeprep.pruning.groups import UnitGroup, block_io, find_groups, ops, probe_positions
from edgeprep.pruning.importance import layer_importance, normalize_importance

Budget = Literal["params", "macs"]
STEP_SPARSITY = 0.02  # the paper's D: mean sparsity added per allocation step


class Calibration(Protocol):
    def batch(self, i: int) -> Any: ...  # the i-th fresh calibration batch (seeded)

    def inputs(self, batch: Any) -> Any: ...  # model inputs: a tensor, a tuple, or a dict of keywords

    def forward(self, model: nn.Module, batch: Any) -> Any: ...  # run the model on the batch's inputs

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...  # task loss (for Taylor scores)


@dataclass(frozen=True)
class PruneSettings:
    ratio: float  # fraction of the starting params (or MACs) to remove
    budget: Budget = "params"
    allocation: Literal["adaptive", "uniform", "erk"] = "adaptive"
    schedule: Literal["incremental", "one-shot"] = "incremental"
    ratio_per_stage: float = 0.05  # incremental: each stage removes about this share of the original
    # Allocation steps per stage, each on a fresh calibration batch. None: as many as make the mean
    # step D = STEP_SPARSITY (Adapt-Pruner's D = 0.02 = A), which bounds how far A can spread layers.
    inner_steps: Optional[int] = None
    importance: Literal["taylor", "magnitude", "random"] = "taylor"
    amplitude: float = 0.02  # A
    units: Optional[tuple[str, ...]] = None  # None: every unit kind the model has
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    seed: int = 0

    @property
    def num_stages(self) -> int:
        if self.schedule == "one-shot":
            return 1
        return max(1, round(self.ratio / self.ratio_per_stage))


@dataclass
class PruneOutcome:
    decisions: list[dict[str, Any]]  # one per pruned group, kept indices relative to the input model
    groups: list[UnitGroup]
    cost_before: int
    cost_after_planned: float  # what the plan removed, in budget units (params or MACs)
    layers: list[dict[str, Any]]  # per group: block, unit, original, kept, sparsity
    history: list[dict[str, Any]] = field(default_factory=list)  # per pruning stage
    inner_steps: int = 0  # allocation steps per stage actually used


def model_cost(model: nn.Module, budget: Budget, run_macs: Callable[[nn.Module], int]) -> int:
    if budget == "params":
        return int(sum(p.numel() for p in model.parameters()))
    return int(run_macs(model))


def prune_model(model: nn.Module, settings: PruneSettings, calib: Calibration,
                run_macs: Callable[[nn.Module], int],
                train_between: Optional[Callable[[nn.Module, int, int], dict[str, Any]]] = None,
                log: Callable[[str], None] = lambda _msg: None) -> PruneOutcome:
    """Prune ``model`` in place; returns the decisions to replay and what was done."""
    if not 0.0 < settings.ratio < 1.0:
        raise BadInputError(f"prune: ratio {settings.ratio} must be in (0, 1)")
    groups = find_groups(model, list(settings.units) if settings.units else None,
                         list(settings.targets), list(settings.ignore))
    probe_positions(model, groups, lambda m: calib.forward(m, calib.batch(0)))
    gops = [ops(g) for g in groups]
    for g, o in zip(groups, gops):
        g.original = o.count(model, g)
        g.alive = list(range(g.original))
    cost_fn = (lambda g, o: o.unit_params(model, g)) if settings.budget == "params" else \
        (lambda g, o: o.unit_macs(model, g))
    unit_cost = [float(cost_fn(g, o)) for g, o in zip(groups, gops)]
    blocks = list(dict.fromkeys(g.block for g in groups))
    block_of = [blocks.index(g.block) for g in groups]
    block_cost = torch.zeros(len(blocks), dtype=torch.float64)
    for i, g in enumerate(groups):
        block_cost[block_of[i]] += g.original * unit_cost[i]
    total = model_cost(model, settings.budget, run_macs)
    removable = sum((g.original - 1) * c for g, c in zip(groups, unit_cost))
    goal = settings.ratio * total
    if goal > removable * MAX_SPARSITY:
        raise BadInputError(
            f"prune: ratio {settings.ratio:.2f} asks to remove {goal:,.0f} of {total:,} {settings.budget}, but the "
            f"prunable units hold only {removable:,.0f} ({removable / total:.1%}); lower the ratio or add units")
    prunable = float(block_cost.sum())
    io_pairs = {b: block_io(model, b) for b in blocks}
    # ERK sees each group as the weight matrix it is: (units x rows per unit) by (cost per row).
    widths = [o.width(model, g) for g, o in zip(groups, gops)]
    erk_shapes = [(g.original * w, max(1, round(c / w))) for g, c, w in zip(groups, unit_cost, widths)]

    s_block = torch.zeros(len(blocks), dtype=torch.float64)
    k_stages = settings.num_stages
    # Mean sparsity (over the prunable cost) each stage adds, cut into steps of about D each.
    stage_sigma = goal / k_stages / prunable
    j_steps = settings.inner_steps or max(1, math.ceil(stage_sigma / STEP_SPARSITY - 1e-9))
    batch_index = 1
    history: list[dict[str, Any]] = []
    for k in range(1, k_stages + 1):
        goal_prev, goal_k = goal * (k - 1) / k_stages, goal * k / k_stages
        for j in range(1, j_steps + 1):
            goal_j = goal_prev + (goal_k - goal_prev) * j / j_steps
            sigma_j = goal_j / prunable  # mean sparsity over the prunable cost
            batch = calib.batch(batch_index)
            batch_index += 1
            if settings.allocation == "erk":
                s_group = erk_sparsity(erk_shapes, min(sigma_j, MAX_SPARSITY)).tolist()
            else:
                d = (goal_k - goal_prev) / j_steps / prunable
                if settings.allocation == "adaptive" and settings.amplitude != 0:
                    imp = layer_importance(model, calib.inputs(batch), blocks,
                                           io_pair=_dispatch_io(io_pairs, model, blocks))
                    s_block = adaptive_step(s_block, normalize_importance(imp), d, a=settings.amplitude)
                else:  # uniform, or adaptive with A = 0: exactly the same step
                    s_block = adaptive_step(s_block, 0.0, d, a=0.0)
                s_block = fit_offset(s_block, block_cost, sigma_j)
                s_group = [float(s_block[block_of[i]]) for i in range(len(groups))]
            current = [o.count(model, g) for g, o in zip(groups, gops)]
            removed = plan_removals([g.original for g in groups], current, unit_cost, s_group, block_of,
                                    [g.coarse for g in groups], goal_j, exact=(k == k_stages and j == j_steps))
            _remove_units(model, groups, gops, current, removed, settings, calib, batch, seed=batch_index)
        removed_cost = sum((g.original - len(g.alive)) * c for g, c in zip(groups, unit_cost))
        entry = {"stage": k, "of": k_stages, "target_removed": round(goal_k / total, 6),
                 "removed": round(removed_cost / total, 6),
                 "block_sparsity": [round(float(x), 4) for x in _block_sparsity(groups, unit_cost, block_of, len(blocks))]}
        log(f"prune stage {k}/{k_stages}: removed {removed_cost / total:.1%} of {settings.budget}")
        if train_between is not None:
            entry.update(train_between(model, k, k_stages) or {})
        history.append(entry)

    decisions = []
    for g in groups:
        if len(g.alive) < g.original:
            # One decision per group relative to the input model: replaying it on the input model
            # (fresh from its source) rebuilds exactly this structure.
            decisions.append(_decision_for(g))
    layers = [{"block": g.block, "unit": g.unit, "module": g.module_path, "original": g.original,
               "kept": len(g.alive), "sparsity": round(1 - len(g.alive) / g.original, 6),
               "unit_cost": unit_cost[i]} for i, g in enumerate(groups)]
    removed_cost = sum((g.original - len(g.alive)) * c for g, c in zip(groups, unit_cost))
    return PruneOutcome(decisions=decisions, groups=groups, cost_before=total,
                        cost_after_planned=total - removed_cost, layers=layers, history=history,
                        inner_steps=j_steps)


def _dispatch_io(io_pairs: dict[str, Any], model: nn.Module, blocks: list[str]):
    if all(v is None for v in io_pairs.values()):
        return None
    by_module = {id(model.get_submodule(b)): io_pairs[b] for b in blocks}

    def io(mod, args, kwargs, output):
        fn = by_module.get(id(mod))
        if fn is not None:
            return fn(mod, args, kwargs, output)
        x = args[0] if args else next(iter(kwargs.values()))
        return x, output[0] if isinstance(output, (tuple, list)) else output
    return io


def _block_sparsity(groups: list[UnitGroup], unit_cost: list[float], block_of: list[int], n_blocks: int) -> list[float]:
    orig = [0.0] * n_blocks
    gone = [0.0] * n_blocks
    for i, g in enumerate(groups):
        orig[block_of[i]] += g.original * unit_cost[i]
        gone[block_of[i]] += (g.original - len(g.alive)) * unit_cost[i]
    return [gone[b] / orig[b] if orig[b] else 0.0 for b in range(n_blocks)]


def _remove_units(model: nn.Module, groups: list[UnitGroup], gops: list, current: list[int], removed: list[int],
                  settings: PruneSettings, calib: Calibration, batch: Any, seed: int) -> None:
    todo = [i for i, g in enumerate(groups) if g.original - removed[i] < current[i]]
    if not todo:
        return
    if settings.importance == "taylor":
        was_training = model.training
        model.eval()  # BatchNorm running stats and dropout untouched by scoring
        model.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad():
                loss = calib.loss(model, batch)
                if not torch.isfinite(loss):
                    raise BadInputError(f"prune: the calibration loss is {loss.item()}; cannot score units")
                loss.backward()
        finally:
            model.train(was_training)
    try:
        for i in todo:
            g, o = groups[i], gops[i]
            n_keep = g.original - removed[i]
            # Seeds differ per group and step so random scores are independent draws.
            scores = o.scores(model, g, settings.importance, settings.seed * 1_000_003 + seed * 1009 + i)
            keep = keep_indices(scores, n_keep)
            o.prune(model, g, keep)
            g.alive = [g.alive[j] for j in keep]
    finally:
        model.zero_grad(set_to_none=True)


def _decision_for(g: UnitGroup) -> dict[str, Any]:
    from edgeprep.pruning.bert import BERT_HEADS_KIND, BERT_MLP_KIND
    from edgeprep.pruning.conv import CHANNELS_KIND
    from edgeprep.pruning.surgery import HEADS_KIND, MLP_KIND

    kind = {("vit", "heads"): HEADS_KIND, ("vit", "mlp"): MLP_KIND, ("bert", "heads"): BERT_HEADS_KIND,
            ("bert", "mlp"): BERT_MLP_KIND, ("conv", "channels"): CHANNELS_KIND}[(g.family, g.unit)]
    d: dict[str, Any] = {"kind": kind, "block": g.block, "keep": list(g.alive)}
    if g.family == "conv":
        d.update(producer=g.names[0], norm=g.names[1], consumer=g.names[2])
    return d


def describe(settings: PruneSettings, inner_steps: Optional[int] = None) -> str:
    k = settings.num_stages
    steps = inner_steps or settings.inner_steps or "auto"
    return (f"{settings.schedule} ({k} stage{'s' if k != 1 else ''} x {steps} steps), "
            f"{settings.allocation} allocation (A={settings.amplitude}), {settings.importance} importance, "
            f"{settings.ratio:.0%} of {settings.budget}")
