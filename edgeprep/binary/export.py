"""What a binarized ONNX artifact holds, in bytes, honestly labelled (recorded in its manifest).

Two storages (OnnxOptions.binary_storage):
- "packed1" (default): 8 signs per byte on disk (edgeprep.binary.packing); ORT unpacks them once
  at session load into fp32 weights, so the file holds 1 bit per binary weight and the session 32;
- "int2": INT2 (the smallest ONNX integer type holding -1 and +1), 4 per byte, run by ORT's
  MatMulNBits, which keeps them packed: 2 bits per binary weight on disk and at run time.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from edgeprep.binary.modules import BinaryLinear


def _tensor_bytes(t: Any) -> int:
    import onnx

    if t.raw_data:
        return len(t.raw_data)
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type in (onnx.TensorProto.INT2, onnx.TensorProto.UINT2):
        return (n + 3) // 4
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def binary_summary(proto: Any, model: nn.Module) -> dict[str, Any]:
    """Counts and bytes of the binary weights and of everything else the file (and the session) holds."""
    import onnx

    from edgeprep.binary.packing import PACKED_SUFFIX

    linears = {f"{n}.qweight": m for n, m in model.named_modules() if isinstance(m, BinaryLinear)}
    inits = list(proto.graph.initializer)
    int2 = [t for t in inits if t.name in linears]
    packed = [t for t in inits if t.name.endswith(PACKED_SUFFIX) and t.name[:-len(PACKED_SUFFIX)] in linears]
    binary = int2 + packed
    binary_weights = sum(int(np.prod(t.dims)) for t in int2) + sum(
        linears[t.name[:-len(PACKED_SUFFIX)]].weight.numel() for t in packed)
    binary_bytes = sum(_tensor_bytes(t) for t in binary)
    total = sum(_tensor_bytes(t) for t in inits)
    storage = sorted({onnx.TensorProto.DataType.Name(t.data_type) for t in binary})
    return {"binary_weights": binary_weights, "binary_weight_bytes_on_disk": binary_bytes,
            "bits_per_binary_weight_on_disk": round(8 * binary_bytes / max(binary_weights, 1), 3),
            "binary_weight_storage": storage, "initializer_bytes": total,
            "other_initializer_bytes": total - binary_bytes,
            "ideal_1bit_binary_weight_bytes": (binary_weights + 7) // 8,
            "fp32_binary_weight_bytes": 4 * binary_weights,
            "resident_bits_per_binary_weight": 32 if packed else 2,
            "note": ("binary weights packed 8 per byte on disk; ONNX Runtime unpacks them to fp32 once, at "
                     "session load (32 bits each resident)" if packed else
                     "binary weights stored as INT2 (ONNX has no 1-bit type) and kept packed at run time by "
                     "MatMulNBits (2 bits each resident)") + "; other initializers (float parts, scales) as stored"}
