"""The binarize stage through `edgeprep run` and `edgeprep binarize`: surgery, distillation, replay,
and the recipe refusing an export that does not exist yet."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import error_lines, finished_run, run_cli

BINARIZE_RECIPE = """\
name: binarize-e2e
seed: 0
model: {source: vit-tiny-digits}
data: {source: digits, calibration_samples: 64}
train: {steps: 250, batch_size: 64, lr: 0.003, warmup_steps: 20}
stages:
  - kind: finetune
  - kind: binarize
    steps: 60
    label_loss: 1.0
    intervention: gradual
    intervention_steps: 12
    train: {lr: 0.001, warmup_steps: 5}
"""


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


def test_binarize_cli_and_export_refused(fast_run, tmp_path):
    ckpt = fast_run / "stages" / "0-finetune" / "checkpoint"
    out = tmp_path / "bin"
    proc = run_cli("binarize", str(ckpt), "-o", str(out), "--steps", "3", "--estimator-rank", "0")
    assert proc.returncode == 0, proc.stderr
    decision = json.loads((out / "checkpoint.json").read_text())["decisions"][-1]
    assert decision["kind"] == "binarize" and decision["estimator_rank"] == 0

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: bad\nmodel: {source: vit-tiny-digits}\nstages:\n  - {kind: binarize}\n"
                      "export:\n  - target: onnx\n")
    proc = run_cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "binarized models cannot be exported yet" in error_lines(proc)[0]
