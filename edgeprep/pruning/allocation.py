"""Per-layer sparsity: how much of each block to remove, and which units go.

Sparsities are fractions of each layer's *original* units, so incremental stages compose: stage k
asks for s_l(k) of the original width, and the keep counts never grow back.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from edgeprep.errors import BadInputError

MAX_SPARSITY = 0.99  # Adapt-Pruner's clip: a layer never disappears entirely


def _vec(x: Sequence[float] | torch.Tensor | float, n: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    return t.expand(n).clone() if n is not None and t.dim() == 0 else t.flatten().clone()


def adaptive_step(s: Sequence[float] | torch.Tensor, importance_hat: Sequence[float] | torch.Tensor,
                  d: float, a: float = 0.02, max_sparsity: float = MAX_SPARSITY) -> torch.Tensor:
    """One Adapt-Pruner step: s_l <- clip(s_l + D - A * I^_l, 0, max_sparsity).

    Important layers (I^ > 0) grow their sparsity by less than D, unimportant ones by more; as
    I^ has zero mean the average step is still D (until the clip bites).
    """
    s = _vec(s)
    if a == 0:
        # Skip the term entirely rather than multiply: 0 * nan would poison a layer, and uniform
        # allocation must not depend on the importance values at all.
        step = s + d
    else:
        imp = _vec(importance_hat, s.numel())
        if imp.shape != s.shape:
            raise BadInputError(f"adaptive_step: {s.numel()} sparsities but {imp.numel()} importances")
        step = s + d - a * imp
    return step.clamp(0.0, max_sparsity)


def uniform_step(s: Sequence[float] | torch.Tensor, d: float, max_sparsity: float = MAX_SPARSITY) -> torch.Tensor:
    """Every layer gains D: exactly ``adaptive_step`` with A = 0."""
    return adaptive_step(s, 0.0, d, a=0.0, max_sparsity=max_sparsity)


def erk_sparsity(shapes: Sequence[Sequence[int]], target: float, max_sparsity: float = MAX_SPARSITY) -> torch.Tensor:
    """Erdős–Rényi-Kernel per-layer sparsity hitting a global ``target`` (fraction of all weights).

    Density_l = eps * sum(dims_l) / prod(dims_l): small fan-in/fan-out layers stay denser. eps is
    chosen so that sum_l n_l * density_l = (1 - target) * sum_l n_l, with densities capped to
    [1 - max_sparsity, 1]. A capped layer is fixed, and eps is re-solved in closed form over the
    rest, so the target is met exactly whenever the caps allow it.
    """
    if not shapes:
        return torch.zeros(0, dtype=torch.float64)
    if not 0.0 <= target <= max_sparsity:
        raise BadInputError(f"erk: target sparsity {target} must be in [0, {max_sparsity}]")
    n = torch.tensor([math.prod(s) for s in shapes], dtype=torch.float64)
    if (n <= 0).any():
        raise BadInputError(f"erk: every layer shape needs positive dims, got {list(shapes)}")
    raw = torch.tensor([sum(s) for s in shapes], dtype=torch.float64) / n  # ERK ratio per layer
    lo, budget = 1.0 - max_sparsity, (1.0 - target) * n.sum()
    dense = torch.zeros_like(n, dtype=torch.bool)
    floor = torch.zeros_like(dense)
    # Each pass fixes at least one more layer at a cap or stops, so it ends in <= len(shapes) passes.
    for _ in range(2 * len(shapes) + 1):
        free = ~(dense | floor)
        fixed = n[dense].sum() + lo * n[floor].sum()
        eps = (budget - fixed) / (n[free] * raw[free]).sum() if free.any() else torch.tensor(0.0)
        density = torch.where(dense, 1.0, torch.where(floor, lo, eps * raw))
        over, under = free & (density > 1.0), free & (density < lo)
        if not (over.any() or under.any()):
            break
        # Dense caps first (as RigL does): capping a layer at 1 frees budget and raises eps, which
        # may lift layers that looked under the floor; floors are fixed only once no layer overflows.
        if over.any():
            dense |= over
        else:
            floor |= under
    return (1.0 - density.clamp(lo, 1.0)).clamp(0.0, max_sparsity)


def keep_count(original: int, sparsity: float, min_keep: int = 1, current: int | None = None) -> int:
    """Units to keep of ``original`` at ``sparsity`` (rounded half up), at least ``min_keep`` and
    never more than ``current`` (pruning is one-way)."""
    keep = math.floor((1.0 - float(sparsity)) * original + 0.5)
    keep = max(min_keep, min(original, keep))
    return min(keep, current) if current is not None else keep


def block_keep_counts(heads: Sequence[int], neurons: Sequence[int], sparsity: Sequence[float] | torch.Tensor,
                      mlp_sparsity: Sequence[float] | torch.Tensor | None = None,
                      current_heads: Sequence[int] | None = None,
                      current_neurons: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Per block (heads kept, neurons kept) from per-block sparsity over the original counts.

    ``mlp_sparsity`` defaults to ``sparsity`` (Adapt-Pruner uses one sparsity per block); a separate
    one serves allocations such as ERK that treat attention and MLP as different layers.
    """
    s_attn = _vec(sparsity)
    s_mlp = _vec(mlp_sparsity) if mlp_sparsity is not None else s_attn
    if not (len(heads) == len(neurons) == s_attn.numel() == s_mlp.numel()):
        raise BadInputError(f"block_keep_counts: {len(heads)} head counts, {len(neurons)} neuron counts, "
                            f"{s_attn.numel()}/{s_mlp.numel()} sparsities; one of each per block")
    return [(keep_count(heads[i], s_attn[i].item(), 1, current_heads[i] if current_heads else None),
             keep_count(neurons[i], s_mlp[i].item(), 1, current_neurons[i] if current_neurons else None))
            for i in range(len(heads))]


