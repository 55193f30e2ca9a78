"""The prune stage through `edgeprep run` and `edgeprep prune`: budgets, runtime parity, replay, reports."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import error_lines, finished_run, run_cli

from edgeprep.errors import RecipeError
from edgeprep.recipe import parse_recipe

PRUNE_RECIPE = """\
name: prune-e2e
seed: 0
model: {source: vit-tiny-digits}
data: {source: digits}
train: {steps: 200, batch_size: 64, lr: 0.003, warmup_steps: 20}
stages:
  - kind: finetune
  - kind: prune
    pruning_ratio: 0.4
    ratio_per_stage: 0.2
    train: {steps: 60}
export:
  - target: onnx
validate:
  profile: {warmup: 5, iters: 30}
"""


@pytest.fixture(scope="module")
def prune_run(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory, "prune-run", PRUNE_RECIPE)


@pytest.mark.slow
def test_recipe_prunes_to_budget_and_runtime_matches(prune_run):
    report = json.loads((prune_run / "run" / "report.json").read_text())
    stage = report["stages"][1]
    info = stage["details"]["pruning"]
    assert stage["kind"] == "prune"
    assert info["removed"]["params"] == pytest.approx(0.4, abs=0.02)
    assert info["params_after"] == stage["params"] == report["model"]["params"]
    assert report["baseline"]["params"] == info["params_before"] == 102_666
    assert [h["stage"] for h in info["history"]] == [1, 2]
    assert info["history"][0]["removed"] == pytest.approx(0.2, abs=0.02)
    assert any(layer["kept"] < layer["original"] for layer in info["layers"] if layer["unit"] == "heads")
    arts = {a["name"]: a for a in report["artifacts"]}
    assert set(arts) == {"onnx", "onnx-baseline"}
    assert arts["onnx"]["parity"]["max_abs"] <= 1e-4  # ORT vs the pruned PyTorch model
    assert arts["onnx"]["bytes"] < 0.7 * arts["onnx-baseline"]["bytes"]
    assert report["passed"] is True


@pytest.mark.slow
def test_exported_graph_is_physically_smaller_and_checkpoint_replays(prune_run):
    import onnx
    import torch

    from edgeprep.checkpoint import load_checkpoint

    run = prune_run / "run"
    ck = load_checkpoint(run / "stages" / "1-prune" / "checkpoint")
    kinds = {d["kind"] for d in ck.decisions}
    assert kinds <= {"vit_heads", "vit_mlp"} and "vit_mlp" in kinds
    graph = onnx.load(str(run / "artifacts" / "onnx" / "model.onnx")).graph
    onnx_params = sum(int(np.prod(t.dims)) for t in graph.initializer)
    torch_params = sum(p.numel() for p in ck.model.parameters())
    assert onnx_params <= torch_params + 64  # no hidden full-size copies (a few folded constants at most)
    assert torch_params < 0.62 * 102_666
    ref = np.load(run / "artifacts" / "onnx" / "reference.npz")
    x = torch.from_numpy(ref[[k for k in ref.files if k.startswith("input")][0]])
    with torch.no_grad():
        out = ck.model(x).numpy()
    expected = ref[[k for k in ref.files if k.startswith("output")][0]]
    assert np.abs(out - expected).max() <= 1e-5  # the reloaded checkpoint is the model that was exported


@pytest.mark.slow
def test_report_shows_per_layer_sparsity(prune_run):
    run = prune_run / "run"
    md = (run / "report.md").read_text()
    assert "## Pruning" in md and "blocks.0.mlp" in md
    assert (run / "plots" / "prune_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64" in (run / "report.html").read_text()


@pytest.mark.slow
def test_resume_reuses_the_pruned_checkpoint(prune_run):
    proc = run_cli("run", "r.yaml", "--out", "run", "--resume", cwd=prune_run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage 1 (prune): done in an earlier run" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_cli_prune_export_validate(prune_run, tmp_path):
    from edgeprep.checkpoint import load_checkpoint

    stage0 = prune_run / "run" / "stages" / "0-finetune"
    proc = run_cli("prune", str(stage0), "-o", str(tmp_path / "p"), "--ratio", "0.3", "--steps", "20",
                   "--ratio-per-stage", "0.15", "--allocation", "uniform", "--budget", "macs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MACs" in proc.stdout and "-> " in proc.stdout
    meta = load_checkpoint(tmp_path / "p").meta["last_stage"]
    removed = meta["details"]["pruning"]["removed"]
    assert removed["macs"] == pytest.approx(0.3, abs=0.02)
    proc = run_cli("export", str(tmp_path / "p"), "--target", "onnx", "-o", str(tmp_path / "onnx"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("validate", str(tmp_path / "onnx"), "--min-sqnr-db", "40", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["parity"]["max_abs"] <= 1e-4


@pytest.mark.parametrize("args,needle", [
    (["--ratio", "1.5"], "pruning_ratio"),
    (["--ratio", "0.5", "--units", "channels"], "no channels units; it has: heads, mlp"),
    (["--ratio", "0.5", "--allocation", "greedy"], "allocation"),
    (["--ratio", "0.99", "--units", "heads"], "prunable units hold only"),
])
def test_cli_prune_bad_input_is_one_line_exit_2(prune_run, tmp_path, args, needle):
    out = tmp_path / "never"
    proc = run_cli("prune", str(prune_run / "run" / "stages" / "0-finetune"), "-o", str(out), *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not out.exists()  # nothing half-written


def test_prune_recipe_validation():
    base = {"name": "x", "model": {"source": "vit-tiny-digits"}}
    ok = parse_recipe({**base, "stages": [{"kind": "prune", "pruning_ratio": 0.5}]})
    st = ok.stages[0]
    assert (st.allocation, st.schedule, st.importance, st.budget, st.amplitude) == \
        ("adaptive", "incremental", "taylor", "params", 0.02)
    assert st.distill is not None  # distillation from the unpruned model is on by default
    for stage, where in [({"kind": "prune", "pruning_ratio": 0.5, "pruning_rate": 0.5}, "stages.0.pruning_rate"),
                         ({"kind": "prune", "pruning_ratio": 1.0}, "stages.0.pruning_ratio"),
                         ({"kind": "prune", "pruning_ratio": 0.5, "units": []}, "stages.0.units"),
                         ({"kind": "prune", "pruning_ratio": 0.5, "units": ["heads", "heads"]}, "stages.0.units"),
                         ({"kind": "prune", "pruning_ratio": 0.5, "schedule": "gradual"}, "stages.0.schedule")]:
        with pytest.raises(RecipeError, match=where.replace(".", r"\.")):
            parse_recipe({**base, "stages": [stage]})


def test_quickstart_has_a_prune_stage_then_qat():
    from edgeprep.recipe import load_recipe
    from edgeprep.recipes_index import resolve_recipe

    kinds = [s.kind for s in load_recipe(resolve_recipe("quickstart")).stages]
    assert kinds == ["finetune", "prune", "qat"]
