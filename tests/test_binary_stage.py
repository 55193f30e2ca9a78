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
def test_binary_onnx_runs_int2_matmulnbits_and_matches_pytorch(tmp_path_factory):
    import collections

    import onnx

    run = finished_run(tmp_path_factory, "binarize", BINARIZE_RECIPE) / "run"
    report = json.loads((run / "report.json").read_text())
    art = {a["name"]: a for a in report["artifacts"]}["onnx"]
    assert art["parity"]["top1_agreement"] >= 0.99 and art["parity"]["sqnr_db"] >= 40.0
    assert art["precision"]["ops"]["MatMulNBits"] == 12  # every binary Linear on the packed kernel
    proto = onnx.load(str(run / "artifacts" / "onnx" / "model.onnx"))
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    # 12 binary Linear inputs + Q, K, V of 3 layers: 1-bit activations; 3 unsigned probability binarizers
    assert ops["Where"] == ops["GreaterOrEqual"] == 12 + 3 * 3 and ops["Round"] == 3
    int2 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT2]
    assert len(int2) == 12
    binary = art["info"]["quantized_graph"]["binary"]
    assert binary["binary_weights"] == sum(int(np.prod(t.dims)) for t in int2)
    assert binary["binary_weight_bytes_on_disk"] == binary["binary_weights"] // 4  # 2 bits each
    md = (run / "report.md").read_text()
    assert "## Binarization" in md and "MFLOPs" in md and f"{binary['binary_weights']:,} binary weights stored as INT2" in md


def test_binarize_cli(fast_run, tmp_path):
    ckpt = fast_run / "stages" / "0-finetune" / "checkpoint"
    out = tmp_path / "bin"
    proc = run_cli("binarize", str(ckpt), "-o", str(out), "--steps", "3", "--estimator-rank", "0")
    assert proc.returncode == 0, proc.stderr
    decision = json.loads((out / "checkpoint.json").read_text())["decisions"][-1]
    assert decision["kind"] == "binarize" and decision["estimator_rank"] == 0

