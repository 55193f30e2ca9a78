"""SmoothQuant-style migration of activation outliers into the weights (Xiao et al., ICML 2023).

Why: a static per-tensor int8 scale is set by the largest channel. BERT-style post-LN encoders
(all-MiniLM-L6-v2) have a few LayerNorm output channels several times larger than the rest, so
the other channels of the Q / K / V / FFN inputs get a handful of int8 levels. For each Linear
with an int8 input, per input channel j

    s_j = max|X_j| ** alpha / max|W[:, j]| ** (1 - alpha)
    y = (x / s) (W diag(s))^T + b              (the same function in exact arithmetic)

so the quantized input x / s has flatter channels and the weights, quantized per OUTPUT channel,
take the difference. alpha is the migration strength (the paper: 0.5 for OPT/BLOOM; on MiniLM
0.8-0.9 is best, see BENCHMARKS.md). ``s`` is folded into ``weight`` once; the input multiplier
1 / s stays in the module (buffer ``input_mul``) and exports as one Mul before QuantizeLinear.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.quant.fake import LsqQuantizer, forward_in_batches
from edgeprep.quant.linear import QuantLinear

SMOOTH_EPS = 1e-5  # floor for a channel's max|x| / max|w|: dead channels keep a finite, unit-ish factor


def smoothable(model: nn.Module) -> dict[str, QuantLinear]:
    """The QuantLinears with an int8 input and no smoothing yet, by name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.act is not None and m.input_mul is None}


def input_channel_absmax(model: nn.Module, inputs: torch.Tensor, names: Sequence[str],
                         batch: int = 64) -> dict[str, torch.Tensor]:
    """max|x| per input channel of each named Linear over ``inputs``, the model run in float
    (every activation quantizer switched off while it runs)."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().abs().flatten(0, -2).amax(0).float()
            stats[name] = torch.maximum(stats[name], x) if name in stats else x
        return record

    quantizers = [q for q in model.modules() if isinstance(q, LsqQuantizer)]
    enabled = [q.enabled for q in quantizers]
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for q in quantizers:
            q.enabled = False
        forward_in_batches(model, inputs, batch)
    finally:
        for q, e in zip(quantizers, enabled):
            q.enabled = e
        for h in handles:
            h.remove()
    return stats


def smoothing_factors(x_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [in] = max|X_j| ** alpha / max|W[:, j]| ** (1 - alpha)."""
    w_absmax = weight.detach().abs().amax(0).float().clamp_min(SMOOTH_EPS)
    return (x_absmax.clamp_min(SMOOTH_EPS) ** alpha / w_absmax ** (1 - alpha)).clamp_min(SMOOTH_EPS)


def smooth_model(model: nn.Module, inputs: torch.Tensor, alpha: float) -> dict[str, Any]:
    """Smooth every int8-input QuantLinear of ``model`` (before its activation scales are
    calibrated); returns the decision entry that replays it (``linears``)."""
    if not 0.0 < alpha <= 1.0:
        raise BadInputError(f"qat: smoothing {alpha} is not in (0, 1]; use 0.5 (SmoothQuant) to 0.9 or null")
    targets = smoothable(model)
    if not targets:
        raise BadInputError("qat: smoothing needs Linears with int8 inputs; set activations: int8 or smoothing: null")
    stats = input_channel_absmax(model, inputs, list(targets))
    # a Linear the forward never reached has no statistics: it stays unsmoothed
    targets = {n: m for n, m in targets.items() if n in stats}
    for name, linear in targets.items():
        linear.set_smoothing(smoothing_factors(stats[name], linear.weight, alpha))
    return {"alpha": alpha, "linears": list(targets)}


def replay_smoothing(model: nn.Module, names: Sequence[str]) -> None:
    """Give the named QuantLinears their ``input_mul`` buffer (ones) so a checkpoint's values load
    into it; the checkpoint's weights are already the smoothed ones."""
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, QuantLinear):
            raise BadInputError(f"qat replay: {name!r} is a {type(linear).__name__}, not a QuantLinear")
        linear.register_buffer("input_mul", linear.weight.new_ones(linear.in_features))
