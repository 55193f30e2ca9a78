"""measure/: census tables and counting, latency statistics, parity math, cost counting."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from edgeprep.measure.census import FLOAT_HEAVY_OPS, LOW_PRECISION_HEAVY_OPS, census_of_model, classify
from edgeprep.measure.cost import count_macs, count_params
from edgeprep.measure.latency import median_ci_ranks, summarize_ns, time_callable
from edgeprep.measure.parity import SQNR_CAP_DB, max_abs, parity, sqnr_db, top1_agreement


# ----------------------------------------------------------------------------- census (onnx protos)
def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_census_tables_do_not_overlap():
    assert not FLOAT_HEAVY_OPS & LOW_PRECISION_HEAVY_OPS
    assert classify("Relu") is None and classify("DequantizeLinear") is None
    assert classify("QLinearConv") == "low_precision" and classify("NhwcFusedConv") == "float"


def test_census_of_float_graph_is_exact():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]),
             helper.make_node("Gemm", ["a", "w2"], ["b"]),
             helper.make_node("Relu", ["b"], ["c"]),
             helper.make_node("Conv", ["img", "k"], ["d"])]
    graph = helper.make_graph(nodes, "f", [_vi("x", [1, 4]), _vi("img", [1, 1, 4, 4])],
                              [_vi("c", [1, 4]), _vi("d", None)])
    c = census_of_model(helper.make_model(graph))
    assert c["ops"] == {"Conv": 1, "Gemm": 1, "MatMul": 1}
    assert (c["float_ops"], c["low_precision_ops"], c["low_precision_op_fraction"]) == (3, 0, 0.0)
    assert c["float_ops_fed_by_dequantize"] == 0 and c["unclassified"] == []


def test_census_of_mixed_graph_with_subgraphs_is_exact():
    then_g = helper.make_graph([helper.make_node("MatMulNBits", ["x", "qw", "s"], ["t"], domain="com.microsoft")],
                               "then", [], [_vi("t", None)])
    else_g = helper.make_graph([helper.make_node("FusedMatMul", ["x", "x"], ["e"], domain="com.microsoft")],
                               "else", [], [_vi("e", None)])
    nodes = [
        # QDQ left unfused: the MatMul multiplies dequantized (float) weights -> a float op
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("QuantizeLinear", ["m", "ms", "mz"], ["mq"]),
        helper.make_node("MatMulInteger", ["xq", "wq"], ["mi"]),
        helper.make_node("QLinearConv", ["iq", "is", "iz", "kq", "ks", "kz", "os", "oz"], ["qc"]),
        helper.make_node("DynamicQuantizeMatMul", ["x", "wq", "ws"], ["dq"], domain="com.microsoft"),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g),
        helper.make_node("WeirdConvThing", ["x"], ["u"], domain="example"),
    ]
    graph = helper.make_graph(nodes, "mixed", [_vi("x", [1, 4]), _vi("cond", [], TensorProto.BOOL)],
                              [_vi("mq", None)])
    c = census_of_model(helper.make_model(graph), optimization_level="extended")
    assert c["ops"] == {"DequantizeLinear": 1, "DynamicQuantizeMatMul": 1, "FusedMatMul": 1, "MatMul": 1,
                        "MatMulInteger": 1, "MatMulNBits": 1, "QLinearConv": 1, "QuantizeLinear": 1,
                        "WeirdConvThing": 1}
    assert (c["float_ops"], c["low_precision_ops"]) == (3, 4)
    assert c["low_precision_op_fraction"] == pytest.approx(4 / 7)
    assert c["float_ops_fed_by_dequantize"] == 1
    assert c["unclassified"] == ["WeirdConvThing"]  # looks heavy, unknown: counted as float
    assert c["optimization_level"] == "extended"


def _qdq_matmul_model() -> "object":
    """x -> Q -> DQ -> MatMul(DQ(int8 W)) -> Q -> DQ -> y: one QDQ MatMul, as quantize_static writes it."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(8, 4), dtype=np.int8)
    inits = [numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.float32(0.01), "ws"),
             numpy_helper.from_array(np.int8(0), "wz"), numpy_helper.from_array(np.float32(0.02), "xs"),
             numpy_helper.from_array(np.uint8(128), "xz"), numpy_helper.from_array(np.float32(0.05), "ys"),
             numpy_helper.from_array(np.uint8(128), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["m"]),
             helper.make_node("QuantizeLinear", ["m", "ys", "yz"], ["mq"]),
             helper.make_node("DequantizeLinear", ["mq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [_vi("x", ["batch", 8])], [_vi("y", ["batch", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("optimize,expected_ops,fraction", [
    ("basic", {"MatMul": 1, "DequantizeLinear": 3, "QuantizeLinear": 2}, 0.0),
    ("extended", {"QLinearMatMul": 1, "QuantizeLinear": 1, "DequantizeLinear": 1}, 1.0),
])
def test_ort_census_on_handmade_qdq_graph(tmp_path, optimize, expected_ops, fraction):
    import onnx

    from edgeprep.exporters import get_runtime
    from edgeprep.manifest import describe_file
    from edgeprep.types import TensorSpec

    path = tmp_path / "model.onnx"
    onnx.save(_qdq_matmul_model(), str(path))
    art = describe_file("qdq", "onnx", "onnxruntime", path, [TensorSpec("x", ("batch", 8), "float32")],
                        [TensorSpec("y", ("batch", 4), "float32")], info={"optimize": optimize})
    loaded = get_runtime("onnxruntime").load(art)
    assert loaded.run([np.ones((3, 8), np.float32)])[0].shape == (3, 4)
    c = loaded.precision_census()
    assert c["ops"] == expected_ops and c["low_precision_op_fraction"] == fraction
    assert c["float_ops_fed_by_dequantize"] == (1 if optimize == "basic" else 0)