def lowest_units(scores: Sequence[float] | torch.Tensor, n_remove: int) -> list[int]:
    """Indices of the ``n_remove`` lowest scores (ties: lower index first), sorted ascending."""
    s = _vec(scores)
    if not 0 <= n_remove <= s.numel():
        raise BadInputError(f"lowest_units: cannot remove {n_remove} of {s.numel()} units")
    if torch.isnan(s).any():
        raise BadInputError("lowest_units: scores contain NaN; check the gradients used for importance")
    order = torch.argsort(s, stable=True)  # stable: equal scores are removed in index order, deterministic
    return sorted(order[:n_remove].tolist())


def keep_indices(scores: Sequence[float] | torch.Tensor, n_keep: int) -> list[int]:
    """Sorted indices that survive when all but the ``n_keep`` highest-scoring units are removed."""
    s = _vec(scores)
    gone = set(lowest_units(s, s.numel() - n_keep))
    return [i for i in range(s.numel()) if i not in gone]


def fit_offset(s: Sequence[float] | torch.Tensor, weights: Sequence[float] | torch.Tensor, target: float,
               max_sparsity: float = MAX_SPARSITY) -> torch.Tensor:
    """Shift all sparsities by one offset c so that sum_l w_l * clip(s_l + c) = target * sum_l w_l.

    With equal layer sizes and no clipping the adaptive step already averages D, so c = 0 and the
    allocation is untouched; c only absorbs clipping and unequal layer sizes (e.g. CNN stages), which
    keeps every step on its exact budget. Solved by bisection (the sum is monotone in c).
    """
    s, w = _vec(s), _vec(weights)
    if s.shape != w.shape:
        raise BadInputError(f"fit_offset: {s.numel()} sparsities but {w.numel()} weights")
    goal = float(target) * float(w.sum())
    if not 0.0 <= target <= max_sparsity:
        raise BadInputError(f"fit_offset: target sparsity {target:.4f} is outside [0, {max_sparsity}]")

    def total(c: float) -> float:
        return float((w * (s + c).clamp(0.0, max_sparsity)).sum())

    lo, hi = -1.0 - float(s.max()), 1.0 - float(s.min()) + max_sparsity
    for _ in range(100):  # 2^-100 of a width-3 bracket: far below any unit's share of a layer
        mid = 0.5 * (lo + hi)
        if total(mid) < goal:
            lo = mid
        else:
            hi = mid
    return (s + 0.5 * (lo + hi)).clamp(0.0, max_sparsity)


