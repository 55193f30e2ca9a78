"""1-bit storage of binary weights in ONNX: 8 signs per byte, unpacked in the graph by standard ops.

ONNX has no 1-bit type. After the n-bit pass a binary weight is ``INT2 [K, N] (+-1) ->
DequantizeLinear (block-wise, scale = alpha) -> MatMul``, 2 bits per weight. This pass stores the
signs instead as a UINT8 initializer, bit i of byte m = sign of weight 8m + i (row-major [K, N],
1 = +1), and rebuilds the float weight with standard ops (opset 18):

    BitShift(packed[:, None], [0..7], RIGHT) -> BitwiseAnd 1 -> Cast float -> *2 - 1
    -> Reshape [K, N] (after dropping the padding bits) -> Mul by the per-column scale -> MatMul

Every input of that chain is a constant, so ONNX Runtime folds it once, at session load: the file
holds 1 bit per binary weight, the session an fp32 weight (the fastest kernel for these shapes on
x86, see ``edgeprep.quant.nbits``: ORT 1.32's 2-bit MatMulNBits is ~3x slower than fp32 MatMul).
The manifest says both (``edgeprep.binary.export.binary_summary``). ``binary_storage: int2``
keeps the INT2 form (2 bits on disk and resident, in MatMulNBits).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeprep.errors import ExportError

PACKED_SUFFIX = ".bits1"
STORAGES = ("packed1", "int2")


def pack_signs(signs: np.ndarray) -> np.ndarray:
    """+-1 values (any shape, row-major) -> uint8, 8 per byte, little bit order; 1 = +1."""
    flat = np.asarray(signs).reshape(-1)
    if not np.isin(flat, (-1, 1)).all():
        raise ExportError(f"binary weight holds values other than -1 / +1: {sorted(set(flat.tolist()))[:6]}")
    return np.packbits(flat > 0, bitorder="little")


def unpack_signs(packed: np.ndarray, count: int) -> np.ndarray:
    """The inverse of pack_signs (numpy; the graph does the same with ONNX ops)."""
    bits = np.unpackbits(packed, bitorder="little")[:count]
    return bits.astype(np.float32) * 2 - 1


def pack_binary_weights(proto: onnx.ModelProto, weights: Iterable[str]) -> dict[str, Any]:
    """Rewrite each named ``INT2/INT4 -> DequantizeLinear -> MatMul`` weight in place as packed bits
    plus the unpack chain. Returns {"packed": count, "weights": {name: [K, N]}}."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    plans = [_plan(name, inits, consumers) for name in weights]  # all checked before any edit
    done: dict[str, list[int]] = {}
    for name, dq, scale_row in plans:
        k, n = inits[name].dims
        signs = numpy_helper.to_array(inits[name]).astype(np.int8)
        packed = pack_signs(signs)
        prefix = name + PACKED_SUFFIX
        new_inits = [
            numpy_helper.from_array(packed, prefix),
            numpy_helper.from_array(np.arange(8, dtype=np.uint8), f"{prefix}.shifts"),
            numpy_helper.from_array(np.array([1], dtype=np.uint8), f"{prefix}.one_u8"),
            numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), f"{prefix}.col"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), f"{prefix}.start"),
            numpy_helper.from_array(np.array([k * n], dtype=np.int64), f"{prefix}.count"),
            numpy_helper.from_array(np.array([k, n], dtype=np.int64), f"{prefix}.shape"),
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), f"{prefix}.two"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), f"{prefix}.one"),
            numpy_helper.from_array(scale_row.reshape(1, n).astype(np.float32), f"{prefix}.scale"),
        ]
        p = prefix
        nodes = [
            helper.make_node("Reshape", [p, f"{p}.col"], [f"{p}.bytes"], name=f"{p}/bytes"),  # [M, 1]
            helper.make_node("BitShift", [f"{p}.bytes", f"{p}.shifts"], [f"{p}.shifted"], direction="RIGHT",
                             name=f"{p}/shift"),  # [M, 8]
            helper.make_node("BitwiseAnd", [f"{p}.shifted", f"{p}.one_u8"], [f"{p}.bit"], name=f"{p}/and"),
            helper.make_node("Cast", [f"{p}.bit"], [f"{p}.bitf"], to=TensorProto.FLOAT, name=f"{p}/cast"),
            helper.make_node("Mul", [f"{p}.bitf", f"{p}.two"], [f"{p}.twice"], name=f"{p}/twice"),
            helper.make_node("Sub", [f"{p}.twice", f"{p}.one"], [f"{p}.signs"], name=f"{p}/signs"),
            helper.make_node("Reshape", [f"{p}.signs", f"{p}.flat_shape"], [f"{p}.flat"], name=f"{p}/flat"),
            helper.make_node("Slice", [f"{p}.flat", f"{p}.start", f"{p}.count"], [f"{p}.trim"], name=f"{p}/trim"),
            helper.make_node("Reshape", [f"{p}.trim", f"{p}.shape"], [f"{p}.kn"], name=f"{p}/kn"),
            helper.make_node("Mul", [f"{p}.kn", f"{p}.scale"], [dq.output[0]], name=f"{p}/scale_mul"),
        ]
        new_inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{p}.flat_shape"))
        at = list(graph.node).index(dq)
        graph.node.remove(dq)
        for offset, node in enumerate(nodes):
            graph.node.insert(at + offset, node)
        for old in (name, *dq.input[1:]):
            if old and not any(old in m.input for m in graph.node) and old in inits:
                graph.initializer.remove(inits.pop(old))
        graph.initializer.extend(new_inits)
        done[name] = [int(k), int(n)]
    return {"packed": len(done), "weights": done}


def _plan(name: str, inits: dict, consumers: dict) -> tuple[str, onnx.NodeProto, np.ndarray]:
    """Check ``name`` is a +-1 INT2/INT4 weight read only by a zero-point-free DequantizeLinear whose
    block scales are equal down each column; return (name, dq node, per-column scale)."""
    init = inits.get(name)
    where = f"binary packing: weight '{name}'"
    if init is None or init.data_type not in (TensorProto.INT2, TensorProto.INT4) or len(init.dims) != 2:
        raise ExportError(f"{where} is not a 2-D INT2 / INT4 initializer (did the n-bit pass run?)")
    uses = consumers.get(name, [])
    if len(uses) != 1 or uses[0].op_type != "DequantizeLinear" or len(uses[0].input) > 2:
        raise ExportError(f"{where} must feed exactly one DequantizeLinear without zero point")
    dq = uses[0]
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    n = init.dims[1]
    scale = scale.reshape(-1, n) if scale.size % n == 0 else scale.reshape(-1)
    if scale.ndim != 2 or not (scale == scale[:1]).all():
        raise ExportError(f"{where}: its DequantizeLinear scales are not one per column")
    return name, dq, scale[0]
