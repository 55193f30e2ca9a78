"""End to end through the CLI on one real run: report, runtime_tests, validate, check, integrity."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, error_lines, run_cli, run_recipe_text, stderr_lines
from junitparser import JUnitXml


def test_report_schema_and_numbers(fast_run):
    from edgeprep.report_schema import Report, load_report_document

    document = json.loads((fast_run / "report.json").read_text())
    assert document["schema"] == "edgeprep.report/2"
    report = load_report_document(document, "fast_run")  # the whole document validates as edgeprep.report/2
    assert isinstance(report, Report) and report.passed is True
    assert report.baseline.metric.name == "accuracy"
    assert report.baseline.metric.value >= 0.85  # 300 steps; measured 0.94+
    assert report.model.params > 50_000 and report.model.macs > 0
    assert [(s.kind, s.metric.name) for s in report.stages] == [("finetune", "accuracy")]
    names = {a.name: a for a in report.artifacts}
    assert list(names) == ["onnx", "onnx-ptq-dynamic", "onnx-ptq-static"]
    for a in names.values():
        assert (a.target, a.runtime, a.not_run, a.devices, a.diagnosis) == ("onnx", "onnxruntime", None, None, None)
        assert a.bytes == (fast_run / "artifacts" / a.name / "model.onnx").stat().st_size
        lat = a.latency_ms
        assert 0 < lat.p50 <= lat.p90 <= lat.p99
        assert (lat.iters, lat.batch, lat.threads) == (30, 1, 1)
        # each artifact's own memory, from a subprocess of its own: not the run's process (626-688 MB,
        # the same for every artifact); measured ~50 MiB peak, ~10 MiB load+run for these ~100 kB models
        mem = a.memory
        assert mem.method == "subprocess" and mem.batch == 1 and mem.error is None, mem
        assert 0 < mem.load_and_run_bytes < 48 * 2**20
        assert mem.load_and_run_bytes == mem.peak_rss_bytes - mem.rss_before_load_bytes
        assert mem.peak_rss_bytes < 200 * 2**20
        # the whole process's mark is no longer reported as the artifact's
        assert "peak_rss_bytes" not in document["artifacts"][list(names).index(a.name)]["latency_ms"]
    # provenance: this host's CPU and flags, and the runtime release every artifact was measured with
    import onnxruntime

    from edgeprep.measure.host import host_cpu

    assert report.machine.cpu.model_dump() == host_cpu()
    assert {a.runtime_version for a in names.values()} == {onnxruntime.__version__}
    fp32 = names["onnx"]
    assert fp32.role == "edgeprep" and {names[n].role for n in ("onnx-ptq-dynamic", "onnx-ptq-static")} == {"ptq"}
    assert fp32.parity.sqnr_db is None or fp32.parity.sqnr_db >= 40  # measured ~ 110+ dB
    assert fp32.parity.top1_agreement == 1.0
    assert abs(fp32.metric.value - report.baseline.metric.value) <= 0.01
    assert fp32.precision.low_precision_op_fraction == 0.0
    assert names["onnx-ptq-static"].precision.low_precision_op_fraction >= 0.9
    assert names["onnx-ptq-dynamic"].precision.low_precision_op_fraction > 0.5
    assert fp32.speedup == pytest.approx(1.0)
    assert [(g.name, g.artifact, g.passed, g.skipped) for g in report.gates] == [
        ("max_metric_drop", "onnx", True, False), ("min_sqnr_db", "onnx", True, False),
        ("max_size_bytes", "onnx", True, False)]
    assert report.gates[2].value == fp32.bytes and report.gates[2].limit == 2_000_000
    # The graph ORT really executes is kept for every artifact (what the census counted).
    static_graph = fast_run / "runtime_graphs" / "onnx-ptq-static.optimized.onnx"
    assert names["onnx-ptq-static"].precision.optimized_graph == str(static_graph)  # a runtime's own key
    import onnx

    op_types = {n.op_type for n in onnx.load(str(static_graph)).graph.node}
    assert "QLinearMatMul" in op_types and "MatMul" not in op_types
    for f in ("report.md", "report.html", "recipe.yaml"):
        assert (fast_run / f).is_file()
    md = (fast_run / "report.md").read_text()
    assert f"\nMeasured on {host_cpu()['model']} (" in md
    assert "load+run MiB (own process)" in md and "peak RSS MiB" not in md


def test_runtime_tests_pass_on_the_run(fast_run):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", str(REPO / "runtime_tests"),
                           "--run-dir", str(fast_run), "-p", "no:cacheprovider"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_runtime_tests_latency_budget_really_gates(fast_run, tmp_path):
    # A budget no machine meets (1 ns): the latency check must fail, deterministically.
    run = tmp_path / "run"
    shutil.copytree(fast_run, run)
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("  max_latency_ms_p90: null", "  max_latency_ms_p90: 1.0e-06"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", str(REPO / "runtime_tests"), "--run-dir", str(run),
                           "-k", "latency_budget", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "1 failed" in proc.stdout and "budget 1e-06 ms" in proc.stdout


def test_validate_uses_the_manifest_expectation(fast_run, tmp_path):
    manifest = json.loads((fast_run / "artifacts" / "onnx" / "manifest.json").read_text())
    assert manifest["expect"] == {"min_sqnr_db": 40.0, "max_metric_drop": 0.01}
    peer = json.loads((fast_run / "artifacts" / "onnx-ptq-static" / "manifest.json").read_text())
    assert peer["expect"] == {}
    import onnxruntime

    from edgeprep.measure.host import host_cpu

    for m in (manifest, peer):  # where and with what each artifact was exported and self-checked
        assert m["exported_on"] == {"cpu": host_cpu(), "runtime": "onnxruntime",
                                    "runtime_version": onnxruntime.__version__}
    art = tmp_path / "strict"
    shutil.copytree(fast_run / "artifacts" / "onnx-ptq-static", art)
    m = json.loads((art / "manifest.json").read_text())
    m["expect"] = {"min_sqnr_db": 99.0}  # int8 cannot reach this: validate alone must fail
    (art / "manifest.json").write_text(json.dumps(m))
    proc = run_cli("validate", str(art), cwd=tmp_path)
    assert proc.returncode == 1 and "< 99.0 dB" in proc.stderr, proc.stderr


def test_validate_alone_and_corruption(fast_run, tmp_path):
    proc = run_cli("validate", str(fast_run / "artifacts" / "onnx"), "--min-sqnr-db", "40", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["passed"] and out["parity"]["top1_agreement"] == 1.0
    broken = tmp_path / "broken"
    shutil.copytree(fast_run / "artifacts" / "onnx", broken)
    model = broken / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    proc = run_cli("validate", str(broken), cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    lines = stderr_lines(proc)
    assert len(lines) == 1 and "sha256" in lines[0] and "Traceback" not in proc.stderr


def test_check_against_itself_and_a_faster_baseline(fast_run, tmp_path):
    junit = tmp_path / "same.xml"
    proc = run_cli("check", str(fast_run / "report.json"), "--baseline", str(fast_run / "report.json"),
                   "--junit", str(junit), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    xml = JUnitXml.fromfile(str(junit))
    assert xml.failures == 0 and xml.tests > 0
    # A baseline that was twice as fast: the latency regression must fail the check.
    base = json.loads((fast_run / "report.json").read_text())
    for a in base["artifacts"]:
        a["latency_ms"]["p50"] /= 2
    (tmp_path / "base.json").write_text(json.dumps(base))
    junit = tmp_path / "slower.xml"
    proc = run_cli("check", str(fast_run / "report.json"), "--baseline", str(tmp_path / "base.json"),
                   "--junit", str(junit), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    xml = JUnitXml.fromfile(str(junit))
    assert xml.failures >= 3  # one per artifact


def test_profile_command(fast_run, tmp_path):
    proc = run_cli("profile", str(fast_run / "artifacts" / "onnx"), "--iters", "20", "--warmup", "2", "--json",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lat = json.loads(proc.stdout)["latency_ms"]
    assert lat["iters"] == 20 and 0 < lat["p50"] <= lat["p99"]
    lo, hi = lat["ci95_p50"]
    assert lo <= lat["p50"] <= hi


def test_export_and_finetune_commands_chain_by_hand(fast_run, tmp_path):
    ckpt = fast_run / "stages" / "0-finetune"  # a run's stage directory is accepted as CKPT
    proc = run_cli("finetune", str(ckpt), "-o", str(tmp_path / "ft"), "--steps", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("export", str(tmp_path / "ft"), "--target", "onnx", "-o", str(tmp_path / "art"), "--json",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("validate", str(tmp_path / "art"), "--min-sqnr-db", "40", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("export", str(ckpt), "--target", "coreml-ish", "-o", str(tmp_path / "x"), cwd=tmp_path)
    assert proc.returncode == 2 and "unknown target 'coreml-ish'" in proc.stderr


def test_listings_and_doctor(tmp_path):
    proc = run_cli("models", "--json", cwd=tmp_path)
    assert proc.returncode == 0
    names = {m["name"] for m in json.loads(proc.stdout)}
    assert {"vit-tiny-digits", "vit-bench", "cnn-bench"} <= names
    proc = run_cli("recipes", "--json", cwd=tmp_path)
    assert proc.returncode == 0 and "quickstart" in {r["name"] for r in json.loads(proc.stdout)}
    proc = run_cli("doctor", "--json", cwd=tmp_path)
    assert proc.returncode == 0
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["onnxruntime"]["installed"] and rows["onnxruntime"]["usable"]
    assert "ran a test graph" in rows["onnxruntime"]["note"]
    from edgeprep.measure.host import cpu_label, host_cpu

    assert rows["cpu"]["cpu"] == host_cpu() and rows["cpu"]["note"].startswith(cpu_label(host_cpu(), all_flags=True))
    if not rows["tensorrt"]["installed"]:
        assert "edgeprep[tensorrt]" in rows["tensorrt"]["note"]
    import shutil

    ssh = rows["ssh client"]  # what `profile --device` runs
    assert ssh["installed"] == bool(shutil.which("ssh")) and (not ssh["installed"] or ssh["version"].startswith("OpenSSH"))


def test_failed_gate_exits_1_and_still_writes_the_report(tmp_path):
    proc = run_recipe_text(
        tmp_path, "name: strict\nmodel: {source: vit-tiny-digits}\ntrain: {steps: 5}\nstages: [{kind: finetune}]\n"
        "export: [{target: onnx}]\nvalidate: {profile: {warmup: 1, iters: 5}}\n"
        "gates: {max_size_bytes: 1000, min_sqnr_db: 40}\n")
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "max_size_bytes on onnx" in lines[0] and "limit 1000" in lines[0]
    from edgeprep.check import load_report

    report = load_report(tmp_path / "run")  # a failed run's report is a valid edgeprep.report/2 report too
    assert report.passed is False
    assert [(g.name, g.artifact, g.passed) for g in report.gates] == [("min_sqnr_db", "onnx", True),
                                                                       ("max_size_bytes", "onnx", False)]
    assert report.gates[1].value == report.artifacts[0].bytes and report.gates[1].limit == 1000
    html = (tmp_path / "run" / "report.html").read_text()
    assert '<tr class="fail">' in html and 'banner fail' in html


def test_diverging_training_stops_with_exit_3_and_keeps_last_good_weights(tmp_path):
    proc = run_recipe_text(
        tmp_path, "name: nan\nmodel: {source: vit-tiny-digits}\n"
        "train: {steps: 50, lr: 1.0e+6, grad_clip_norm: 0, warmup_steps: 0}\n"
        "stages: [{kind: finetune}]\nexport: [{target: onnx}]\n")
    lines = error_lines(proc)
    assert proc.returncode == 3 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "diverged at step" in lines[0] and "lower lr" in lines[0]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "stages" / "0-finetune" / "last_good.safetensors"))
    assert weights and all(bool(t.isfinite().all()) for t in weights.values())
    assert not (tmp_path / "run" / "stages" / "0-finetune" / "done.json").exists()
    assert not (tmp_path / "run" / "report.json").exists()
