"""Precision census: which heavy ops of an executed graph run in float and which in integer / n-bit.

A quantized file is not a quantized execution. ORT fuses QDQ patterns
(DequantizeLinear -> MatMul -> QuantizeLinear) into integer kernels (QLinearMatMul, ...) only at
some optimization levels; a DQ -> MatMul left unfused dequantizes the weights and multiplies in
float. So the census counts op types in the graph the runtime really executes (ORT's optimized
graph, saved by the runtime module), never in the exported file, and a float op fed by
DequantizeLinear stays a float op (it is also counted separately, as a hint that a fusion did not
happen).

Tables are plain data so a reader (or a new runtime) can check and extend them. Keys are op types;
the domain (ai.onnx, com.microsoft, com.microsoft.nchwc) does not change the classification.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Iterator, Mapping, Optional

# Matrix-multiply / convolution / attention ops that run in float: where nearly all the FLOPs of a
# vision or language model are spent. ORT's fused float variants are listed too (FusedMatMul is
# MatMul + transpose/scale, FusedConv is Conv + activation, NhwcFusedConv its NHWC layout form,
# Conv in the com.microsoft.nchwc domain keeps the op type "Conv").
FLOAT_HEAVY_OPS: frozenset[str] = frozenset({
    # ai.onnx
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention", "RNN", "GRU", "LSTM",
    # com.microsoft fused float kernels
    "FusedMatMul", "TransposeMatMul", "FusedMatMulActivation", "FusedGemm", "FusedConv",
    "NhwcConv", "NhwcFusedConv", "ConvTransposeWithDynamicPads", "GemmFastGelu",
    "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "PackedMultiHeadAttention",
    "DecoderAttention", "DecoderMaskedMultiHeadAttention", "DecoderMaskedSelfAttention",
    "SparseAttention", "LongformerAttention", "MoE",
})

# The same ops running in integer or n-bit kernels. DynamicQuantizeMatMul / MatMulIntegerToFloat
# take float activations in and out but multiply in int8; MatMulNBits / MatMulBnb4 / MatMulFpQ4
# are 4/8-bit weight-only kernels; GemmFloat8 is an 8-bit float kernel.
LOW_PRECISION_HEAVY_OPS: frozenset[str] = frozenset({
    "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "QLinearConvTranspose", "QGemm",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4", "MatMulFpQ4",
    "QAttention", "QOrderedMatMul", "QOrderedAttention", "QOrderedLongformerAttention",
    "DynamicQuantizeLSTM", "QMoE", "GemmFloat8",
})

# Op types that only move between float and integer; reported so a reader sees the overhead, but
# they are not heavy ops and never enter the fraction.
QUANTIZE_HELPER_OPS: frozenset[str] = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
})

# An op type that looks heavy but is in neither table is counted as float (never claim low
# precision we cannot prove) and named in "unclassified" so the tables get extended.
_HEAVY_HINTS = ("MatMul", "Gemm", "Conv", "Attention")


def iter_nodes(graph: Any) -> Iterator[Any]:
    """Every node of an onnx GraphProto, including nodes inside If/Loop/Scan subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from iter_nodes(attr.g)
            for sub in attr.graphs:
                yield from iter_nodes(sub)


def classify(op_type: str) -> Optional[str]:
    """'float' | 'low_precision' | None (not a heavy op)."""
    if op_type in LOW_PRECISION_HEAVY_OPS:
        return "low_precision"
    if op_type in FLOAT_HEAVY_OPS or any(h in op_type for h in _HEAVY_HINTS):
        return "float"
    return None


def census_from_counts(op_counts: Mapping[str, int], *, dequantize_fed_float_ops: int = 0,
                       optimization_level: Optional[str] = None) -> dict[str, Any]:
    """The report's ``precision`` entry from op-type counts of an executed graph.

    ``low_precision_op_fraction`` = low-precision heavy ops / all heavy ops (0.0 with no heavy op).
    ``ops`` lists the heavy ops and the quantize helpers, with counts.
    """
    float_n = low_n = 0
    ops: dict[str, int] = {}
    unclassified: list[str] = []
    for op, n in sorted(op_counts.items()):
        kind = classify(op)
        if kind == "low_precision":
            low_n += n
        elif kind == "float":
            float_n += n
            if op not in FLOAT_HEAVY_OPS:
                unclassified.append(op)
        elif op not in QUANTIZE_HELPER_OPS:
            continue
        ops[op] = int(n)
    heavy = float_n + low_n
    return {
        "low_precision_op_fraction": (low_n / heavy) if heavy else 0.0,
        "ops": ops,
        "float_ops": float_n,
        "low_precision_ops": low_n,
        "float_ops_fed_by_dequantize": int(dequantize_fed_float_ops),
        "unclassified": unclassified,
        "optimization_level": optimization_level,
    }


def count_ops(op_types: Iterable[str]) -> Counter:
    return Counter(op_types)


def census_of_model(model: Any, optimization_level: Optional[str] = None) -> dict[str, Any]:
    """Census of an onnx ModelProto (the runtime's optimized graph, not the exported file)."""
    nodes = list(iter_nodes(model.graph))
    producer = {out: n.op_type for n in nodes for out in n.output}
    dq_fed = sum(1 for n in nodes if classify(n.op_type) == "float"
                 and any(producer.get(i) == "DequantizeLinear" for i in n.input))
    return census_from_counts(count_ops(n.op_type for n in nodes), dequantize_fed_float_ops=dq_fed,
                              optimization_level=optimization_level)