def plan_removals(original: Sequence[int], current: Sequence[int], unit_cost: Sequence[float],
                  sparsity: Sequence[float], block: Sequence[int], coarse: Sequence[bool],
                  target_cost: float, min_keep: int = 1, exact: bool = True) -> list[int]:
    """Units to have removed (of each group's original count) so the removed cost hits ``target_cost``.

    Each group g asks for sparsity[g] * original[g] units. Coarse groups (attention heads) round to the
    nearest unit first and hand their rounding error, as cost, to the fine groups of the same block
    (MLP neurons), so a block keeps its budget even when a head is a third of its attention. Fine
    groups then round down, and single fine units (coarse ones only when there are no fine groups)
    are added or taken back while that brings the total strictly closer to the target: the result
    is within half a fine unit's cost whenever the limits allow. Pruning is one-way: a group never
    has fewer units removed than it has now.

    ``exact=False`` (the intermediate steps of a gradual schedule) rounds heads to nearest and lets
    neurons take only their own share, minus what heads took beyond theirs, with no settling. Neurons
    then never run ahead of their share, so a later head that rounds up can always be paid for by
    neurons not yet removed; settling at every step instead over-prunes the neurons while heads lag,
    and one-way pruning cannot give those back when the head finally goes.
    """
    n = len(original)
    if not (len(current) == len(unit_cost) == len(sparsity) == len(block) == len(coarse) == n):
        raise BadInputError("plan_removals: one original/current/cost/sparsity/block/coarse entry per group")
    lo = [original[g] - current[g] for g in range(n)]  # already removed
    hi = [max(lo[g], original[g] - min_keep) for g in range(n)]
    want = [float(sparsity[g]) * original[g] for g in range(n)]
    removed = [0] * n
    fine_cost: dict[int, float] = {}
    fine_lo: dict[int, float] = {}  # cost the block's fine groups have already removed (one-way)
    fine_hi: dict[int, float] = {}
    for g in range(n):
        if not coarse[g]:
            fine_cost[block[g]] = fine_cost.get(block[g], 0.0) + original[g] * unit_cost[g]
            fine_lo[block[g]] = fine_lo.get(block[g], 0.0) + lo[g] * unit_cost[g]
            fine_hi[block[g]] = fine_hi.get(block[g], 0.0) + hi[g] * unit_cost[g]
    carry: dict[int, float] = {}
    for g in range(n):
        if coarse[g]:
            b = block[g]
            goal_b = want[g] * unit_cost[g] + carry.get(b, 0.0) + sum(
                want[f] * unit_cost[f] for f in range(n) if block[f] == b and not coarse[f])

            def miss(r: int) -> float:
                # How far the block lands from its budget if this group removes r units and the fine
                # groups absorb the rest within what they have already removed and can still remove.
                fine = min(fine_hi.get(b, 0.0), max(fine_lo.get(b, 0.0), goal_b - r * unit_cost[g]))
                return abs(r * unit_cost[g] + fine - goal_b)

            options = sorted({min(hi[g], max(lo[g], r)) for r in (math.floor(want[g]), math.floor(want[g]) + 1)})
            if exact:  # the closest block total wins; ties go to the nearest rounding of this group's wish
                removed[g] = min(options, key=lambda r: (round(miss(r), 6), abs(r - want[g])))
            else:
                removed[g] = min(hi[g], max(lo[g], math.floor(want[g] + 0.5)))
            extra = (want[g] - removed[g]) * unit_cost[g]
            carry[b] = carry.get(b, 0.0) + (extra if exact else min(0.0, extra))
    for g in range(n):
        if not coarse[g]:
            share = original[g] * unit_cost[g] / fine_cost[block[g]] if fine_cost[block[g]] else 0.0
            want[g] += carry.get(block[g], 0.0) * share / unit_cost[g]
            removed[g] = min(hi[g], max(lo[g], math.floor(want[g])))
    if not exact:
        return removed
    total = sum(removed[g] * unit_cost[g] for g in range(n))
    # Only fine units settle the total when there are any: taking a head back here to offset neurons
    # that an earlier step removed (one-way) would stall head pruning and pile it all on the MLPs.
    adjustable = [g for g in range(n) if not coarse[g]] or list(range(n))
    while True:  # every move strictly shrinks |target - total|, so this ends
        gap = target_cost - total
        step = 1 if gap > 0 else -1
        movable = [g for g in adjustable
                   if (removed[g] < hi[g] if step > 0 else removed[g] > lo[g])
                   and abs(gap - step * unit_cost[g]) < abs(gap)]
        if not movable:
            return removed
        # The group furthest behind (adding) or ahead (taking back) of its own wish moves first.
        g = max(movable, key=lambda g: (step * (want[g] - removed[g]), -unit_cost[g], -g))
        removed[g] += step
        total += step * unit_cost[g]
