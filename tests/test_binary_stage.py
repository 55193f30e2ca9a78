"""The binarize stage through `edgeprep run` and `edgeprep binarize`: surgery, distillation, replay,
and the exported ONNX (INT2 binary weights in MatMulNBits, 1-bit activations as GreaterOrEqual +
Where) matching the PyTorch binarized model on ONNX Runtime."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import finished_run, run_cli, tiny_vit_recipe

BINARIZE_RECIPE = tiny_vit_recipe("binarize-e2e", """\
  - kind: binarize
    steps: 60
    label_loss: 1.0
    intervention: gradual
    intervention_steps: 12
    train: {lr: 0.001, warmup_steps: 5}
""")


@pytest.mark.slow
def test_binarize_stage_trains_a_w1a1_model_that_replays(tmp_path_factory):
    from edgeprep.binary.binarizers import ElasticBinarizer
    from edgeprep.binary.modules import BinaryLinear
    from edgeprep.checkpoint import load_checkpoint

    run = finished_run(tmp_path_factory, "binarize", BINARIZE_RECIPE) / "run"
    report = json.loads((run / "report.json").read_text())
    info = report["stages"][1]["details"]["binarize"]
    assert (info["binary_linears"], info["attention_layers"], info["head"]) == (3 * 4, 3, "head")
    assert [h["intervention"] for h in info["history"]][:13] == ["o"] * 2 + ["c"] * 2 + ["m"] * 8 + ["none"]
    assert {"ti_logits", "ti_hidden", "ce"} <= set(info["history"][0]) and "ti_scores" not in info["history"][0]
    acc = info["val_accuracy"]
    assert acc["trained"] > acc["calibrated"] + 0.1  # distillation recovers what binarizing broke
    cost = info["cost"]
    assert cost["binarized"]["binary_macs"] > 0 and cost["fp32"]["binary_macs"] == 0
    assert cost["flops_ratio"] > 1 and cost["bytes_ratio"] > 1

    ckpt = load_checkpoint(run / "stages" / "1-binarize" / "checkpoint")
    model = ckpt.model
    assert sum(isinstance(m, BinaryLinear) and m.w1a1 for m in model.modules()) == 12
    alphas = [float(m.alpha.detach()) for m in model.modules() if isinstance(m, ElasticBinarizer)]
    assert len(alphas) == 12 + 3 * 4 and all(a > 0 for a in alphas)
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32))
    with torch.no_grad():
        lin = model.blocks[0].mlp.fc2
        seen = {}
        handle = lin.register_forward_hook(lambda m, a, o: seen.update(x=m.binary_input(a[0])))
        model(x)
        handle.remove()
    alpha = float(lin.act.alpha.detach())
    assert set(seen["x"].unique().tolist()) <= {-alpha, alpha}  # fc2 really sees 1-bit inputs


@pytest.mark.slow
def test_binary_onnx_stores_one_bit_per_weight_and_matches_pytorch(tmp_path_factory):
    import collections

    import onnx

    run = finished_run(tmp_path_factory, "binarize", BINARIZE_RECIPE) / "run"
    report = json.loads((run / "report.json").read_text())
    art = {a["name"]: a for a in report["artifacts"]}["onnx"]
    assert art["parity"]["top1_agreement"] >= 0.99 and art["parity"]["sqnr_db"] >= 40.0
    proto = onnx.load(str(run / "artifacts" / "onnx" / "model.onnx"))
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    # 12 binary Linear inputs + Q, K, V of 3 layers: 1-bit activations; 3 unsigned probability binarizers
    assert ops["Where"] == ops["GreaterOrEqual"] == 12 + 3 * 3 and ops["Round"] == 3
    assert ops["BitShift"] == ops["BitwiseAnd"] == 12  # one unpack chain per binary weight
    assert not [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT2]
    packed = [t for t in proto.graph.initializer if t.name.endswith(".bits1")]
    assert len(packed) == 12 and {t.data_type for t in packed} == {onnx.TensorProto.UINT8}
    binary = art["info"]["quantized_graph"]["binary"]
    assert binary["binary_weight_bytes_on_disk"] == sum(len(t.raw_data) for t in packed) == binary["binary_weights"] // 8
    assert binary["fp32_binary_weight_bytes"] / binary["binary_weight_bytes_on_disk"] == 32.0  # >= 25x asked
    assert binary["resident_bits_per_binary_weight"] == 32
    assert "MatMulNBits" not in art["precision"]["ops"]  # folded at load into plain fp32 MatMuls
    md = (run / "report.md").read_text()
    assert "## Binarization" in md and "MFLOPs" in md and "32.0x fewer than fp32" in md


def test_packed_signs_round_trip_and_the_graph_unpacks_them_exactly(tmp_path):
    """The ONNX unpack chain (as ORT runs it) gives back exactly the +-alpha weight, for a size
    that is not a multiple of 8; the int2 storage still runs on MatMulNBits."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    from edgeprep.binary.packing import pack_binary_weights, pack_signs, unpack_signs
    from edgeprep.quant.nbits import to_weight_only_nbits

    rng = np.random.default_rng(0)
    k, n = 37, 12  # 444 signs: the last byte is half padding
    signs = rng.choice([-1, 1], size=(k, n)).astype(np.int8)
    np.testing.assert_array_equal(unpack_signs(pack_signs(signs), k * n).reshape(k, n), signs)
    alpha = np.full(n, 0.37, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=1),
         helper.make_node("MatMul", ["x", "wf"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
        [numpy_helper.from_array(signs, "w"), numpy_helper.from_array(alpha, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model, _ = to_weight_only_nbits(model, {"w": 2}, 32)
    x = rng.standard_normal((2, k)).astype(np.float32)
    want = x @ (signs.astype(np.float32) * alpha)

    def run(proto):
        so = onnxruntime.SessionOptions()
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        path = tmp_path / "m.onnx"
        onnx.save(proto, str(path))
        return onnxruntime.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    np.testing.assert_allclose(run(model), want, rtol=1e-5, atol=1e-5)  # INT2 / MatMulNBits
    info = pack_binary_weights(model, ["w"])
    assert info == {"packed": 1, "weights": {"w": [k, n]}}
    assert not [t for t in model.graph.initializer if t.name in ("w", "s")]  # nothing left of the INT2 form
    np.testing.assert_allclose(run(model), want, rtol=1e-5, atol=1e-5)


def test_binarize_cli(fast_run, tmp_path):
    ckpt = fast_run / "stages" / "0-finetune" / "checkpoint"
    out = tmp_path / "bin"
    proc = run_cli("binarize", str(ckpt), "-o", str(out), "--steps", "3", "--estimator-rank", "0")
    assert proc.returncode == 0, proc.stderr
    decision = json.loads((out / "checkpoint.json").read_text())["decisions"][-1]
    assert decision["kind"] == "binarize" and decision["estimator_rank"] == 0

