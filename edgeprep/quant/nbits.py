"""Weight-only n-bit MatMuls for ONNX Runtime: INT8-stored weights -> INT4 / INT2 block-wise DQ.

Why: QAT exports low-bit weights (int4 grid, ternary) as ``INT8 initializer -> DequantizeLinear
(per channel, axis=1) -> MatMul``. That stores 8 bits per weight. Storing the same integers as
ONNX INT4 / INT2 lets ONNX Runtime's QDQ optimizer replace ``DequantizeLinear -> MatMul`` with its
``com.microsoft.MatMulNBits`` contrib kernel, which keeps the weight packed (4x or 2x smaller than
int8) and dequantizes it on the fly, block by block.

What the pass writes, per listed weight (K rows = input features, N columns = outputs):

* the weight itself, same name, same integers, as INT4 (opset 21) or INT2 (opset 25);
* a block-wise DequantizeLinear: ``axis=0, block_size=B``, scale ``[ceil(K/B), N]`` holding each
  column's per-channel scale repeated in every block. The zero point is left out when it is all
  zeros (it is, for symmetric QAT), otherwise it is repeated the same way in the n-bit type.

So every weight dequantizes to exactly the float it had before: same integer times same scale.
Block size does not change numerics at all (the scales are equal across blocks); it only sets
the kernel's block layout.

ORT fusion conditions, read in microsoft/onnxruntime main (paths under onnxruntime/core/optimizer/;
the function names are the references) and each checked on the installed ORT 1.32.0 (fab30a4):

* graph_transformer_utils.cc, ``GenerateTransformers``, Level2 case: ``QDQSelectorActionTransformer``
  runs at ORT_ENABLE_EXTENDED or higher unless ``session.disable_quant_qdq`` is "1"; the accuracy
  level is read there from ``session.qdq_matmulnbits_accuracy_level``, default "4".
* qdq_transformer/selectors_actions/qdq_selector_action_transformer.cc,
  ``DQMatMulToMatMulNBitsRules``: rule "DQMatMulToMatMulNBits" on MatMul, for the CPU, CUDA and
  DML providers.
* qdq_transformer/selectors_actions/qdq_selectors.cc, ``DQMatMulNodeGroupSelector::Check`` and
  ``ValidateDQForMatMulNBits``: no QuantizeLinear on the MatMul output and exactly one DQ input,
  which must feed input 1 (B): a DequantizeLinear on A (static activation quantization) makes it
  a QDQ MatMul for QLinearMatMul / MatMulIntegerToFloat instead, and those take no 4-bit weights,
  so the n-bit weight would be dequantized in full on every run (seen on 1.32; this pass refuses
  such MatMuls). The DQ has exactly one consumer and is not a graph output. Weight INT2 / UINT2 /
  INT4 / UINT4 / INT8 / UINT8, rank 2 [K, N]; scale FLOAT or FLOAT16; weight, scale and zero
  point constant initializers (not graph inputs; ORT turns Constant nodes into initializers on
  load, so exporter Constants qualify). Block-wise: ``axis == 0``, ``block_size`` a power of two
  >= 16, scale / zero point ``[ceil(K/B), N]`` - K need not be a multiple of B, ORT pads the last
  block (checked: K = 20, 80, 200 with B = 32, exact). Newer ORT (1.32 included) also takes
  per-tensor and per-channel (axis=1) DQs and re-blocks them with ``session.qdq_matmulnbits_block_size``
  (default 32): so in 1.32 even the *unlisted* INT8 per-channel weights become
  ``MatMulNBits(bits=8)``, at the session's accuracy level.
* qdq_transformer/selectors_actions/qdq_actions.cc, ``DQMatMulToMatMulNBitsAction``,
  ``TransposeDQWeightsForMatMulNBits``, ``ComputeEffectiveBlockSize``: bits come from the weight
  type; a signed weight without zero point gets MatMulNBits' implicit zero point 2^(bits-1), so
  leaving the all-zero zero point out is exact; the CPU kernel is correct only for block sizes
  16..256, hence ``BLOCK_SIZES``.

INT2 works in ORT 1.32: an INT2 block-wise DQ loads (opset 25, IR 13) and fuses to
``MatMulNBits(bits=2)`` with exact results (checked with B = 16, 32, 256 and K < B). It halves a
ternary weight against INT4 but, measured below, its kernel is about 3x slower than the 4-bit
one on x86. ``int2=False`` stores 2-bit weights as INT4 instead (opset 21, values unchanged):
the faster choice, and the one for runtimes older than opset 25. An ``onnx`` without INT2 gets
INT4 too.

Accuracy level (``DEFAULT_ACCURACY_LEVEL = 1``). MatMulNBits' default, 4, quantizes the
activations to int8 per block before the dot products, which changes numerics; 1 keeps fp32
activations (0, "unset", computes the same on CPU). Measured with A [1, 65, 192] x W [192, 768],
per-channel scales, ORT 1.32.0 CPU, one thread, on a shared 2-core Xeon VM (AVX-512, VNNI,
AMX): error = max |y - float64 reference|; latency = best of 3 medians of 300 runs, range over
two sessions (the VM was busy, so only the ordering is solid):

    =================================  ==================  =========  ===============
    weights -> what ORT runs           values (|y| max)    max error  latency
    =================================  ==================  =========  ===============
    float32 MatMul (dequantized)       int4 grid (3.6)     1.8e-06    0.16-0.18 ms
    INT8 per-chan., ORT default (=4)   int4 grid           2.1e-02    0.35-0.40 ms
    INT8 per-chan., level 1            int4 grid           9.9e-07    0.47-0.59 ms
    INT4 B=32, level 1                 int4 grid           1.8e-06    0.16-0.24 ms
    INT4 B=32, level 4                 int4 grid           2.1e-02    0.34-0.48 ms
    float32 MatMul (dequantized)       ternary (0.56)      2.2e-07    0.12-0.18 ms
    INT2 B=32, level 1                 ternary             1.9e-07    0.50-0.51 ms
    INT2 B=32, level 4                 ternary             3.3e-03    0.58-0.61 ms
    INT4 B=32 (int2=False), level 1    ternary             2.2e-07    0.155-0.16 ms
    INT4 B=32 (int2=False), level 4    ternary             3.3e-03    0.34-0.35 ms
    =================================  ==================  =========  ===============

So on this CPU level 4 is both inexact (about 0.5% of the output range) and about 2x *slower*
than level 1 at this shape; level 1 computes what the validated model computes. Level 4 may win
on other CPUs or shapes (single-row decoding, ARM dot-product kernels): pass it deliberately and
re-validate. Two more things the numbers show: at 65 rows the n-bit kernels do not beat a plain
fp32 MatMul, their gain is weight size (4x / 8x less than fp32); and ORT 1.32's own default for
an unconverted INT8 weight-only model (bits=8, level 4) is not exact either, so exports that keep
INT8 weights should also pass ``session_config_for_nbits()``.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeprep.errors import BadInputError, ExportError

DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 1
ACCURACY_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"
BLOCK_SIZES = (16, 32, 64, 128, 256)  # powers of two ORT's CPU MatMulNBits handles correctly
INT4_OPSET = 21  # first opset whose DequantizeLinear takes INT4 and block_size
INT2_OPSET = 25  # first opset whose DequantizeLinear takes INT2
# ORT 1.32's MatMulNBits(bits=2) returns wrong numbers when N (output features) is not a multiple
# of 4 (measured: N = 1..3, 5..7, 10, 14, 17, 30, 33, 63 wrong by O(10) for K = 32..96; every
# multiple of 4 tried exact), e.g. a 10-class head. Such weights are stored as INT4 instead.
INT2_N_MULTIPLE = 4

# Default-domain ops whose *meaning* (not just type list) changed between opset 18 and 25: a
# model using them cannot simply have its opset number raised. Value: opset of the change.
_SEMANTIC_BREAKS = {
    "DFT": 20,  # axis moved from an attribute to an input
    "GridSample": 20,  # mode values renamed (bilinear -> linear, bicubic -> cubic)
    "GroupNormalization": 21,  # scale / bias go from per-group to per-channel
}
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class _Storage:
    """How one bit width is stored: ONNX type name, numpy (ml_dtypes) dtype, first opset that has it."""

    name: str
    np_dtype: object
    opset: int


@dataclass
class _Rewrite:
    """Everything decided for one weight before the graph is touched (so errors leave no half-edit)."""

    weight: str
    bits: int
    storage: _Storage
    dq: onnx.NodeProto
    q: np.ndarray  # [K, N] integers
    scale: np.ndarray  # [ceil(K/B), N]
    zero_point: np.ndarray | None  # [ceil(K/B), N] or None when all zeros
    old_params: tuple[str, ...]  # the DQ's per-channel scale / zero point names, dropped if unused


def session_config_for_nbits(accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> dict[str, str]:
    """Session config entries (``SessionOptions.add_session_config_entry``) for the fused kernel.

    Without them ORT uses accuracy level 4 (int8 activations, not exact); see the module docstring.
    0 = unset (fp32 on CPU), 1 = fp32, 2 = fp16, 3 = bf16, 4 = int8 activations.
    """
    if isinstance(accuracy_level, bool) or accuracy_level not in (0, 1, 2, 3, 4):
        raise BadInputError(f"MatMulNBits accuracy level must be 0..4, got {accuracy_level!r}")
    return {ACCURACY_LEVEL_KEY: str(accuracy_level)}


def to_weight_only_nbits(model: onnx.ModelProto, bits_by_initializer: Mapping[str, int],
                         block_size: int = DEFAULT_BLOCK_SIZE, *,
                         int2: bool = True) -> tuple[onnx.ModelProto, dict]:
    """Return a copy of ``model`` whose listed INT8 weights are INT4 / INT2 block-wise DQ weights.

    ``bits_by_initializer`` maps INT8 initializer names to 4 or 2. Each must be the weight of an
    ``initializer -> DequantizeLinear(axis=1 per-channel, or per-tensor) -> MatMul input 1`` chain
    with no other consumer, and a float activation, so that ORT can fuse it (module docstring).
    ``int2=False`` stores 2-bit weights as INT4: opset 21 instead of 25, and on ORT 1.32 x86 a
    faster kernel, at twice the ternary weight size. The input model is not modified.

    Returns ``(new_model, info)``; info has ``converted`` (count), ``bits`` and ``storage`` per
    weight, ``block_size``, ``opset`` and ``ir_version``. Raises ExportError (one line) when a
    listed weight is missing, not in that pattern, or holds values outside its bit width, or when
    raising the opset would change the meaning of another op; BadInputError for a bad
    ``block_size`` or bit width.
    """
    _check_block_size(block_size)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    index = _GraphIndex(graph)
    plans = [_plan(index, name, bits, block_size, int2) for name, bits in bits_by_initializer.items()]
    opset = _default_opset(out)
    target = max([opset] + [p.storage.opset for p in plans])
    if target > opset:
        _check_opset_raise(out, opset, target)
    for plan in plans:
        _apply(graph, index, plan, block_size)
    _drop_unused_constants(graph, {x for p in plans for x in p.old_params}, index)
    _set_opset(out, target)
    return out, {
        "converted": len(plans),
        "bits": {p.weight: p.bits for p in plans},
        "storage": {p.weight: p.storage.name for p in plans},
        "block_size": block_size,
        "opset": target,
        "ir_version": out.ir_version,
    }


# ----------------------------------------------------------------------------- validation


def _check_block_size(block_size: int) -> None:
    """Only sizes ORT's CPU MatMulNBits computes correctly (qdq_actions.cc enforces 16..256)."""
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise BadInputError(f"nbits block_size must be one of {list(BLOCK_SIZES)}, got {block_size!r}")


