"""INT8 weight-only MatMuls -> INT4 / INT2 block-wise DQ that ONNX Runtime fuses into MatMulNBits."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeprep.errors import BadInputError, ExportError
from edgeprep.quant.nbits import (
    ACCURACY_LEVEL_KEY,
    DEFAULT_ACCURACY_LEVEL,
    session_config_for_nbits,
    to_weight_only_nbits,
)

K, N1, N2, N3 = 64, 80, 48, 80  # N1 = 80: the ternary weight's K is not a multiple of the block
BITS = {"w_int4": 4, "w_tern": 2}


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Integer weights as QAT exports them: int4 grid, ternary, and a full-range int8 one."""
    rng = np.random.default_rng(seed)
    return {"w_int4": rng.integers(-8, 8, size=(K, N1)), "w_tern": rng.integers(-1, 2, size=(N1, N2)),
            "w_int8": rng.integers(-128, 128, size=(N2, N3))}


def _scales() -> dict[str, np.ndarray]:
    """Per-channel scales that keep activations around 1 through the three MatMuls."""
    rng = np.random.default_rng(1)
    return {"w_int4": rng.uniform(0.01, 0.03, N1), "w_tern": rng.uniform(0.05, 0.15, N2),
            "w_int8": rng.uniform(0.001, 0.003, N3)}


