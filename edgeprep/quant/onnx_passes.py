"""The ONNX pass run on a QAT model's exported file, before the exporter's self-check:
``edgeprep.quant.nbits.to_weight_only_nbits`` for weight-only int4 / ternary Linears (no activation
quantizer), whose weights become INT4 / INT2 that ORT fuses into MatMulNBits. A Linear with int8
activations keeps its low-bit codes in INT8 storage and runs on the int8 integer kernels, because
a DQ on the activation stops ORT's MatMulNBits fusion (see nbits.py).

Not done here, on purpose: BERT's query, key and value Linears quantize the same hidden states;
right after calibration their scales are equal, the exporter merges the three Q -> DQ chains, and
ORT then runs those Linears in float (measured with their MatMul form; splitting the chains again
does not help: ORT's common subexpression elimination merges them back). Training moves the
learned scales apart (LSQ), and then all of them fuse; the QAT stage always trains.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from edgeprep.binary.modules import BinaryLinear
from edgeprep.errors import ExportError
from edgeprep.quant.cpu_family import INT8_WEIGHT_STORAGES
from edgeprep.quant.fake import LsqQuantizer
from edgeprep.quant.linear import QuantLinear
from edgeprep.quant.nbits import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, to_weight_only_nbits
from edgeprep.quant.weight_storage import weights_to_uint8


def weight_only_bits(model: nn.Module) -> dict[str, int]:
    """Initializer name -> bits for int4 / ternary Linears without an activation quantizer."""
    bits = {f"{name}.qweight": m.weight_bits for name, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.weight_bits < 8 and m.act is None}
    # Binary Linears with binary (or float) inputs: the input is a float tensor of +-alpha, so the
    # weight-only MatMulNBits kernel applies; with int8 inputs the Q/DQ keeps them on int8 kernels.
    bits.update({f"{name}.qweight": m.weight_bits for name, m in model.named_modules()
                 if isinstance(m, BinaryLinear) and not isinstance(m.act, LsqQuantizer)})
    return bits


def finish_quantized_onnx(path: Path, model: nn.Module, binary_storage: str = "packed1", int8_weights: str = "s8",
                          u8_weight_layers: Sequence[str] = ()) -> dict[str, Any]:
    """Apply the passes to the file at ``path`` in place; returns what they did (for the manifest).
    ``binary_storage``: "packed1" (binary weights 1 bit each on disk, edgeprep.binary.packing) or
    "int2" (2 bits, run packed by MatMulNBits). ``int8_weights``: "s8" (as trained) or "u8" (every
    int8 Gemm / MatMul weight as uint8 with zero point 128: same numbers, exact on AVX2's kernels,
    ``edgeprep.quant.weight_storage``); ``u8_weight_layers``: only these Linears as uint8."""
    import onnx

    if int8_weights not in INT8_WEIGHT_STORAGES:
        raise ExportError(f"int8_weights {int8_weights!r} is not one of {', '.join(INT8_WEIGHT_STORAGES)}")
    proto = onnx.load(str(path))
    info: dict[str, Any] = {"matmulnbits_accuracy_level": DEFAULT_ACCURACY_LEVEL}
    bits = weight_only_bits(model)
    if bits:
        proto, nbits = to_weight_only_nbits(proto, bits, DEFAULT_BLOCK_SIZE)
        info["nbits"] = nbits
    if any(isinstance(m, BinaryLinear) for m in model.modules()):
        from edgeprep.binary.export import binary_summary
        from edgeprep.binary.packing import STORAGES, pack_binary_weights

        if binary_storage not in STORAGES:
            raise ExportError(f"binary_storage {binary_storage!r} is not one of {', '.join(STORAGES)}")
        if binary_storage == "packed1":
            binary = [name for name in bits if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), BinaryLinear)]
            info["binary_packing"] = pack_binary_weights(proto, binary)
        info["binary"] = binary_summary(proto, model)
    if int8_weights == "u8" or u8_weight_layers:
        info["u8_weights"] = weights_to_uint8(proto, None if int8_weights == "u8" else list(u8_weight_layers))
    onnx.save_model(proto, str(path))
    return info
