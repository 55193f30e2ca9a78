"""Bad input that used to reach the CLI's "unexpected" catch-all (exit 3) or hid problems: each is
now one line with the documented exit code. Also the `recipes` listing and `check --save-baseline`."""
from __future__ import annotations

import json
import shutil

import yaml
from conftest import REPO, error_lines, run_cli

DEPTH = 5000  # past Python's recursion limit (1000) in PyYAML's composer and in json's decoder


def _one_error(proc, code: int, *fragments: str) -> str:
    lines = error_lines(proc)
    assert proc.returncode == code and len(lines) == 1, (proc.returncode, proc.stderr[-2000:])
    assert "unexpected" not in lines[0] and all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def test_deeply_nested_recipe_is_bad_input(tmp_path):
    head = "name: deep\nmodel:\n  source: vit-tiny-digits\n"
    for name, tail in {"lists.yaml": "extra: " + "[" * DEPTH + "]" * DEPTH,
                       "maps.yaml": "  kwargs: " + "{a: " * DEPTH + "1" + "}" * DEPTH}.items():
        (tmp_path / name).write_text(head + tail + "\n")
        proc = run_cli("run", str(tmp_path / name), "--out", str(tmp_path / "run"), cwd=tmp_path)
        _one_error(proc, 2, name, "nested thousands of levels deep")
        assert not (tmp_path / "run").exists()  # refused before anything was written


def test_every_unknown_key_is_named_up_to_a_cap(tmp_path):
    (tmp_path / "typo.yaml").write_text("name: t\nmodel: {source: vit-tiny-digits, sourc: x}\n"
                                        "data: {source: digits, val_fractoin: 0.1}\nstages: [{kind: finetune, step: 3}]\n")
    proc = run_cli("run", str(tmp_path / "typo.yaml"), cwd=tmp_path)
    line = _one_error(proc, 2, "3 problems", "at model.sourc: unknown key 'sourc'",
                      "at data.val_fractoin: unknown key 'val_fractoin'", "at stages.0.step: unknown key 'step'")
    assert "more" not in line
    keys = "".join(f", k{i}: 1" for i in range(12))
    (tmp_path / "many.yaml").write_text(f"name: t\nmodel: {{source: vit-tiny-digits{keys}}}\n")
    line = _one_error(run_cli("run", str(tmp_path / "many.yaml"), cwd=tmp_path), 2, "12 problems", "(8) at model.k7",
                      "(+4 more not shown)")
    assert "k8" not in line


def test_deeply_nested_json_everywhere_we_read_json(fast_run, tmp_path):
    deep = "[" * DEPTH + "]" * DEPTH
    (tmp_path / "deep.json").write_text(deep)
    proc = run_cli("check", str(tmp_path / "deep.json"), "--baseline", str(fast_run), cwd=tmp_path)
    _one_error(proc, 2, "deep.json: nested too deeply")
    art = tmp_path / "onnx"
    shutil.copytree(fast_run / "artifacts" / "onnx", art)
    (art / "manifest.json").write_text(deep)
    _one_error(run_cli("validate", str(art), cwd=tmp_path), 3, "manifest.json: manifest is nested too deeply",
               "re-export the artifact")


def test_resume_with_a_corrupted_done_marker(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: {source: vit-tiny-digits}\ntrain: {steps: 3, batch_size: 16}\n"
                      "stages: [{kind: finetune}]\n")
    assert run_cli("run", str(recipe), "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path).returncode == 0
    marker = next((tmp_path / "run" / "stages").glob("0-*/done.json"))
    marker.write_text("{truncated")
    proc = run_cli("run", str(recipe), "--out", str(tmp_path / "run"), "--resume", "--quiet", cwd=tmp_path)
    _one_error(proc, 2, "done.json: not valid JSON", "delete that file to rerun stage 0")


def test_artifact_whose_outputs_do_not_match_its_reference(fast_run, tmp_path):
    import hashlib

    import onnx
    from onnx import TensorProto, helper

    art = tmp_path / "onnx"
    shutil.copytree(fast_run / "artifacts" / "onnx", art)
    model = onnx.load(str(art / "model.onnx"))
    x, y = model.graph.input[0].name, model.graph.output[0].name
    ints = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s", 0), ("e", 5), ("a", 1))]
    graph = helper.make_graph([helper.make_node("Flatten", [x], ["f"]), helper.make_node("Slice", ["f", "s", "e", "a"], [y])],
                              "five", [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], ints)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(art / "model.onnx"))
    manifest = json.loads((art / "manifest.json").read_text())  # a consistent manifest: only the outputs differ
    data = (art / "model.onnx").read_bytes()
    manifest.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (art / "manifest.json").write_text(json.dumps(manifest))
    _one_error(run_cli("validate", str(art), cwd=tmp_path), 3, "output 0: the runtime returned shape (", ", 5)",
               "re-export it")


def test_recipes_listing_and_printing(tmp_path):
    proc = run_cli("recipes", cwd=tmp_path)
    assert proc.returncode == 0
    listed = {line.split()[0]: line for line in proc.stdout.splitlines() if line and not line.startswith("Run one")}
    bundled = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    assert sorted(listed) == bundled
    assert str(REPO) not in proc.stdout and "/" not in "".join(listed)  # names, no absolute paths
    rows = {r["name"]: r for r in json.loads(run_cli("recipes", "--json", cwd=tmp_path).stdout)}
    for name, row in rows.items():
        comment = " ".join(line.lstrip("#").strip() for line in (REPO / "recipes" / f"{name}.yaml").read_text().splitlines()
                           if line.startswith("#"))
        assert comment.startswith(row["description"]) and row["description"].endswith(".")  # whole first sentence
        assert " ".join(listed[name].split()[1:]) == row["description"]  # not cut in the listing
    printed = run_cli("recipes", "quickstart", cwd=tmp_path)
    assert printed.returncode == 0 and printed.stdout == (REPO / "recipes" / "quickstart.yaml").read_text()
    assert yaml.safe_load(printed.stdout)["name"] == "quickstart"
    _one_error(run_cli("recipes", "nope", cwd=tmp_path), 2, "nope: not a bundled recipe", "quickstart")


def test_save_baseline_then_check(fast_run, tmp_path):
    base = tmp_path / "baselines" / "fast.json"
    proc = run_cli("check", str(fast_run), "--baseline", str(base), "--save-baseline", cwd=tmp_path)
    assert proc.returncode == 0 and "as the baseline" in proc.stdout, proc.stderr
    assert json.loads(base.read_text()) == json.loads((fast_run / "report.json").read_text())
    proc = run_cli("check", str(fast_run), "--baseline", str(base), cwd=tmp_path)
    assert proc.returncode == 0 and "PASS report.passed" in proc.stdout
    failed = tmp_path / "failed.json"
    report = json.loads((fast_run / "report.json").read_text())
    failed.write_text(json.dumps(dict(report, passed=False)))
    before = base.read_bytes()
    _one_error(run_cli("check", str(failed), "--baseline", str(base), "--save-baseline", cwd=tmp_path), 1,
               "the run failed its gates, so it cannot be a baseline")
    assert base.read_bytes() == before  # the stored baseline is untouched
