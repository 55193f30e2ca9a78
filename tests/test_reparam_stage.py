"""The reparam stage through `edgeprep run` and `edgeprep reparam`: no LayerNorm / BatchNorm /
Softmax left in the ONNX, ORT parity, the lam schedule finishing (or export refusing), resume of an
unfinished schedule, reparam -> qat, and bad options."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from conftest import error_lines, finished_run, run_cli, tiny_vit_recipe

SLA_RECIPE = tiny_vit_recipe("reparam-sla", """\
  - kind: reparam
    attention: sla
    steps: 120
    train: {lr: 0.001, warmup_steps: 10, eval_every: 20}
""", extra="""\
gates:
  max_metric_drop: 0.03
""")

QAT_AFTER_REPARAM = tiny_vit_recipe("reparam-qat", """\
  - kind: reparam
    steps: 60
    warmup_steps: 5
    decay_steps: 30
    train: {lr: 0.001, warmup_steps: 10}
  - kind: qat
    steps: 30
    intervention_steps: 9
    train: {lr: 0.0003, warmup_steps: 4}
""")


def _ops(path: Path) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def sla_run(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory, "reparam-sla", SLA_RECIPE)


@pytest.mark.slow
def test_prepbn_sla_run_exports_no_norm_no_softmax_and_matches_pytorch(sla_run):
    report = json.loads((sla_run / "run" / "report.json").read_text())
    info = report["stages"][1]["details"]["reparam"]
    # defaults: 10% warmup, 50% decay; the schedule ran on optimizer steps to lam = 0
    assert (info["warmup_steps"], info["decay_steps"], info["schedule_steps_done"]) == (12, 60, 120)
    assert info["lam"] == 0.0 and info["norms"] == 3 * 2 + 1 and info["sla_layers"] == 3
    assert len(info["history"]) == 120 and {"ce", "kd", "hidden"} <= set(info["history"][0])
    acc = info["val_accuracy"]
    assert acc["trained"] >= acc["before"] - 0.03  # converted and distilled without collapsing
    ops = _ops(sla_run / "run" / "artifacts" / "onnx" / "model.onnx")
    assert ops["LayerNormalization"] == ops["BatchNormalization"] == ops["Softmax"] == 0
    assert ops["ReduceMean"] == 0 and ops["Sqrt"] == 0  # no normalization written out by hand either
    assert _ops(sla_run / "run" / "artifacts" / "onnx-baseline" / "model.onnx")["LayerNormalization"] == 7
    art = {a["name"]: a for a in report["artifacts"]}["onnx"]
    assert art["parity"]["sqnr_db"] >= 40.0 and art["parity"]["top1_agreement"] == 1.0
    assert report["passed"]
    md = (sla_run / "run" / "report.md").read_text()
    assert "## Re-parameterization" in md and "schedule at step 120, lam 0" in md


@pytest.mark.slow
def test_checkpoint_replays_prepbn_and_sla(sla_run):
    from edgeprep.checkpoint import load_checkpoint
    from edgeprep.reparam.fold import export_form
    from edgeprep.reparam.norms import PRepBN
    from edgeprep.reparam.sla import SimplifiedLinearAttention

    ckpt = load_checkpoint(sla_run / "run" / "stages" / "1-reparam" / "checkpoint")
    model = ckpt.model
    norms = [m for m in model.modules() if isinstance(m, PRepBN)]
    assert len(norms) == 7 and all(int(n.steps_done) == 120 and n.lam == 0.0 for n in norms)
    assert sum(isinstance(m, SimplifiedLinearAttention) for m in model.modules()) == 3
    import numpy as np

    x = torch.from_numpy(np.load(sla_run / "run" / "artifacts" / "onnx" / "reference.npz")["input_0"])
    folded = export_form(model, (x[:2],))
    with torch.no_grad():
        assert float((folded(x) - model(x)).abs().max()) <= 1e-5


def test_unfinished_schedule_refuses_export_then_resumes(fast_run, tmp_path):
    """10 steps of a 5 + 20 schedule leave lam = 0.75: export is refused (exit 2, nothing written);
    running the stage again continues from step 10 and finishes."""
    ckpt = fast_run / "stages" / "0-finetune" / "checkpoint"
    part = tmp_path / "part"
    proc = run_cli("reparam", str(ckpt), "-o", str(part), "--steps", "10", "--warmup-steps", "5",
                   "--decay-steps", "20", "--lr", "0.0005")
    assert proc.returncode == 0, proc.stderr
    assert "lam is still 0.75 after 10 of 25 schedule steps" in proc.stdout
    art = tmp_path / "art"
    proc = run_cli("export", str(part), "--target", "onnx", "-o", str(art))
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "lam 0.75 after 10 of the 25 warmup + decay steps" in line and "--steps 15" in line
    assert not art.exists()

    done = tmp_path / "done"
    proc = run_cli("reparam", str(part), "-o", str(done), "--steps", "15", "--lr", "0.0005")
    assert proc.returncode == 0, proc.stderr
    assert "continued the PRepBN schedule" in proc.stdout
    meta = json.loads((done / "checkpoint.json").read_text())
    assert [d["kind"] for d in meta["decisions"]] == ["reparam"]  # no second surgery
    assert meta["meta"]["last_stage"]["details"]["reparam"]["schedule_steps_done"] == 25
    proc = run_cli("export", str(done), "--target", "onnx", "-o", str(art))
    assert proc.returncode == 0, proc.stderr
    ops = _ops(art / "model.onnx")
    assert ops["LayerNormalization"] == 0 and ops["BatchNormalization"] == 0 and ops["Softmax"] == 3

    proc = run_cli("reparam", str(done), "-o", str(tmp_path / "again"), "--steps", "5")
    assert proc.returncode == 2 and "already finished" in error_lines(proc)[0]


@pytest.mark.slow
def test_qat_after_reparam_quantizes_the_folded_weights(tmp_path_factory):
    run = finished_run(tmp_path_factory, "reparam-qat", QAT_AFTER_REPARAM) / "run"
    ckpt = json.loads((run / "stages" / "2-qat" / "checkpoint" / "checkpoint.json").read_text())
    assert [d["kind"] for d in ckpt["decisions"]] == ["reparam", "reparam_fold", "qat"]
    ops = _ops(run / "artifacts" / "onnx" / "model.onnx")
    assert ops["LayerNormalization"] == 0 and ops["BatchNormalization"] == 0
    report = json.loads((run / "report.json").read_text())
    art = {a["name"]: a for a in report["artifacts"]}["onnx"]
    assert art["precision"]["low_precision_ops"] == 19 and art["precision"]["float_ops"] == 1  # the patch Conv
    assert art["parity"]["top1_agreement"] >= 0.99


@pytest.mark.parametrize("stage, message", [
    ("{kind: reparam, steps: 10, warmup_steps: 5, decay_steps: 10}",
     "stages.0: warmup_steps + decay_steps (5 + 10) exceed the stage's 10 steps"),
    ("{kind: reparam, norm: bn, warmup_steps: 5}", "warmup_steps / decay_steps apply to norm: prepbn, not bn"),
    ("{kind: reparam, attention: softmax}", "attention"),
    ("{kind: reparam, attention: sla}\n  - {kind: qat}", "qat after reparam with attention: sla (stages.0)"),
])
def test_bad_reparam_options_are_one_line_recipe_errors(tmp_path, stage, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: bad\nmodel: {{source: vit-tiny-digits}}\nstages:\n  - {stage}\n")
    proc = run_cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert message in line and "stages." in line


def test_sla_on_a_cnn_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: bad\nmodel: {source: cnn-bench}\ntrain: {steps: 2}\n"
                      "stages:\n  - {kind: reparam, attention: sla, steps: 2}\n")
    proc = run_cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "attention: sla supports edgeprep's ViT models" in error_lines(proc)[0]
