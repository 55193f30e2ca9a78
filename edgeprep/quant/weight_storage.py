"""ONNX pass: int8 weights stored as uint8 with zero point 128 (export option ``int8_weights: u8``).

``DequantizeLinear(w_s8, scale)`` and ``DequantizeLinear(w_s8 + 128 as uint8, scale, zp=128)``
compute the same floats, so the artifact's numbers do not change. What changes is the kernel ONNX
Runtime picks on x86: U8U8 instead of U8S8, which widens both operands to int16 before multiplying
and so cannot saturate the way AVX2's U8S8 kernel does with full-range int8 weights
(``edgeprep.quant.cpu_family``). The price is speed on VNNI hosts (U8U8 has no VNNI kernel).

Only weights that feed a Gemm or MatMul (the fused QGemm / MatMulInteger paths whose kernels were
measured) are rewritten; ``layers`` limits the pass to the named Linears (``<fqn>.qweight``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from edgeprep.errors import ExportError

ZERO_POINT_U8 = 128
HEAVY_CONSUMERS = ("Gemm", "MatMul")


def weight_layer_name(initializer: str) -> Optional[str]:
    """``blocks.0.fc1.qweight`` -> ``blocks.0.fc1`` (the Linear's module path), else None."""
    return initializer[: -len(".qweight")] if initializer.endswith(".qweight") else None


def weights_to_uint8(proto: Any, layers: Optional[Sequence[str]] = None) -> list[str]:
    """Rewrite in place; returns the module paths (or initializer names) of the rewritten weights."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    wanted = set(layers) if layers is not None else None
    done: list[str] = []
    for node in list(proto.graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        name = node.input[0]
        label = weight_layer_name(name) or name
        if wanted is not None and label not in wanted:
            continue
        codes = numpy_helper.to_array(inits[name])
        if codes.dtype != np.int8 or codes.ndim != 2:
            continue
        if any(c.op_type != "DequantizeLinear" for c in consumers[name]):
            continue  # shared with a non-DQ reader: its int8 meaning must stay
        if not all(c.op_type in HEAVY_CONSUMERS for c in consumers.get(node.output[0], [])):
            continue
        if len(node.input) > 2 and node.input[2]:
            zp = numpy_helper.to_array(inits[node.input[2]]) if node.input[2] in inits else None
            if zp is None or np.any(zp != 0):
                continue  # an asymmetric int8 weight: not ours
        scale = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
        if scale is None:
            raise ExportError(f"{name}: its DequantizeLinear scale is not a constant; cannot store it as uint8")
        shifted = (codes.astype(np.int16) + ZERO_POINT_U8).astype(np.uint8)
        inits[name].CopyFrom(numpy_helper.from_array(shifted, name))
        zp_name = f"{name}_zero_point_u8"
        proto.graph.initializer.append(numpy_helper.from_array(np.full(scale.shape, ZERO_POINT_U8, np.uint8),
                                                               zp_name))
        del node.input[2:]
        node.input.append(zp_name)
        done.append(label)
    if wanted is not None and (missing := sorted(wanted - set(done))):
        raise ExportError(f"int8_weights u8: no int8 weight of a Gemm/MatMul for layer(s) {', '.join(missing)}; "
                          "name Linears as they appear in the model (e.g. blocks.0.mlp.fc1)")
    return done
