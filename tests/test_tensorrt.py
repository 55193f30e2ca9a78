"""TensorRT target. Here (no TensorRT, no GPU): the ONNX prepared for TensorRT is checked against
TensorRT's operator table and the Q/DQ rules, and run on ONNX Runtime for parity. Engine building,
the Polygraphy comparison with ONNX Runtime and latency run only where TensorRT and a GPU exist."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgeprep.errors import ExportError, MissingDependencyError, RuntimeFailure
from edgeprep.exporters import get_exporter, get_runtime
from edgeprep.exporters.onnx import OnnxOptions
from edgeprep.exporters.onnx_ptq import ptq_peers
from edgeprep.exporters.tensorrt import (
    SUPPORT_TABLE,
    TensorRTOptions,
    fold_int32_bias_dq,
    quantize_for_tensorrt,
    support_table,
    tensorrt_support,
)
from edgeprep.measure.parity import parity
from edgeprep.quant.convert import quantize_model
from edgeprep.validate import judge, run_batched

TRT_USABLE, TRT_WHY = get_runtime("tensorrt").usable_here()


@pytest.fixture(scope="module")
def trained(digits_mlp):
    model, x, xt, _ = digits_mlp
    return model, x, xt


def _ort(art, x):
    return run_batched(get_runtime("onnxruntime").load(art), x)


def test_support_table_is_data_with_its_source():
    table = json.loads(SUPPORT_TABLE.read_text())
    assert table["tensorrt_version"] == "10.0" and "onnx-tensorrt" in table["source"]
    ops = table["ops"]
    assert ops["MatMul"]["supported"] and ops["DequantizeLinear"]["supported"]
    assert not ops["BitShift"]["supported"] and not ops["MatMulInteger"]["supported"]
    assert len(ops) > 150 and support_table() == table


def test_fp32_export_with_profile_and_full_support(trained, tmp_path):
    model, x, xt = trained
    art = get_exporter("tensorrt").export(model, (torch.from_numpy(x[:2]),), tmp_path / "trt",
                                          TensorRTOptions(static_batch=4, max_batch=16))
    assert art.runtime == "tensorrt" and art.path.name == "model.onnx"
    assert art.info["tensorrt_profile"] == {art.inputs[0].name: [[1, 64], [4, 64], [16, 64]]}
    support = art.info["tensorrt_support"]
    assert support["all_supported"] and support["nodes"] == support["supported_nodes"] > 0
    with torch.no_grad():
        ref = model(torch.from_numpy(xt)).numpy()
    assert parity([ref], [_ort(art, xt)])["sqnr_db"] >= 60.0  # the same fp32 ONNX, on ORT here


def test_int8_peer_follows_tensorrt_explicit_quantization(trained, tmp_path):
    model, x, xt = trained
    art = get_exporter("tensorrt").export(model, (torch.from_numpy(x[:2]),), tmp_path / "trt", TensorRTOptions())
    q = quantize_for_tensorrt(art, [x[:256]], tmp_path / "trt-int8")
    support = q.info["tensorrt_support"]
    assert support["all_supported"] and support["quantize_nodes"] >= 2 and support["dequantize_nodes"] >= 4
    import onnx
    from onnx import TensorProto, numpy_helper

    proto = onnx.load(str(q.path))
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[node.input[2]]
            assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any()  # symmetric int8
    # bias stays float: no int32 tensor anywhere
    assert not [t.name for t in proto.graph.initializer if t.data_type == TensorProto.INT32]
    with torch.no_grad():
        ref = model(torch.from_numpy(xt)).numpy()
    p = parity([ref], [_ort(q, xt)])
    assert p["top1_agreement"] >= 0.97 and p["sqnr_db"] >= 20.0


def test_qat_int8_keeps_its_qdq_and_folds_the_int32_bias(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    quantize_model(model, "int8", "int8")
    x = torch.randn(64, 64)
    model.train()(x)
    model.eval()
    art = get_exporter("tensorrt").export(model, (x[:2],), tmp_path / "trt", TensorRTOptions())
    assert art.info["bias_dq_folded"] == 2 and art.info["bias_fold_max_abs_change"] <= 1e-5
    assert art.info["strongly_typed"] and art.info["tensorrt_support"]["all_supported"]
    with torch.no_grad():
        ref = model(x).numpy()
    got = _ort(art, x.numpy())
    assert np.abs(got - ref).max() <= 1e-4  # same integers, same scales as the QAT model
    # the plain ONNX export of the same model keeps int32 bias DQs: the check names them
    plain = get_exporter("onnx").export(model, (x[:2],), tmp_path / "onnx", OnnxOptions())
    report = tensorrt_support(plain.path)
    assert not report["all_supported"] and report["unsupported_ops"] == ["DequantizeLinear"]
    assert report["unsupported"][0]["count"] == 2 and "INT32 quantized type" in report["unsupported"][0]["why"]


def test_the_check_names_what_tensorrt_cannot_take(trained, tmp_path):
    model, x, _ = trained
    art = get_exporter("onnx").export(model, (torch.from_numpy(x[:2]),), tmp_path / "onnx", OnnxOptions())
    # ORT's own x86 PTQ: asymmetric uint8 activations, which TensorRT does not take
    static = ptq_peers(art, [x[:128]], tmp_path, kinds=["static"])[0]
    report = tensorrt_support(static.path)
    assert "QuantizeLinear" in report["unsupported_ops"] and "DequantizeLinear" in report["unsupported_ops"]
    whys = " ".join(u["why"] for u in report["unsupported"])
    assert "non-zero zero point" in whys or "UINT8 quantized type" in whys
    # int4 weights: refused for tensorrt; their ONNX (blocked INT4 DequantizeLinear) needs opset 21,
    # beyond the table's TensorRT 10.0 range, and the check says so
    int4 = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    quantize_model(int4, "int4", "none")
    with pytest.raises(ExportError, match="int4 weights; only int8 QAT"):
        get_exporter("tensorrt").export(int4.eval(), (torch.randn(2, 64),), tmp_path / "trt4", TensorRTOptions())
    nbits = get_exporter("onnx").export(int4.eval(), (torch.randn(2, 64),), tmp_path / "onnx4", OnnxOptions())
    report = tensorrt_support(nbits.path)
    assert report["opset"] == 21 and not report["opset_supported"] and not report["all_supported"]
    # a contrib op (what ORT's extended optimizations or ORT-specific exports produce)
    import onnx
    from onnx import TensorProto, helper

    x_ = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y_ = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    nodes = [helper.make_node("FusedMatMul", ["x", "x"], ["t"], domain="com.microsoft", transB=1),
             helper.make_node("BitShift", ["t", "t"], ["u"], direction="LEFT"), helper.make_node("Relu", ["u"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x_], [y_]),
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(tmp_path / "contrib.onnx"))
    report = tensorrt_support(tmp_path / "contrib.onnx")
    assert report["nodes"] == 3 and report["supported_nodes"] == 1
    assert report["unsupported_ops"] == ["BitShift", "FusedMatMul"]
    whys = {u["op"]: u["why"] for u in report["unsupported"]}
    assert "com.microsoft op" in whys["FusedMatMul"] and "marked unsupported" in whys["BitShift"]


def test_fold_leaves_a_float_model_untouched(trained, tmp_path):
    model, x, _ = trained
    art = get_exporter("onnx").export(model, (torch.from_numpy(x[:2]),), tmp_path / "onnx", OnnxOptions())
    before = art.path.read_bytes()
    assert fold_int32_bias_dq(art.path) == 0
    assert art.path.read_bytes() == before


@pytest.mark.skipif(TRT_USABLE, reason="checks the behaviour where TensorRT cannot run")
def test_without_tensorrt_the_runtime_says_why(trained, tmp_path):
    model, x, _ = trained
    art = get_exporter("tensorrt").export(model, (torch.from_numpy(x[:2]),), tmp_path / "trt", TensorRTOptions())
    assert "needs an NVIDIA GPU" in TRT_WHY or "no usable NVIDIA GPU" in TRT_WHY or "cannot start" in TRT_WHY
    expected = MissingDependencyError if "not installed" in TRT_WHY else RuntimeFailure
    with pytest.raises(expected, match="tensorrt|TensorRT"):
        get_runtime("tensorrt").load(art)
    x = np.zeros((2, 64), np.float32)
    entry = judge(art, task="classification", ref_inputs=x, ref_outputs=x[:, :10], eval_x=None, eval_y=None,
                  warmup=1, iters=5, threads=1, batch=1)
    assert entry["not_run"] == TRT_WHY and entry["parity"] is None


@pytest.mark.skipif(not TRT_USABLE, reason=f"TensorRT engine build needs TensorRT and an NVIDIA GPU: {TRT_WHY}")
def test_engine_build_matches_onnxruntime_and_reports_latency(trained, tmp_path):  # pragma: no cover - GPU only
    from edgeprep.exporters.tensorrt import compare_with_onnxruntime

    model, x, xt = trained
    art = get_exporter("tensorrt").export(model, (torch.from_numpy(x[:2]),), tmp_path / "trt",
                                          TensorRTOptions(static_batch=8, max_batch=32))
    loaded = get_runtime("tensorrt").load(art)
    with torch.no_grad():
        ref = model(torch.from_numpy(xt)).numpy()
    got = run_batched(loaded, xt, batch_size=32)
    assert parity([ref], [got])["sqnr_db"] >= 30.0  # fp16 engine
    assert compare_with_onnxruntime(art, [xt[:8]], atol=1e-2, rtol=1e-2)["passed"]
    stats = loaded.profile([xt[:8]], warmup=10, iters=50)
    assert 0 < stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    q = quantize_for_tensorrt(art, [x[:256]], tmp_path / "trt-int8")
    got8 = run_batched(get_runtime("tensorrt").load(q), xt, batch_size=32)
    assert np.mean(got8.argmax(-1) == ref.argmax(-1)) >= 0.97


def test_profile_varies_the_batch_only():
    from edgeprep.exporters.tensorrt import _profile
    from edgeprep.types import TensorSpec

    opts = TensorRTOptions(static_batch=8, max_batch=64)
    assert _profile([TensorSpec("x", ("batch", 3, 32, 32), "float32")], opts) == {
        "x": [[1, 3, 32, 32], [8, 3, 32, 32], [64, 3, 32, 32]]}
    with pytest.raises(ExportError, match="dynamic axes \\['seq'\\] besides the batch"):
        _profile([TensorSpec("ids", ("batch", "seq"), "int64")], opts)
