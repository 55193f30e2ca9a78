"""Put a QAT model into its export form for the duration of an ONNX export.

Inside ``exporting(model)`` every QuantLinear holds its integer weights as buffers (``qweight``
int8 [in, out], ``qweight_scale`` float [out]), every QuantEmbedding its int8 table and row scales
(``qembedding``, ``qembedding_scale``), and every quantizer emits torch's
quantized_decomposed ops, which the dynamo ONNX exporter writes as QuantizeLinear /
DequantizeLinear with int8 initializers. The numbers are the fake-quant model's: same integers,
same scales, same round-half-even. Afterwards the model is exactly as before.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn

from edgeprep.binary.binarizers import ElasticBinarizer
from edgeprep.binary.modules import BinaryLinear
from edgeprep.quant.embedding import QuantEmbedding
from edgeprep.quant.fake import LsqQuantizer
from edgeprep.quant.linear import QuantLinear

EXPORT_BUFFERS = ("qweight", "qweight_scale", "qbias", "qbias_scale", "qembedding", "qembedding_scale")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, BinaryLinear)) for m in model.modules())


def _switchable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "exporting")]


@contextlib.contextmanager
def exporting(model: nn.Module) -> Iterator[bool]:
    """Yields whether the model has anything quantized; a float model passes through unchanged."""
    switchable = _switchable(model)
    if not switchable:
        yield False
        return
    linears = [m for m in switchable if isinstance(m, (QuantLinear, BinaryLinear))]
    try:
        for m in linears:
            codes, scales = m.integer_weight()
            m.register_buffer("qweight", codes.t().contiguous())
            m.register_buffer("qweight_scale", scales)
            bias = m.integer_bias() if isinstance(m, QuantLinear) else None
            if bias is not None:
                m.register_buffer("qbias", bias[0])
                m.register_buffer("qbias_scale", bias[1])
        for m in switchable:
            if isinstance(m, QuantEmbedding):
                codes, scales = m.integer_weight()
                m.register_buffer("qembedding", codes)
                m.register_buffer("qembedding_scale", scales)
        for m in switchable:
            if isinstance(m, LsqQuantizer):
                m.export_scale = m.step_size()
            m.exporting = True
        yield True
    finally:
        for m in switchable:
            m.exporting = False
        for m in switchable:
            for name in EXPORT_BUFFERS:
                m._buffers.pop(name, None)


def quantization_summary(model: nn.Module) -> dict[str, Any]:
    """What the artifact's manifest says about its quantization."""
    linears = [m for m in model.modules() if isinstance(m, (QuantLinear, BinaryLinear))]
    modes = sorted({getattr(m, "weight_mode", "binary") for m in linears})
    acts = sum(1 for m in _switchable(model) if not isinstance(m, (QuantLinear, BinaryLinear, QuantEmbedding)))
    binarizers = sum(1 for m in model.modules() if isinstance(m, ElasticBinarizer))
    embeddings = sum(1 for m in model.modules() if isinstance(m, QuantEmbedding))
    int8_int8 = [m for m in linears if isinstance(m, QuantLinear) and m.weight_mode == "int8" and m.act is not None]
    reduced = bool(int8_int8) and all(m.reduced_range for m in int8_int8)
    return {"weights": modes, "quantized_linears": len(linears), "activation_quantizers": acts,
            "activation_binarizers": binarizers, "int8_embeddings": embeddings,
            # int8 x int8 Linears: the weight grid decides which CPU families' kernels are exact
            "int8_weight_grid": None if not int8_int8 else ("[-63, 63]" if reduced else "[-127, 127]"),
            "reduced_range": reduced}