def _storage_for(bits: int, int2: bool, n: int) -> _Storage:
    """INT4 for 4 bits; INT2 for 2 bits when asked for, this onnx has it and ORT computes it right
    (N a multiple of INT2_N_MULTIPLE), else INT4 (same values, twice the bytes)."""
    import ml_dtypes  # a dependency of onnx itself

    if bits == 2 and int2 and n % INT2_N_MULTIPLE == 0 and hasattr(TensorProto, "INT2") \
            and hasattr(ml_dtypes, "int2"):
        return _Storage("INT2", ml_dtypes.int2, INT2_OPSET)
    return _Storage("INT4", ml_dtypes.int4, INT4_OPSET)


def _plan(index: _GraphIndex, name: str, bits: int, block_size: int, int2: bool) -> _Rewrite:
    """Check that ``name`` is a fusable weight-only MatMul weight and compute its new tensors."""
    if isinstance(bits, bool) or bits not in (2, 4):
        raise BadInputError(f"nbits: bits for '{name}' must be 2 or 4, got {bits!r}")
    init = index.initializers.get(name)
    if init is None:
        raise ExportError(f"nbits: '{name}' is not an initializer of the graph")
    where = f"nbits: weight '{name}'"
    if name in index.graph_inputs:
        raise ExportError(f"{where} is also a graph input (overridable), so it is not a constant")
    if init.data_type != TensorProto.INT8 or len(init.dims) != 2:
        raise ExportError(f"{where} must be a 2-D INT8 tensor, got "
                          f"{TensorProto.DataType.Name(init.data_type)} {list(init.dims)}")
    dq = _only_consumer(index, name, "DequantizeLinear", 0, where)
    dq_out = dq.output[0]
    matmul = _only_consumer(index, dq_out, "MatMul", 1, f"{where}: its DequantizeLinear output '{dq_out}'")
    _check_float_activation(index, matmul, where)
    k, n = init.dims
    scale, zero_point = _per_channel_params(index, dq, n, where)
    storage = _storage_for(bits, int2, n)
    q = _tensor_array(init, where).astype(np.int32)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    _check_range(q, lo, hi, bits, where)
    if zero_point is not None:
        _check_range(zero_point, lo, hi, bits, f"{where}: zero point")
        if not zero_point.any():
            zero_point = None
    blocks = -(-k // block_size)
    return _Rewrite(name, bits, storage, dq, q, _repeat_blocks(scale, blocks, n),
                    None if zero_point is None else _repeat_blocks(zero_point, blocks, n),
                    tuple(dq.input[1:]))


def _only_consumer(index: _GraphIndex, value: str, op_type: str, slot: int, where: str) -> onnx.NodeProto:
    """The single node reading ``value``, which must be ``op_type`` reading it at input ``slot`` only.

    ORT fuses only when the DQ has one consumer and is not a graph output; a weight read by
    anything else would break when its type changes.
    """
    uses = index.consumers.get(value, [])
    if value in index.graph_outputs or value in index.subgraph_refs:
        raise ExportError(f"{where} is a graph output or used inside a subgraph; expected only a {op_type}")
    if len(uses) != 1:
        raise ExportError(f"{where} has {len(uses)} consumers; expected exactly one {op_type}")
    node = uses[0]
    if node.op_type != op_type or node.domain not in _DEFAULT_DOMAINS or \
            [i for i, x in enumerate(node.input) if x == value] != [slot]:
        raise ExportError(f"{where} feeds {node.op_type} {_label(node)}; expected {op_type} input {slot}")
    return node


def _check_float_activation(index: _GraphIndex, matmul: onnx.NodeProto, where: str) -> None:
    """Refuse a MatMul inside a static-activation QDQ group: ORT would then not fuse it.

    With a DequantizeLinear on input A, or a QuantizeLinear reading the output, ORT's selector sees
    a QDQ MatMul (QLinearMatMul / MatMulIntegerToFloat, which take no 4-bit weights) instead of a
    weight-only one, and the n-bit weight would be dequantized in full on every run (checked on
    ORT 1.32: DequantizeLinear + MatMul are left in the optimized graph).
    """
    producer = index.producers.get(matmul.input[0])
    if producer is not None and producer.op_type == "DequantizeLinear":
        raise ExportError(f"{where}: MatMul {_label(matmul)} reads a dequantized activation "
                          f"('{matmul.input[0]}'), so ORT would not fuse it into MatMulNBits; "
                          "n-bit weights need weight-only quantization (float activations)")
    if any(n.op_type == "QuantizeLinear" for n in index.consumers.get(matmul.output[0], [])):
        raise ExportError(f"{where}: MatMul {_label(matmul)} output is quantized (QuantizeLinear), "
                          "so ORT would not fuse it into MatMulNBits; n-bit weights need "
                          "weight-only quantization (float activations)")


def _per_channel_params(index: _GraphIndex, dq: onnx.NodeProto, n: int, where: str):
    """(scale [N] or [], zero point like scale or None) of a per-channel axis=1 / per-tensor DQ."""
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    if attrs.get("block_size", 0):
        raise ExportError(f"{where}: DequantizeLinear {_label(dq)} is already block-wise")
    scale = _constant_array(index, dq.input[1], f"{where}: scale")
    if scale.dtype not in (np.float32, np.float16):
        raise ExportError(f"{where}: scale must be float32 or float16, got {scale.dtype}")
    per_channel = scale.shape == (n,) and attrs.get("axis", 1) in (1, -1)
    if not (per_channel or scale.shape == ()):
        raise ExportError(f"{where}: expected a per-channel (axis=1, shape [{n}]) or per-tensor scale, "
                          f"got shape {list(scale.shape)} axis {attrs.get('axis', 1)}")
    if len(dq.input) < 3 or not dq.input[2]:
        return scale, None
    zp = _constant_array(index, dq.input[2], f"{where}: zero point")
    if zp.dtype != np.int8 or zp.shape != scale.shape:
        raise ExportError(f"{where}: zero point must be INT8 shaped like the scale {list(scale.shape)}, "
                          f"got {zp.dtype} {list(zp.shape)}")
    return scale, zp.astype(np.int32)


def _check_range(values: np.ndarray, lo: int, hi: int, bits: int, where: str) -> None:
    """Refuse, rather than clip, values that the n-bit type cannot hold: clipping changes the model."""
    vmin, vmax = int(values.min(initial=0)), int(values.max(initial=0))
    if vmin < lo or vmax > hi:
        raise ExportError(f"{where} holds values in [{vmin}, {vmax}], outside the {bits}-bit range "
                          f"[{lo}, {hi}]")


def _check_opset_raise(model: onnx.ModelProto, old: int, new: int) -> None:
    """Raising the opset number is safe unless an op's meaning changed in between (_SEMANTIC_BREAKS)."""
    function_nodes = (node for f in model.functions for node in f.node)
    for node in (*_all_nodes(model.graph), *function_nodes):
        changed_at = _SEMANTIC_BREAKS.get(node.op_type)
        if node.domain in _DEFAULT_DOMAINS and changed_at is not None and old < changed_at <= new:
            raise ExportError(f"nbits: cannot raise the opset from {old} to {new}: {node.op_type} "
                              f"{_label(node)} changes meaning at opset {changed_at}; convert the model "
                              "with onnx.version_converter first")


# ----------------------------------------------------------------------------- rewriting


def _repeat_blocks(per_channel: np.ndarray, blocks: int, n: int) -> np.ndarray:
    """[N] (or scalar) -> [blocks, N]: the same value in every block keeps the numerics exact."""
    return np.ascontiguousarray(np.broadcast_to(per_channel.reshape(1, -1), (blocks, n)))


def _apply(graph: onnx.GraphProto, index: _GraphIndex, plan: _Rewrite, block_size: int) -> None:
    """Swap in the n-bit weight (same name) and point the DQ at new block-wise scale / zero point."""
    dtype = plan.storage.np_dtype
    new_weight = numpy_helper.from_array(plan.q.astype(dtype), plan.weight)
    index.initializers[plan.weight].CopyFrom(new_weight)
    scale_name = index.fresh_name(f"{plan.weight}_scale_b{block_size}")
    graph.initializer.append(numpy_helper.from_array(plan.scale, scale_name))
    inputs = [plan.weight, scale_name]
    if plan.zero_point is not None:
        zp_name = index.fresh_name(f"{plan.weight}_zero_point_b{block_size}")
        graph.initializer.append(numpy_helper.from_array(plan.zero_point.astype(dtype), zp_name))
        inputs.append(zp_name)
    del plan.dq.input[:]
    plan.dq.input.extend(inputs)
    keep = [a for a in plan.dq.attribute if a.name not in ("axis", "block_size")]
    del plan.dq.attribute[:]
    plan.dq.attribute.extend(keep + [helper.make_attribute("axis", 0),
                                     helper.make_attribute("block_size", block_size)])
    _drop_value_info(graph, {plan.weight})  # its element type changed; ORT / checker re-infer it


def _drop_unused_constants(graph: onnx.GraphProto, names: set[str], index: _GraphIndex) -> None:
    """Remove the old per-channel scales / zero points nobody reads any more (they may be shared)."""
    used = {x for node in graph.node for x in node.input} | index.subgraph_refs | index.graph_outputs
    dead = {x for x in names if x and x not in used}
    kept_init = [t for t in graph.initializer if t.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(kept_init)
    kept_nodes = [nd for nd in graph.node if not (nd.op_type == "Constant" and nd.output[0] in dead)]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    _drop_value_info(graph, dead)


def _drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    """Forget recorded types of values whose type changed or that are gone."""
    kept = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset version."""
    for op in model.opset_import:
        if op.domain in _DEFAULT_DOMAINS:
            return op.version
    raise ExportError("nbits: the model imports no default-domain (ai.onnx) opset")


def _set_opset(model: onnx.ModelProto, version: int) -> None:
    """Raise the default-domain opset and the IR version onnx ties to it (opset 21: IR 10, 25: IR 13)."""
    imports = [*model.opset_import, *(op for f in model.functions for op in f.opset_import)]
    for op in imports:  # local functions follow the model, as the checker expects
        if op.domain in _DEFAULT_DOMAINS and op.version < version:
            op.version = version
    needed = helper.find_min_ir_version_for([helper.make_opsetid("", version)], ignore_unknown=True)
    model.ir_version = max(model.ir_version, needed)


# ----------------------------------------------------------------------------- graph helpers


class _GraphIndex:
    """Name lookups for the main graph: initializers, consumers, Constant nodes, names in use."""

    def __init__(self, graph: onnx.GraphProto):
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {v.name for v in graph.input}
        self.graph_outputs = {v.name for v in graph.output}
        self.constants = {nd.output[0]: nd for nd in graph.node if nd.op_type == "Constant"
                          and nd.domain in _DEFAULT_DOMAINS}
        self.producers = {x: nd for nd in graph.node for x in nd.output if x}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in dict.fromkeys(node.input):
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.subgraph_refs = {x for node in graph.node for sub in _subgraphs(node)
                              for inner in _all_nodes(sub) for x in inner.input}
        self.names = set(self.initializers) | self.graph_inputs | {
            x for node in _all_nodes(graph) for x in (*node.input, *node.output)}

    def fresh_name(self, base: str) -> str:
        """``base``, or ``base_2``, ``base_3``... if taken."""
        name, i = base, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name


def _constant_array(index: _GraphIndex, name: str, where: str) -> np.ndarray:
    """Value of an initializer or a Constant node output (how exporters write scales)."""
    if name in index.initializers and name not in index.graph_inputs:
        return _tensor_array(index.initializers[name], where)
    node = index.constants.get(name)
    if node is None:
        raise ExportError(f"{where} '{name}' is not a constant (initializer or Constant node)")
    attr = node.attribute[0] if len(node.attribute) == 1 else None
    if attr is not None and attr.name == "value":
        return _tensor_array(attr.t, where)
    if attr is not None and attr.name in ("value_float", "value_floats"):
        return np.asarray(helper.get_attribute_value(attr), dtype=np.float32)
    raise ExportError(f"{where}: Constant {_label(node)} has no tensor or float value")


def _tensor_array(tensor: TensorProto, where: str) -> np.ndarray:
    """numpy value of an in-memory tensor (external data must have been loaded with the model)."""
    if tensor.data_location == TensorProto.EXTERNAL:
        raise ExportError(f"{where} '{tensor.name}' is stored as external data; load it with the model first")
    return numpy_helper.to_array(tensor)


def _label(node: onnx.NodeProto) -> str:
    """How a message names a node: its name, or what it computes when exporters left it unnamed."""
    return f"'{node.name}'" if node.name else f"(output '{node.output[0] if node.output else ''}')"


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """Graph-valued attributes (If / Loop / Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs, depth first."""
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _all_nodes(sub)
