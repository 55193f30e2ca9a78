"""QuantLinear: nn.Linear with fake-quantized weights (int8 / int4 / ternary) and an int8 input.

A subclass of nn.Linear, so ``weight`` and ``bias`` keep their names (a checkpoint's state dict
reads the same) and code that checks ``isinstance(m, nn.Linear)`` (cost counting, pruning) still
sees a Linear. The input quantizer lives in ``act`` (state-dict keys ``<name>.act.scale``).

Two forward paths compute the same numbers:
  training / eval: F.linear(fake_quant(x), fake_quant(W), b), with STE gradients;
  export (``exporting``): x -> Q/DQ, integer weights stored transposed [in, out] as an int8
  initializer -> DequantizeLinear(axis=1) -> MatMul -> Add(bias). That is the pattern ONNX Runtime
  fuses into integer kernels (MatMulIntegerToFloat / QLinearMatMul), and int4 / ternary weights
  are turned into n-bit types for MatMulNBits by ``edgeprep.quant.nbits`` after export.
With SmoothQuant smoothing (``set_smoothing``, ``edgeprep.quant.smooth``) the input is first
multiplied by ``input_mul`` = 1 / s per channel (one Mul in ONNX) and ``weight`` holds W diag(s).

Reduced range (``reduced_range=True``, int8 weights with int8 inputs only): the weight grid is
[-63, 63] instead of [-127, 127], still stored as int8. Why: on x86 CPUs without VNNI (AVX2, and
AVX-512 without VNNI) ONNX Runtime runs int8 activations as uint8 (+128) through MLAS's U8S8
kernel, whose vpmaddubsw adds two u8 x s8 products into a *saturating* int16:
2 * 255 * 127 = 64,770 > 32,767, so large products clip. With |w| <= 63 the pair sum is at most
2 * 255 * 63 = 32,130 and every kernel (AVX2, VNNI, SSE4, ARM) computes the exact integer result.
See ``edgeprep.quant.cpu_family`` and BENCHMARKS.md "int8 on every CPU family".
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.quant.fake import (
    LsqQuantizer,
    _decomposed_ops,
    fake_quant,
    int_range,
    round_ste,
    ternarize,
    twn_params,
    weight_scale,
)

WEIGHT_MODES = ("int8", "int4", "ternary")
ACTIVATION_MODES = ("int8", "none")
# Bits of the integer grid each weight mode lands on (ternary {-1, 0, 1} fits in 2 bits).
WEIGHT_BITS = {"int8": 8, "int4": 4, "ternary": 2}
STORAGE_RANGE = int_range(8)  # export stores every mode's integers in int8 first
REDUCED_RANGE_BITS = 7  # int8 weights on the [-63, 63] grid: no int16 saturation in AVX2's U8S8 kernel
BIAS_RANGE = (-(1 << 31), (1 << 31) - 1)  # int32 bias on the int32 accumulator


class QuantLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weights: str = "int8", activations: str = "int8", reduced_range: bool = False):
        if weights not in WEIGHT_MODES:
            raise BadInputError(f"weights {weights!r} is not one of {', '.join(WEIGHT_MODES)}")
        if activations not in ACTIVATION_MODES:
            raise BadInputError(f"activations {activations!r} is not one of {', '.join(ACTIVATION_MODES)}")
        super().__init__(in_features, out_features, bias)
        if reduced_range and (weights != "int8" or activations != "int8"):
            raise BadInputError("reduced_range applies to int8 weights with int8 activations (the integer kernels); "
                                f"got weights {weights!r}, activations {activations!r}")
        self.weight_mode = weights
        self.reduced_range = reduced_range
        self.act: Optional[LsqQuantizer] = LsqQuantizer(8) if activations == "int8" else None
        self.exporting = False
        self.register_buffer("input_mul", None)  # [in] = 1 / s once smoothed; None: no smoothing

    @torch.no_grad()
    def set_smoothing(self, s: torch.Tensor) -> None:
        """Migrate per-input-channel factors ``s`` [in] into the weight: W <- W diag(s), x <- x / s.
        Call before the input quantizer is calibrated (its range is that of x / s)."""
        if self.input_mul is not None:
            raise BadInputError("QuantLinear is already smoothed; smooth a model once")
        if self.act is None:
            raise BadInputError("smoothing applies to Linears with int8 inputs (activations: int8)")
        if s.shape != (self.in_features,) or not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise BadInputError(f"smoothing factors must be {self.in_features} finite positive values")
        s = s.to(self.weight.dtype)
        self.weight.mul_(s)
        self.register_buffer("input_mul", (1.0 / s).to(self.weight.device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, weights: str, activations: str,
                    reduced_range: bool = False) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None,
                weights=weights, activations=activations, reduced_range=reduced_range)
        q.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(linear.weight)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
        q.train(linear.training)
        return q

    @property
    def weight_bits(self) -> int:
        return WEIGHT_BITS[self.weight_mode]

    @property
    def grid_bits(self) -> int:
        """Bits of the grid the weights are rounded to: ``weight_bits``, or 7 with reduced range."""
        return REDUCED_RANGE_BITS if self.reduced_range else self.weight_bits

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight the forward uses (clipped STE gradients to ``weight``)."""
        if self.weight_mode == "ternary":
            return ternarize(self.weight)  # TWN, one alpha per tensor for a Linear
        qmin, qmax = int_range(self.grid_bits)
        scale = weight_scale(self.weight, self.grid_bits, axis=0)  # per output channel, max|w| -> qmax
        return fake_quant(self.weight, scale, qmin, qmax)

    @torch.no_grad()
    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8 [out, in], scales float [out]): ``codes * scales[:, None]`` equals
        ``quantized_weight()`` exactly (same scale, same round-half-even)."""
        w = self.weight.detach()
        if self.weight_mode == "ternary":
            delta, alpha = twn_params(w)
            codes = torch.sign(w) * (w.abs() > delta).to(w.dtype)
            scales = alpha.expand(w.shape[0]).clone()
        else:
            qmin, qmax = int_range(self.grid_bits)
            scales = weight_scale(w, self.grid_bits, axis=0)
            codes = torch.clamp(torch.round(w / scales), qmin, qmax)
            scales = scales.flatten()
        # A ternary row with nothing above delta, or an all-zero channel: any positive scale works.
        return codes.to(torch.int8), scales.clamp_min(1e-12).to(torch.float32)

    def _weight_scales(self) -> torch.Tensor:
        """Per-output-channel weight scales [out] (ternary: alpha repeated), detached."""
        w = self.weight.detach()
        if self.weight_mode == "ternary":
            return twn_params(w)[1].expand(w.shape[0])
        return weight_scale(w, self.grid_bits, axis=0).flatten()

    def bias_scale(self) -> Optional[torch.Tensor]:
        """int32 bias grid: input scale x weight scale per channel, so the bias adds straight onto the
        int32 accumulator (ONNX Runtime's QGemm). None without an input quantizer or a bias."""
        if self.act is None or self.bias is None:
            return None
        return (self.act.scale.detach().abs().clamp_min(1e-8) * self._weight_scales()).clamp_min(1e-30)

    def quantized_bias(self) -> Optional[torch.Tensor]:
        scale = self.bias_scale()
        if scale is None:
            return self.bias
        return torch.clamp(round_ste(self.bias / scale), *BIAS_RANGE) * scale

    @torch.no_grad()
    def integer_bias(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(codes int32 [out], scales float [out]); ``codes * scales`` equals ``quantized_bias()``."""
        scale = self.bias_scale()
        if scale is None:
            return None
        codes = torch.clamp(torch.round(self.bias.detach() / scale), *BIAS_RANGE)
        return codes.to(torch.int32), scale.to(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exporting:
            return self._export_forward(x)
        if self.input_mul is not None:
            x = x * self.input_mul
        if self.act is not None:
            x = self.act(x)
        return F.linear(x, self.quantized_weight(), self.quantized_bias())

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = _decomposed_ops()
        # Buffers registered by edgeprep.quant.export.exporting(): named initializers in the ONNX file.
        codes, scales = self.qweight, self.qweight_scale
        zeros = torch.zeros_like(scales, dtype=torch.int64)
        w = qd.dequantize_per_channel(codes, scales, zeros, 1, *STORAGE_RANGE, torch.int8)
        if self.act is None:
            # Weight-only: DQ(weight) -> MatMul, which ORT fuses into MatMulNBits (n-bit) kernels.
            y = torch.matmul(x, w)
            return y + self.bias if self.bias is not None else y
        # int8 activations: a 2-D Gemm with an int32 bias, which ORT fuses into QGemm (the bias lands
        # on the int32 accumulator; one kernel instead of MatMulIntegerToFloat + Add).
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.input_mul is not None:
            x2 = x2 * self.input_mul  # smoothing: one Mul right before QuantizeLinear
        x2 = self.act(x2)
        if self.bias is None:
            y = torch.mm(x2, w)
        else:
            b = qd.dequantize_per_channel(self.qbias, self.qbias_scale, zeros, 0, *BIAS_RANGE, torch.int32)
            y = torch.addmm(b, x2, w)
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weights={self.weight_mode}{', reduced_range' if self.reduced_range else ''}"