def _build(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Opset-18 graph shaped like the dynamo exporter's: x [batch, T, K] -> three DQ -> MatMul.

    w_int4's scale / zero point are initializers; w_tern's come from Constant nodes; w_int8 shares
    its zero-point initializer with w_int4 (exporters deduplicate equal constants).
    """
    s = {k: v.astype(np.float32) for k, v in _scales().items()}
    inits = [numpy_helper.from_array(w.astype(np.int8), name) for name, w in weights.items()]
    inits += [numpy_helper.from_array(s["w_int4"], "val_6"), numpy_helper.from_array(s["w_int8"], "val_8"),
              numpy_helper.from_array(np.zeros(N1, np.int8), "zeros_80")]
    nodes = [
        helper.make_node("Constant", [], ["c_scale"], value=numpy_helper.from_array(s["w_tern"])),
        helper.make_node("Constant", [], ["c_zp"], value=numpy_helper.from_array(np.zeros(N2, np.int8))),
        helper.make_node("DequantizeLinear", ["w_int4", "val_6", "zeros_80"], ["d1"], axis=1, name="dq1"),
        helper.make_node("MatMul", ["x", "d1"], ["h1"], name="mm1"),
        helper.make_node("DequantizeLinear", ["w_tern", "c_scale", "c_zp"], ["d2"], axis=1, name="dq2"),
        helper.make_node("MatMul", ["h1", "d2"], ["h2"], name="mm2"),
        helper.make_node("DequantizeLinear", ["w_int8", "val_8", "zeros_80"], ["d3"], axis=1, name="dq3"),
        helper.make_node("MatMul", ["h2", "d3"], ["y"], name="mm3"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, N3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def _reference(x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """The float model, in float64: each MatMul with integer weight times per-channel scale."""
    y = x.astype(np.float64)
    for name, scale in _scales().items():
        y = y @ (weights[name] * scale.astype(np.float32).astype(np.float64))
    return y


def _run(model: onnx.ModelProto, x: np.ndarray, level, tmp_path=None):
    """Run on ORT CPU; with tmp_path also return the optimized graph ORT saved."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    for key, value in session_config_for_nbits().items():
        so.add_session_config_entry(key, value)
    if tmp_path is not None:
        so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    return y, (onnx.load(str(tmp_path / "optimized.onnx")) if tmp_path is not None else None)


@pytest.fixture(scope="module")
def case():
    weights = _weights()
    model = _build(weights)
    new, info = to_weight_only_nbits(model, BITS)
    return weights, model, new, info


def _init(model: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def test_listed_weights_get_nbit_types_and_the_rest_is_untouched(case):
    weights, model, new, info = case
    onnx.checker.check_model(new, full_check=True)
    assert _init(new, "w_int4").data_type == TensorProto.INT4
    assert _init(new, "w_tern").data_type == TensorProto.INT2
    assert _init(new, "w_int8") == _init(model, "w_int8")
    for name in BITS:  # same integers
        assert np.array_equal(numpy_helper.to_array(_init(new, name)).astype(np.int32), weights[name])
    assert info == {"converted": 2, "bits": BITS, "storage": {"w_int4": "INT4", "w_tern": "INT2"},
                    "block_size": 32, "opset": 25, "ir_version": new.ir_version}
    assert [op.version for op in new.opset_import if op.domain == ""] == [25]
    dq = {n.name: n for n in new.graph.node}
    assert {a.name: helper.get_attribute_value(a) for a in dq["dq2"].attribute} == {"axis": 0, "block_size": 32}
    assert list(_init(new, dq["dq2"].input[1]).dims) == [3, N2]  # ceil(80 / 32) blocks
    assert len(dq["dq1"].input) == 2  # all-zero zero point dropped
    assert "zeros_80" in {t.name for t in new.graph.initializer}  # still read by dq3
    assert not {"c_scale", "c_zp"} & {o for n in new.graph.node for o in n.output}  # unused Constants gone
    assert _init(model, "w_int4").data_type == TensorProto.INT8  # input model not modified


def test_ort_fuses_converted_weights_into_matmulnbits_and_matches(case, tmp_path):
    weights, model, new, _ = case
    x = np.random.default_rng(2).standard_normal((3, 5, K)).astype(np.float32)
    y_new, optimized = _run(new, x, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, tmp_path)
    y_old, _ = _run(model, x, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)  # plain DQ -> MatMul
    nbits = [n for n in optimized.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    # exactly one per converted weight (ORT 1.32 also fuses the INT8 one, as bits=8)
    assert sorted(a["bits"] for a in attrs if a["bits"] < 8) == [2, 4]
    assert all(a["accuracy_level"] == DEFAULT_ACCURACY_LEVEL for a in attrs)
    converted_dq = {n.output[0] for n in optimized.graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] in BITS}
    assert not converted_dq
    assert not [n for n in optimized.graph.node if n.op_type == "MatMul" and set(n.input) & {"d1", "d2"}]
    assert np.abs(y_new - y_old).max() <= 1e-5
    assert np.abs(y_new - _reference(x, weights)).max() <= 1e-5
    assert np.abs(y_new).max() > 0.1  # the comparison means something


def test_ternary_can_be_stored_as_int4_for_older_runtimes(tmp_path):
    weights = _weights()
    new, info = to_weight_only_nbits(_build(weights), BITS, block_size=16, int2=False)
    onnx.checker.check_model(new, full_check=True)
    assert info["storage"] == {"w_int4": "INT4", "w_tern": "INT4"} and info["opset"] == 21
    x = np.random.default_rng(3).standard_normal((1, 5, K)).astype(np.float32)
    y, optimized = _run(new, x, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, tmp_path)
    bits = [helper.get_attribute_value(a) for n in optimized.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"]
    assert sorted(b for b in bits if b < 8) == [4, 4]
    assert np.abs(y - _reference(x, weights)).max() <= 1e-5


def test_session_config_sets_the_accuracy_level():
    assert DEFAULT_ACCURACY_LEVEL == 1
    assert session_config_for_nbits() == {ACCURACY_LEVEL_KEY: "1"}
    assert session_config_for_nbits(4) == {"session.qdq_matmulnbits_accuracy_level": "4"}
    with pytest.raises(BadInputError):
        session_config_for_nbits(5)


@pytest.mark.parametrize("name, value, bits", [("w_int4", 8, 4), ("w_int4", -9, 4), ("w_tern", 2, 2),
                                               ("w_tern", -3, 2)])
def test_values_outside_the_bit_width_are_refused(name, value, bits):
    weights = _weights()
    weights[name][3, 5] = value
    with pytest.raises(ExportError, match=f"'{name}'.*outside the {bits}-bit range") as err:
        to_weight_only_nbits(_build(weights), BITS)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bits_by_name, message", [
    ({"nope": 4}, "'nope' is not an initializer"),
    ({"val_6": 4}, "must be a 2-D INT8 tensor"),  # a scale, not a weight
    ({"w_int8": 4}, "outside the 4-bit range"),  # a real int8 weight
])
def test_bad_names_are_refused(bits_by_name, message):
    with pytest.raises(ExportError, match=message):
        to_weight_only_nbits(_build(_weights()), bits_by_name)


def test_weights_outside_the_fusable_pattern_are_refused():
    model = _build(_weights())
    model.graph.node.append(helper.make_node("Identity", ["d1"], ["extra"]))  # DQ with two consumers
    with pytest.raises(ExportError, match="'d1' has 2 consumers"):
        to_weight_only_nbits(model, {"w_int4": 4})
    model = _build(_weights())  # static activation quantization on mm1's input: ORT would not fuse
    model.graph.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), "a_s"),
                                    numpy_helper.from_array(np.array(0, np.int8), "a_z")])
    model.graph.node.insert(0, helper.make_node("QuantizeLinear", ["x", "a_s", "a_z"], ["xq"]))
    model.graph.node.insert(1, helper.make_node("DequantizeLinear", ["xq", "a_s", "a_z"], ["xd"]))
    next(n for n in model.graph.node if n.name == "mm1").input[0] = "xd"
    with pytest.raises(ExportError, match="'mm1' reads a dequantized activation"):
        to_weight_only_nbits(model, {"w_int4": 4})
    model.graph.node.append(helper.make_node("QuantizeLinear", ["h2", "a_s", "a_z"], ["h2q"]))
    with pytest.raises(ExportError, match="'mm2' output is quantized"):
        to_weight_only_nbits(model, {"w_tern": 2})
    model = _build(_weights())
    model.graph.node.append(helper.make_node("GroupNormalization", ["y", "val_6", "val_6"], ["gn"], num_groups=2))
    with pytest.raises(ExportError, match="GroupNormalization .* changes meaning at opset 21"):
        to_weight_only_nbits(model, {"w_int4": 4})