# ----------------------------------------------------------------------------- latency
def test_median_ci_ranks_match_binomial_tables():
    # Classic tables of distribution-free 95% CIs for the median (coverage >= 95%).
    assert median_ci_ranks(10) == (2, 9)
    assert median_ci_ranks(20) == (6, 15)
    assert median_ci_ranks(100) == (40, 61)
    assert median_ci_ranks(5) == (1, 5)  # too few samples for 95%: the whole range
    assert median_ci_ranks(1) == (1, 1)


def test_summarize_known_samples():
    samples_ns = np.arange(100, 0, -1) * 1_000_000  # 100 ms ... 1 ms, unsorted
    s = summarize_ns(samples_ns, warmup=0, threads=1, batch=1)
    assert s.p50_ms == pytest.approx(50.5) and s.mean_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1) and s.p99_ms == pytest.approx(99.01)
    assert s.ci95_p50_ms == (40.0, 61.0)


def test_time_callable_on_sleep_free_callable():
    a = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    stats = time_callable(lambda: a @ a, warmup=5, iters=200, threads=1, batch=64)
    assert stats.iters == 200 and stats.warmup == 5 and stats.batch == 64 and stats.threads == 1
    assert 0 < stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    lo, hi = stats.ci95_p50_ms
    assert lo <= stats.p50_ms <= hi
    # no memory figure: this process's RSS is not a callable's (tests/test_memory.py measures an artifact's)
    assert "peak_rss_bytes" not in stats.to_report()
    assert set(stats.to_report()) >= {"p50", "p90", "p99", "mean", "iters", "threads", "batch"}


# ----------------------------------------------------------------------------- parity
def test_sqnr_math_is_exact():
    assert sqnr_db([10.0, 0.0], [10.0, 1.0]) == pytest.approx(20.0)  # 10*log10(100 / 1)
    assert sqnr_db([3.0, 4.0], [3.0, 4.5]) == pytest.approx(10 * math.log10(25 / 0.25))  # 20 dB
    assert sqnr_db([1.0, 2.0], [1.0, 2.0]) == math.inf
    assert sqnr_db([0.0, 0.0], [0.0, 1.0]) == -math.inf
    assert sqnr_db([1.0, 2.0], [1.0, float("nan")]) == -math.inf
    assert max_abs([1.0, 2.0, 3.0], [1.5, 2.0, 1.0]) == 2.0
    with pytest.raises(ValueError, match="shape"):
        sqnr_db([1.0, 2.0], [1.0])


def test_top1_and_parity_dict_are_json_safe():
    ref = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)
    test = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)
    assert top1_agreement(ref, test) == 0.75
    p = parity([ref], [test])
    assert p["sqnr_db"] == pytest.approx(10 * math.log10(4 / 2)) and p["max_abs"] == 1.0
    assert p["top1_agreement"] == 0.75
    same = parity([ref], [ref.copy()])
    assert same["sqnr_db"] == SQNR_CAP_DB and same["max_abs"] == 0.0
    broken = parity([ref], [np.full_like(ref, np.nan)])
    assert broken["sqnr_db"] == -SQNR_CAP_DB and broken["max_abs"] is None
    json.dumps([p, same, broken], allow_nan=False)  # report.json stays strict JSON
    emb = parity([np.ones((4,))], [np.ones((4,))])  # not logits: no top-1
    assert emb["top1_agreement"] is None


# ----------------------------------------------------------------------------- cost
def test_count_params_and_macs_exactly():
    lin = nn.Linear(4, 3)
    assert count_params(lin) == 15
    assert count_macs(lin, (torch.randn(2, 4),)) == 12  # per sample: 4 * 3
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 5))
    # conv: 2 out channels x 3x3 positions x 9 taps = 162; linear: 18 x 5 = 90
    assert count_macs(cnn, (torch.randn(4, 1, 5, 5),)) == 252
    assert count_params(cnn) == (2 * 9 + 2) + (18 * 5 + 5)


def test_count_macs_keeps_mode_and_statistics():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model.train()
    before = model[1].running_mean.clone()
    assert count_macs(model, (torch.randn(8, 4),)) == 16
    assert model.training and torch.equal(model[1].running_mean, before)


def test_shared_weights_count_once_in_params_twice_in_macs():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.fc(self.fc(x))

    assert count_params(Twice()) == 16
    assert count_macs(Twice(), (torch.randn(2, 4),)) == 32
