"""Bad input -> one line naming the problem and the fix, exit 2, never a traceback."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli, stderr_lines

GOOD = "name: t\nmodel: {source: vit-tiny-digits}\n"

# (id, recipe text or None for "no file", extra CLI args, fragment the one line must contain)
RECIPE_CASES = [
    ("malformed-yaml", "name: t\nmodel: {source: [\n", [], "malformed YAML"),
    ("not-a-mapping", "- just\n- a list\n", [], "must be a YAML mapping"),
    ("empty-file", "", [], "must be a YAML mapping"),
    ("unknown-top-key", GOOD + "stagez: []\n", [], "unknown key 'stagez'"),
    ("unknown-stage-key", GOOD + "stages:\n  - kind: finetune\n  - kind: finetune\n    pruning_ratio: 0.5\n",
     [], "stages.1.pruning_ratio"),
    ("wrong-type", GOOD + "train: {steps: many}\n", [], "train.steps"),
    ("negative-lr", GOOD + "stages:\n  - kind: finetune\n    train: {lr: -1}\n", [], "stages.0.train.lr"),
    ("unknown-stage-kind", GOOD + "stages:\n  - kind: sparsify\n", [], "unknown stage kind 'sparsify'"),
    ("stage-without-kind", GOOD + "stages:\n  - {steps: 3}\n", [], "has no `kind`"),
    ("unknown-target", GOOD + "export:\n  - target: tflite\n", [], "unknown target 'tflite'"),
    ("opset-too-old", GOOD + "export:\n  - {target: onnx, opset: 13}\n", [], "export.0.opset"),
    ("missing-model", "name: t\n", [], "model"),
    ("bad-name", "name: 'a b'\nmodel: {source: vit-tiny-digits}\n", [], "name"),
    ("bad-split", GOOD + "validate: {split: dev}\n", [], "validate.split"),
    ("unknown-profile-key", GOOD + "validate: {profile: {bogus: 1}}\n", [], "validate.profile.bogus"),
    ("duplicate-artifact", GOOD + "export:\n  - {target: onnx}\n  - {target: onnx}\n", [], "used twice"),
    ("unknown-zoo-model", "name: t\nmodel: {source: vit-huge}\n", [], "vit-huge"),
    ("missing-model-file", "name: t\nmodel: {source: ./nope.pt2}\n", [], "nope.pt2"),
    ("missing-data-file", GOOD + "data: {source: ./nope.npz}\n", [], "nope.npz"),
    ("data-shape-mismatch", GOOD + "data: {source: digits32}\n", [], "digits32"),
    ("binary-recipe", None, [], "not a text file"),
    ("artifact-name-escapes", GOOD + "export:\n  - {target: onnx, name: ../stages}\n", [], "export.0.name"),
    ("derived-name-clash", GOOD + "export:\n  - {target: onnx, ptq: [dynamic]}\n  - {target: onnx, name: onnx-ptq-dynamic}\n",
     [], "onnx-ptq-dynamic"),
    ("ptq-on-ort-mobile", GOOD + "export:\n  - {target: ort-mobile, ptq: [static]}\n", [],
     "at export.0.ptq: unknown key 'ptq'; it is an option of target onnx only"),
    ("qat-to-executorch", GOOD + "stages:\n  - {kind: qat}\nexport:\n  - {target: onnx}\n  - {target: executorch}\n",
     [], "export.1: target executorch cannot take the QAT model of stages.0"),
    ("qat-to-litert", GOOD + "stages:\n  - {kind: qat}\nexport:\n  - {target: litert}\n",
     [], "export.0: target litert cannot take the QAT model"),
]


@pytest.mark.parametrize("case_id,text,extra,fragment", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe_is_one_line_exit_2(tmp_path, case_id, text, extra, fragment):
    recipe = tmp_path / "r.yaml"
    if text is None:
        recipe.write_bytes(b"\xff\xfe\x00\x01garbage\x80")
    else:
        recipe.write_text(text)
    proc = run_cli("run", str(recipe), "--out", str(tmp_path / "run"), *extra, cwd=tmp_path)
    lines = stderr_lines(proc)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert fragment in lines[0], lines[0]
    # Nothing is written for a recipe that fails to load or whose model/data are wrong.
    assert not (tmp_path / "run" / "report.json").exists()


CLI_CASES = [
    ("missing-recipe", ["run", "does-not-exist.yaml"], "not found"),
    ("unknown-option", ["run", "quickstart", "--frobnicate"], "--frobnicate"),
    ("validate-missing-dir", ["validate", "no/such/dir"], "manifest.json"),
    ("profile-missing", ["profile", "no/such/model.onnx"], "no such artifact"),
    ("profile-unknown-suffix", ["profile", "README.md"], "unknown model file type"),
    ("check-missing-report", ["check", "nope.json", "--baseline", "nope2.json"], "nope"),
    ("export-missing-ckpt", ["export", "no/ckpt", "--target", "onnx", "-o", "out"], "no/ckpt"),
]


@pytest.mark.parametrize("case_id,args,fragment", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input_is_one_line_exit_2(tmp_path, case_id, args, fragment):
    if case_id == "profile-unknown-suffix":
        (tmp_path / "README.md").write_text("# not a model\n")
    proc = run_cli(*args, cwd=tmp_path)
    lines = stderr_lines(proc)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert fragment in lines[0], lines[0]


def test_force_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "r.yaml").write_text(GOOD)
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "report.json").write_text("{}")  # looks like results, but edgeprep did not write it
    proc = run_cli("run", "r.yaml", "--out", str(precious), "--force", cwd=tmp_path)
    assert proc.returncode == 2 and "not an edgeprep run directory" in proc.stderr
    assert (precious / "report.json").read_text() == "{}"


@pytest.mark.parametrize("manifest", ["[1, 2]", '{"schema": "edgeprep.manifest/1"}', "{not json"])
def test_malformed_manifest_is_exit_3_one_line(tmp_path, manifest):
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text(manifest)
    proc = run_cli("validate", str(art), cwd=tmp_path)
    lines = stderr_lines(proc)
    assert proc.returncode == 3 and len(lines) == 1 and "re-export" in lines[0], proc.stderr


@pytest.mark.parametrize("target", ["executorch", "litert"])
def test_qat_checkpoint_to_a_torch_export_target_is_refused_before_writing(tmp_path, target):
    """By hand (`edgeprep export CKPT -t executorch`), a QAT checkpoint gets the same one line, exit 2,
    and no artifact directory (torch.export cannot trace the fake quantizers)."""
    import torch

    from edgeprep.checkpoint import save_checkpoint
    from edgeprep.models import build_zoo_model
    from edgeprep.quant.convert import quantize_model
    from edgeprep.recipe import DataConfig, ModelConfig

    model = build_zoo_model("vit-tiny-digits").module
    decision = quantize_model(model, "int8", "int8")
    model(torch.zeros(2, 1, 8, 8))  # the first batch initialises the activation scales
    meta = {"stage": 0, "kind": "qat", "input_shape": [1, 8, 8], "task": "classification",
            "data": DataConfig(source="digits").model_dump(mode="json")}  # what `edgeprep run` writes
    save_checkpoint(tmp_path / "ckpt", model, ModelConfig(source="vit-tiny-digits"), [decision], meta)
    proc = run_cli("export", str(tmp_path / "ckpt"), "-t", target, "-o", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = stderr_lines(proc)
    assert len(lines) == 1 and f"a QAT (fake-quant) model cannot be exported to {target}" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_version_flag_prints_the_package_version(tmp_path):
    from edgeprep import __version__

    proc = run_cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"edgeprep {__version__}"


def test_every_declared_dependency_is_imported():
    """A declared dependency nothing imports (psutil was one) only costs users an install."""
    import re

    import tomllib

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in deps}
    import_names = {"scikit-learn": "sklearn", "pyyaml": "yaml", "pillow": "PIL", "onnxscript": "onnxscript"}
    code = "\n".join(p.read_text() for d in ("edgeprep", "exporters") for p in (root / d).rglob("*.py"))
    # onnxscript is what torch.onnx's dynamo exporter imports (never by name here)
    unused = [n for n in sorted(names - {"onnxscript"})
              if not re.search(rf"^\s*(import|from)\s+{re.escape(import_names.get(n, n))}\b", code, re.M)]
    assert unused == [], f"declared in pyproject.toml but never imported: {unused}"


def test_export_fails_when_its_own_self_check_misses_the_expectation(fast_run, tmp_path):
    """issue 22.3: a self-check below the expectation exits 1 with one line (it used to exit 0)."""
    import json

    ckpt = fast_run / "stages" / "0-finetune" / "checkpoint"
    ok = run_cli("export", str(ckpt), "-t", "onnx", "-o", str(tmp_path / "ok"), "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    check = json.loads(ok.stdout)["check_sqnr_db"]
    assert check > 100  # fp32 vs PyTorch: measured ~130 dB
    bad = run_cli("export", str(ckpt), "-t", "onnx", "-o", str(tmp_path / "bad"), "--min-sqnr-db", "250", cwd=tmp_path)
    assert bad.returncode == 1
    lines = stderr_lines(bad)
    assert len(lines) == 1 and "self-check" in lines[0] and "below the 250 dB expected" in lines[0]
    assert (tmp_path / "bad" / "manifest.json").is_file()  # kept whole, for validate to explain
    assert json.loads((tmp_path / "bad" / "manifest.json").read_text())["expect"]["min_sqnr_db"] == 250