def test_bad_arguments_are_bad_input():
    with pytest.raises(BadInputError, match="block_size"):
        to_weight_only_nbits(_build(_weights()), BITS, block_size=24)
    with pytest.raises(BadInputError, match="must be 2 or 4"):
        to_weight_only_nbits(_build(_weights()), {"w_int4": 3})


def test_per_tensor_scale_and_nonzero_zero_point_stay_exact(tmp_path):
    """The zero point is kept (repeated per block, in INT4) when it is not all zeros."""
    q = np.random.default_rng(4).integers(-8, 8, size=(K, N2))
    inits = [numpy_helper.from_array(q.astype(np.int8), "w"), numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             numpy_helper.from_array(np.array(3, np.int8), "z")]
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["d"]), helper.make_node("MatMul", ["x", "d"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, N2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    new, info = to_weight_only_nbits(model, {"w": 4}, block_size=64)
    onnx.checker.check_model(new, full_check=True)
    assert info["opset"] == 21 and {t.name for t in new.graph.initializer} == {"w", "w_scale_b64", "w_zero_point_b64"}
    assert _init(new, "w_zero_point_b64").data_type == TensorProto.INT4
    x = np.random.default_rng(5).standard_normal((2, 5, K)).astype(np.float32)
    y, optimized = _run(new, x, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, tmp_path)
    assert [n.op_type for n in optimized.graph.node] == ["MatMulNBits"]
    assert np.abs(y - x.astype(np.float64) @ ((q - 3) * np.float64(np.float32(0.02)))).max() <= 1e-5


def test_two_bit_weights_with_n_not_a_multiple_of_4_fall_back_to_int4(tmp_path):
    """ORT 1.32's 2-bit MatMulNBits is wrong for N % 4 != 0 (a 10-class head): stored as INT4, exact."""
    rng = np.random.default_rng(3)
    w = rng.integers(-1, 2, size=(64, 10)).astype(np.int8)
    scale = rng.uniform(0.5, 1.5, 10).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["d"], axis=1),
         helper.make_node("MatMul", ["x", "d"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s"),
         numpy_helper.from_array(np.zeros(10, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    new, info = to_weight_only_nbits(model, {"w": 2})
    assert info["storage"] == {"w": "INT4"} and info["opset"] == 21
    path = tmp_path / "m.onnx"
    onnx.save(new, str(path))
    so = ort.SessionOptions()
    for key, value in session_config_for_nbits().items():
        so.add_session_config_entry(key, value)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((4, 64)).astype(np.float32)
    assert np.abs(sess.run(None, {"x": x})[0] - x @ (w * scale)).max() < 1e-4
