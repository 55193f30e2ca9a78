"""Extension without editing the package: a stage kind and an export target registered by a plugin
module (examples/plugins/toy_plugin.py, loaded through EDGEPREP_PLUGINS) work end to end: recipe load,
run, --resume (the stage's decision replays), their own report sections, the stage's generated
command and `edgeprep export -t npy` with the target's own option."""
from __future__ import annotations

import json
import os

import pytest
from conftest import REPO, error_lines, run_cli

PLUGIN_ENV = {"EDGEPREP_PLUGINS": "toy_plugin",
              "PYTHONPATH": os.pathsep.join([str(REPO / "examples" / "plugins"), os.environ.get("PYTHONPATH", "")])}

RECIPE = """name: toy
model: {source: "toy_plugin:mlp"}
data: {source: digits}
train: {steps: 60, batch_size: 32, lr: 0.01}
stages:
  - {kind: finetune}
  - {kind: noop, label: plugged, repeats: 2}
export: [{target: npy, dtype: float64}, {target: onnx}]
validate: {parity_samples: 64, profile: {warmup: 1, iters: 5}}
gates: {min_sqnr_db: 60}
"""


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("toy")
    (work / "toy.yaml").write_text(RECIPE)
    proc = run_cli("run", str(work / "toy.yaml"), "--out", str(work / "run"), cwd=work, env=PLUGIN_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def test_plugin_stage_runs_and_reports(toy_run):
    report = json.loads((toy_run / "run" / "report.json").read_text())
    noop = [s for s in report["stages"] if s["kind"] == "noop"]
    assert len(noop) == 1 and noop[0]["details"]["noop"] == {"label": "plugged", "repeats": 2}
    assert noop[0]["notes"] == ["noop plugged x2: nothing changed"]
    md = (toy_run / "run" / "report.md").read_text()
    assert "## Noop\n" in md and "noop stage ran with label plugged" in md
    ckpt = json.loads((toy_run / "run" / "stages" / "1-noop" / "checkpoint" / "checkpoint.json").read_text())
    assert {"kind": "noop_mark", "label": "plugged", "repeats": 2} in ckpt["decisions"]


def test_plugin_stage_resumes_and_has_a_command(toy_run):
    proc = run_cli("run", str(toy_run / "toy.yaml"), "--out", str(toy_run / "run"), "--resume", cwd=toy_run,
                   env=PLUGIN_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 1 (noop): done in an earlier run, loaded its checkpoint" in proc.stderr
    proc = run_cli("noop", str(toy_run / "run" / "stages" / "0-finetune"), "-o", str(toy_run / "by-hand"),
                   "--label", "cli", "--repeats", "3", cwd=toy_run, env=PLUGIN_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("noop: noop cli x3: nothing changed; accuracy ")
    report = json.loads((toy_run / "run" / "report.json").read_text())
    assert report["baseline"]["metric"]["value"] > 0.8  # the toy MLP really trained
    proc = run_cli("noop", str(toy_run / "run" / "stages" / "0-finetune"), "-o", str(toy_run / "bad"),
                   "--repeats", "0", cwd=toy_run, env=PLUGIN_ENV)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and "at repeats: Input should be greater than or equal to 1" in lines[0]


def test_without_the_plugin_the_kind_is_unknown(toy_run):
    proc = run_cli("run", str(toy_run / "toy.yaml"), "--out", str(toy_run / "other"), cwd=toy_run)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1
    assert "at stages.1: unknown stage kind 'noop'; valid kinds: finetune, prune, reparam, qat, binarize" in lines[0]


def test_a_plugin_that_does_not_import_is_one_line(tmp_path):
    proc = run_cli("recipes", cwd=tmp_path, env={"EDGEPREP_PLUGINS": "no_such_plugin_module"})
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and "plugin 'no_such_plugin_module'" in lines[0]


def test_plugin_target_exports_and_is_judged(toy_run):
    report = json.loads((toy_run / "run" / "report.json").read_text())
    arts = {a["name"]: a for a in report["artifacts"]}
    npy, onnx = arts["npy"], arts["onnx"]
    assert npy["runtime"] == "numpy" and npy["parity"]["top1_agreement"] == 1.0
    assert npy["parity"]["sqnr_db"] is None or npy["parity"]["sqnr_db"] > 100  # float64 numpy vs the fp32 model
    assert npy["metric"]["value"] == pytest.approx(onnx["metric"]["value"], abs=0.01)
    assert "## npy artifacts\n" in (toy_run / "run" / "report.md").read_text()
    ckpt = toy_run / "run" / "stages" / "1-noop"
    proc = run_cli("export", str(ckpt), "-t", "npy", "--dtype", "float32", "-o", str(toy_run / "npy32"), cwd=toy_run,
                   env=PLUGIN_ENV)
    assert proc.returncode == 0 and proc.stdout.startswith("exported npy: "), proc.stderr[-2000:]
    assert json.loads((toy_run / "npy32" / "manifest.json").read_text())["info"]["dtype"] == "float32"
    proc = run_cli("validate", str(toy_run / "npy32"), "--min-sqnr-db", "60", cwd=toy_run, env=PLUGIN_ENV)
    assert proc.returncode == 0 and "npy32 (numpy): sha256 ok; SQNR " in proc.stdout, proc.stderr[-2000:]
    proc = run_cli("export", str(ckpt), "-t", "onnx", "--dtype", "float64", "-o", str(toy_run / "x"), cwd=toy_run,
                   env=PLUGIN_ENV)  # another target's option is refused by name
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and "at dtype: unknown key 'dtype'" in lines[0], proc.stderr


def test_a_plugin_reusing_a_builtin_kind_is_one_line(tmp_path):
    (tmp_path / "clash_plugin.py").write_text(
        "from edgeprep.recipe import PruneConfig\n"
        "from edgeprep.registry import StageSpec, register_stage\n"
        "register_stage(StageSpec('prune', PruneConfig, object))\n")
    proc = run_cli("recipes", cwd=tmp_path, env={"EDGEPREP_PLUGINS": "clash_plugin", "PYTHONPATH": str(tmp_path)})
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "plugin 'clash_plugin': stage kind 'prune' is already registered; a plugin must pick a new kind" in lines[0]
