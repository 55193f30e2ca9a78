"""The residual-Sum ONNX pass: post-LN residual Adds become Sum (same function), so ONNX Runtime
does not fuse them into SkipLayerNormalization; bias adds and pre-LN streams are left alone."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeprep.exporters.residual_sum import residual_adds_to_sum

D = 16


def _graph(tmp_path):
    """x + y -> LN (post-LN residual); (x + bias) -> LN (bias add); x + z -> LN and -> output (pre-LN)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), name)
             for name in ("gamma", "beta", "bias")]
    nodes = [
        helper.make_node("Add", ["x", "y"], ["r1"], name="residual"),
        helper.make_node("LayerNormalization", ["r1", "gamma", "beta"], ["o1"], axis=-1, epsilon=1e-5),
        helper.make_node("Add", ["x", "bias"], ["r2"], name="bias_add"),
        helper.make_node("LayerNormalization", ["r2", "gamma", "beta"], ["o2"], axis=-1, epsilon=1e-5),
        helper.make_node("Add", ["x", "z"], ["r3"], name="pre_ln"),
        helper.make_node("LayerNormalization", ["r3", "gamma", "beta"], ["o3"], axis=-1, epsilon=1e-5),
    ]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", D])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [vi("x"), vi("y"), vi("z")], [vi("o1"), vi("o2"), vi("o3"), vi("r3")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    return path


def _run(path, feeds, optimized_to=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if optimized_to:
        so.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_only_post_ln_residual_adds_become_sum_and_outputs_are_unchanged(tmp_path):
    path = _graph(tmp_path)
    rng = np.random.default_rng(1)
    feeds = {k: rng.standard_normal((2, 3, D)).astype(np.float32) for k in "xyz"}
    before = _run(path, feeds, tmp_path / "before.opt.onnx")
    assert residual_adds_to_sum(path) == 1
    ops = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops["residual"] == "Sum" and ops["bias_add"] == "Add" and ops["pre_ln"] == "Add"
    after = _run(path, feeds, tmp_path / "after.opt.onnx")
    for a, b in zip(before, after):
        # the same function; only the kernel differs (fused SkipLayerNormalization vs Sum + LayerNormalization)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    count = lambda p, op: sum(n.op_type == op for n in onnx.load(str(p)).graph.node)  # noqa: E731
    assert count(tmp_path / "before.opt.onnx", "SkipLayerNormalization") >= 1  # ORT fused the residual
    assert count(tmp_path / "after.opt.onnx", "SkipLayerNormalization") < count(tmp_path / "before.opt.onnx",
                                                                                 "SkipLayerNormalization")
    assert residual_adds_to_sum(path) == 0  # idempotent
