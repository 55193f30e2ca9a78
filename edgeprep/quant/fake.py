"""Fake-quantization primitives for QAT (issue 4 groundwork): integer grids, ternary weights, STE.

Every quantizer here computes ``q * scale`` with q an integer in a legal ONNX range, so what the
fake-quant model computes is exactly what a QuantizeLinear/DequantizeLinear pair with the same
scale (zero point 0) computes at run time: that is what lets export keep the model's accuracy.

Gradients use the *clipped* straight-through estimator: round() passes its gradient through, the
clip does not (zero gradient for inputs outside the representable range), as in the TI paper.
"""
from __future__ import annotations

import math

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
from torch import nn

from edgeprep.errors import BadInputError

TWN_THRESHOLD = 0.7  # TWN: delta = 0.7 * mean|W|
TWN_CLIP = 2.5  # TernaryBERT: weights outside +-2.5 get no gradient


def int_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of a ``bits``-bit integer: int8 -> (-128, 127), uint8 -> (0, 255)."""
    if not 2 <= bits <= 16:
        raise BadInputError(f"quantization bits must be in [2, 16], got {bits}")
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Symmetric fake quantization: clamp(round(x / scale), qmin, qmax) * scale.

    ``scale`` broadcasts against ``x`` (a scalar for per-tensor, shape [C, 1, ...] for per-channel).
    torch.round rounds half to even, as ONNX QuantizeLinear does, so the runtime lands on the same
    integers. The clamp sits after the STE round, so inputs beyond the range get zero gradient.
    """
    if torch.any(scale <= 0):
        raise BadInputError("fake_quant: scales must be positive (an all-zero channel needs a floor)")
    return torch.clamp(round_ste(x / scale), qmin, qmax) * scale


def weight_scale(w: torch.Tensor, bits: int = 8, axis: int | None = 0, eps: float = 1e-8) -> torch.Tensor:
    """Symmetric max-abs scale, per output channel along ``axis`` (None: per tensor), shaped to broadcast.

    max|w| maps to qmax (127 for int8); the grid is then [-127, 127] * scale plus -128 unused, so
    positive and negative weights are treated alike.
    """
    _, qmax = int_range(bits)
    w = w.detach()
    if axis is None:
        amax = w.abs().max()
    else:
        dims = [d for d in range(w.dim()) if d != axis % w.dim()]
        amax = w.abs().amax(dim=dims, keepdim=True)
    return amax.clamp_min(eps) / qmax


def quantize_weight(w: torch.Tensor, bits: int = 8, axis: int | None = 0) -> torch.Tensor:
    """Per-channel (or per-tensor) symmetric fake-quantized weights with the clipped STE."""
    qmin, qmax = int_range(bits)
    return fake_quant(w, weight_scale(w, bits, axis), qmin, qmax)


def twn_params(w: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN threshold delta = 0.7 * mean|W| and alpha = mean of |W| where |W| > delta.

    Per tensor for Linear weights; ``per_row`` (one delta/alpha per row, e.g. embeddings) otherwise.
    Both are shaped to broadcast against ``w``. A row with nothing above delta gets alpha = 0.
    """
    a = w.detach().abs()
    if per_row:
        delta = TWN_THRESHOLD * a.mean(dim=tuple(range(1, a.dim())), keepdim=True)
        mask = (a > delta).to(a.dtype)
        alpha = (a * mask).sum(dim=tuple(range(1, a.dim())), keepdim=True) / \
            mask.sum(dim=tuple(range(1, a.dim())), keepdim=True).clamp_min(1)
    else:
        delta = TWN_THRESHOLD * a.mean()
        mask = (a > delta).to(a.dtype)
        alpha = (a * mask).sum() / mask.sum().clamp_min(1)
    return delta, alpha


def ternarize(w: torch.Tensor, per_row: bool = False, clip: float = TWN_CLIP) -> torch.Tensor:
    """TWN ternary weights alpha * {-1, 0, +1}; gradient passes where |w| <= clip, else zero."""
    delta, alpha = twn_params(w, per_row)
    hard = alpha * torch.sign(w.detach()) * (w.detach().abs() > delta).to(w.dtype)
    inside = (w.detach().abs() <= clip).to(w.dtype)
    # Forward: the ternary values. Backward: d/dw = 1 inside the clip range, 0 outside.
    return hard + (w - w.detach()) * inside


def _decomposed_ops():
    """torch's quantized_decomposed ops (the PT2E quantize/dequantize ops the ONNX exporter maps to
    QuantizeLinear / DequantizeLinear). They must be registered before torch.onnx.export builds its
    op registry, or the exporter finds no ONNX function for them: hence the import at the top."""
    return torch.ops.quantized_decomposed


def qdq_per_tensor(x: torch.Tensor, scale: float, qmin: int, qmax: int) -> torch.Tensor:
    """The export form of ``fake_quant`` with a per-tensor scale: a QuantizeLinear ->
    DequantizeLinear pair in ONNX (int8 storage, zero point 0), same grid and rounding."""
    qd = _decomposed_ops()
    q = qd.quantize_per_tensor(x, scale, 0, qmin, qmax, torch.int8)
    return qd.dequantize_per_tensor(q, scale, 0, qmin, qmax, torch.int8)


class LsqQuantizer(nn.Module):
    """Activation fake quantizer with a learned per-tensor scale (LSQ, Esser et al. 2020).

    The scale starts from calibration (``observing``: max|x| / qmax over the batches seen, the
    input passing through unquantized) or, without one, from the first batch; it is then trained,
    LSQ's gradient scale 1 / sqrt(numel * qmax) keeping its step size comparable to the weights'.
    Symmetric int8 by default, zero point 0, so export is a plain Q/DQ pair (``exporting``).
    """

    def __init__(self, bits: int = 8):
        super().__init__()
        self.qmin, self.qmax = int_range(bits)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True
        self.observing = False  # calibration: widen the range to max|x|, pass x through
        self.exporting = False  # emit quantized_decomposed Q/DQ ops (ONNX QuantizeLinear/DequantizeLinear)
        self.export_scale = 1.0  # step_size() frozen as a Python float when export starts (a graph constant)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        amax = float(x.detach().abs().max())
        prev = float(self.scale) * self.qmax if bool(self.initialized) else 0.0
        self.scale.fill_(max(amax, prev, 1e-8) / self.qmax)
        self.initialized.fill_(True)

    def step_size(self) -> float:
        """The scale the runtime uses (what ``forward`` quantizes with)."""
        return float(self.scale.detach().abs().clamp_min(1e-8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observing:
            self.init_from(x)
            return x
        if self.exporting:
            return qdq_per_tensor(x, self.export_scale, self.qmin, self.qmax)
        if not bool(self.initialized):
            self.init_from(x)  # first batch calibrates: a random start would clip or waste the range
        g = 1.0 / math.sqrt(x.numel() * self.qmax)
        s = self.scale * g + (self.scale - self.scale * g).detach()  # value = scale, gradient * g
        return fake_quant(x, s.abs().clamp_min(1e-8), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"int[{self.qmin}, {self.qmax}], scale={float(self.scale):.4g}"


@torch.no_grad()
def forward_in_batches(model: nn.Module, inputs: torch.Tensor, batch: int) -> None:
    """Run ``model`` over ``inputs`` in eval mode, ``batch`` rows at a time, for its side effects
    (calibration observers, statistics hooks); the training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(inputs), batch):
            model(inputs[i:i + batch])
    finally:
        model.train(was_training)
