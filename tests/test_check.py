"""CI gate: regressions per kind at their exact tolerance boundaries, missing artifacts, bad input,
and JUnit XML read back with a real JUnit parser (junitparser)."""
from __future__ import annotations

import copy
import json

import pytest
from junitparser import Failure, JUnitXml, Skipped

from edgeprep.check import SQNR_CEILING_DB, Case, compare, load_report, write_junit
from edgeprep.errors import EXIT_BAD_INPUT, BadInputError
from edgeprep.report_schema import Report


def art(name, role="edgeprep", metric=0.95, sqnr=40.0, nbytes=1000, p50=10.0, threads=1, batch=1):
    """An artifact entry with every key edgeprep.report/2 requires (docs/report-schema.md)."""
    return {"name": name, "target": "onnx", "runtime": "onnxruntime", "role": role,
            "path": f"artifacts/{name}/model.onnx",
            "bytes": nbytes, "sha256": "ab" * 32, "runtime_version": "1.32.0",
            "parity": {"sqnr_db": sqnr, "max_abs": 0.01, "top1_agreement": 0.99},
            "metric": {"name": "accuracy", "value": metric, "samples": 270},
            "latency_ms": {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3, "mean": p50,
                           "ci95_p50": [p50 - 0.1, p50 + 0.1], "iters": 30, "warmup": 5, "threads": threads,
                           "batch": batch},
            "memory": None, "precision": None, "speedup": 1.0, "info": {}}


def report(*arts, passed=True, gates=None):
    """A whole edgeprep.report/2 document."""
    return {"schema": "edgeprep.report/2", "recipe": "r", "created": "2026-12-08T00:00:00+00:00",
            "edgeprep_version": "0.1.0",
            "machine": {"platform": "Linux", "processor": "x86_64", "python": "3.11.7", "torch": "2.13.0",
                        "cpu_threads": 2, "cpu": {"model": "AMD EPYC", "arch": "x86_64", "isa": ["avx2"], "cores": 2}},
            "model": {"name": "m", "params": 100, "macs": 1000},
            "baseline": {"metric": {"name": "accuracy", "value": 0.95}, "params": 100, "bytes": 4000},
            "stages": [], "artifacts": list(arts), "gates": gates or [], "passed": passed}


BASE = report(art("onnx"), art("onnx-fp32", role="baseline", sqnr=None, nbytes=4000, p50=20.0))


def changed(name="onnx", **kw) -> dict:
    r = copy.deepcopy(BASE)
    a = next(a for a in r["artifacts"] if a["name"] == name)
    for key, value in kw.items():
        if key == "metric":
            a["metric"]["value"] = value
        elif key == "sqnr":
            a["parity"]["sqnr_db"] = value
        elif key == "p50":
            a["latency_ms"]["p50"] = value
        else:
            a[key] = value
    return r


def case(result, name) -> Case:
    return next(c for c in result.cases if c.name == name)


def test_identical_reports_pass_with_every_case():
    result = compare(copy.deepcopy(BASE), BASE)
    assert result.passed
    assert [c.name for c in result.cases] == ["report.passed"] + [
        f"{a}.{k}" for a in ("onnx", "onnx-fp32") for k in ("present", "metric", "sqnr_db", "size_bytes", "latency_p50")]
    assert result.summary() == "check passed: 11 passed, 0 failed, 0 skipped"


# ----------------------------------------------------------------------------- boundaries per kind
@pytest.mark.parametrize("p50, tol, passed", [
    (11.5, 0.15, True),     # exactly +15%: 10 * 1.15 is 11.499999999999998 in binary, still passes
    (11.51, 0.15, False),
    (14.99, 0.5, True),
    (15.01, 0.5, False),
    (3.0, 0.15, True),      # faster is never a regression
])
def test_latency_p50_boundary(p50, tol, passed):
    c = case(compare(changed(p50=p50), BASE, latency_tolerance=tol), "onnx.latency_p50")
    assert (c.passed, c.value, c.baseline, c.limit) == (passed, p50, 10.0, round(10.0 * (1 + tol), 12))
    if not passed:
        assert c.message.startswith(f"onnx.latency_p50: {p50:.3f} ms vs baseline 10.000 ms") and "regression" in c.message


def test_latency_with_different_profile_settings_fails():
    r = changed()
    r["artifacts"][0]["latency_ms"]["threads"] = 4
    c = case(compare(r, BASE), "onnx.latency_p50")
    assert not c.passed and c.message == ("onnx.latency_p50: profiled with different settings (threads 4 vs 1); "
                                          "profile with the baseline's settings or refresh the baseline")


@pytest.mark.parametrize("metric, tol, passed", [
    (0.95, 0.0, True),
    (0.9499, 0.0, False),   # default: any drop is a regression
    (0.96, 0.0, True),
    (0.94, 0.01, True),     # drop == tolerance (0.95 - 0.94 = 0.010000000000000009 in binary)
    (0.9399, 0.01, False),
])
def test_metric_boundary(metric, tol, passed):
    c = case(compare(changed(metric=metric), BASE, metric_tolerance=tol), "onnx.metric")
    assert (c.passed, c.value, c.baseline, c.limit) == (passed, metric, 0.95, round(0.95 - tol, 12))


def test_metric_name_change_fails():
    r = changed()
    r["artifacts"][0]["metric"]["name"] = "f1"
    c = case(compare(r, BASE), "onnx.metric")
    assert not c.passed and "cannot be compared" in c.message


@pytest.mark.parametrize("sqnr, tol, passed", [(39.0, 1.0, True), (38.99, 1.0, False), (37.0, 3.0, True),
                                               (50.0, 1.0, True)])
def test_sqnr_boundary(sqnr, tol, passed):
    c = case(compare(changed(sqnr=sqnr), BASE, sqnr_tolerance_db=tol), "onnx.sqnr_db")
    assert (c.passed, c.value, c.baseline, c.limit) == (passed, sqnr, 40.0, 40.0 - tol)


def test_sqnr_identical_baseline_is_clamped_at_float_noise_level():
    # Baseline bit-identical (null = infinite SQNR): 95 dB is fp32 noise, no regression; 80 dB is one.
    ok = case(compare(changed("onnx-fp32", sqnr=95.0), BASE), "onnx-fp32.sqnr_db")
    assert ok.passed and (ok.value, ok.baseline, ok.limit) == (SQNR_CEILING_DB, SQNR_CEILING_DB, SQNR_CEILING_DB - 1)
    bad = case(compare(changed("onnx-fp32", sqnr=80.0), BASE), "onnx-fp32.sqnr_db")
    assert not bad.passed and bad.value == 80.0


@pytest.mark.parametrize("nbytes, tol, passed", [(1010, 0.01, True), (1011, 0.01, False), (1500, 0.5, True),
                                                 (1501, 0.5, False), (10, 0.01, True)])
def test_size_boundary(nbytes, tol, passed):
    c = case(compare(changed(bytes=nbytes), BASE, size_tolerance=tol), "onnx.size_bytes")
    assert (c.passed, c.value, c.baseline, c.limit) == (passed, nbytes, 1000, 1000 * (1 + tol))
    if not passed:
        assert f"onnx.size_bytes: {nbytes:,} bytes vs baseline 1,000 bytes" in c.message


# ----------------------------------------------------------------------------- presence and verdict
def test_missing_artifact_fails_and_new_artifact_is_skipped():
    r = report(art("onnx"), art("litert"))
    result = compare(r, BASE)
    assert not result.passed
    missing = case(result, "onnx-fp32.present")
    assert not missing.passed and "missing from the report" in missing.message
    new = case(result, "litert.present")
    assert new.passed and new.skipped
    assert [c.name for c in result.failures] == ["onnx-fp32.present"]


def test_report_that_failed_its_own_gates_fails():
    gates = [{"name": "max_latency_ms_p90", "artifact": "onnx", "limit": 5, "value": 11, "passed": False, "note": None}]
    r = copy.deepcopy(BASE)
    r.update(passed=False, gates=gates)
    result = compare(r, BASE)
    assert [c.name for c in result.failures] == ["report.passed"]
    assert result.failures[0].message == "report.passed: gate(s) failed: max_latency_ms_p90 (onnx)"
    assert result.summary().startswith("check failed: 10 passed, 1 failed, 0 skipped: report.passed")


def test_lost_measurement_fails_and_never_measured_is_skipped():
    lost = case(compare(changed(latency_ms=None), BASE), "onnx.latency_p50")
    assert not lost.passed and "measured in the baseline (10) but not in the report" in lost.message
    base = changed(parity=None)
    skipped = case(compare(copy.deepcopy(BASE), base), "onnx.sqnr_db")
    assert skipped.passed and skipped.skipped


# ----------------------------------------------------------------------------- bad input
def test_schema_mismatch_is_bad_input():
    other = dict(BASE, schema="edgeprep.report/0")
    for r, b in ((other, BASE), (BASE, other)):
        with pytest.raises(BadInputError, match="schema is 'edgeprep.report/0', expected 'edgeprep.report/2' or "
                                                "the older 'edgeprep.report/1'"):
            compare(r, b)
    with pytest.raises(BadInputError, match="appear twice"):
        compare(report(art("a"), art("a")), BASE)
    with pytest.raises(BadInputError, match="latency_tolerance"):
        compare(BASE, BASE, latency_tolerance=-0.1)


def test_an_invalid_report_is_one_line_naming_the_field():
    bad = copy.deepcopy(BASE)
    bad["artifacts"][1]["latency_ms"]["p50"] = "20"
    with pytest.raises(BadInputError) as exc:
        compare(BASE, bad)
    assert str(exc.value) == ('baseline: not a valid edgeprep.report/2 report: artifacts.1.latency_ms.p50: '
                              'Input should be a valid number (got "20")')


def test_a_v1_baseline_written_by_an_older_edgeprep_is_accepted(tmp_path):
    old = copy.deepcopy(BASE)
    old["schema"] = "edgeprep.report/1"
    del old["machine"]["cpu"]  # fields /1 writers had not added yet
    for a in old["artifacts"]:
        del a["runtime_version"], a["memory"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    baseline = load_report(path)
    assert (baseline.schema_, baseline.machine.cpu, [a.memory for a in baseline.artifacts]) == (
        "edgeprep.report/2", None, [None, None])
    result = compare(copy.deepcopy(BASE), baseline)
    assert result.summary() == "check passed: 11 passed, 0 failed, 0 skipped"
    regressed = changed(p50=12.0)
    assert [c.name for c in compare(regressed, old).failures] == ["onnx.latency_p50"]  # a /1 dict works too


def test_load_report(tmp_path):
    good = tmp_path / "run" / "report.json"
    good.parent.mkdir()
    good.write_text(json.dumps(BASE))
    for where in (good, good.parent):  # a run directory works too
        loaded = load_report(where)
        assert isinstance(loaded, Report) and loaded.schema_ == "edgeprep.report/2" and loaded.passed is True
        assert [(a.name, a.role, a.bytes, a.latency_ms.p50) for a in loaded.artifacts] == [
            ("onnx", "edgeprep", 1000, 10.0), ("onnx-fp32", "baseline", 4000, 20.0)]
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "old.json").write_text(json.dumps({"schema": "other/9"}))
    cases = {"missing.json": "report not found", "bad.json": "bad.json: not valid JSON: Expecting property name",
             "list.json": "expected a JSON object", "old.json": "schema is 'other/9'"}
    for name, words in cases.items():
        with pytest.raises(BadInputError) as exc:
            load_report(tmp_path / name)
        assert exc.value.exit_code == EXIT_BAD_INPUT
        assert words in str(exc.value) and "\n" not in str(exc.value)


# ----------------------------------------------------------------------------- JUnit
def test_junit_read_by_junitparser(tmp_path):
    r = changed(p50=12.0, bytes=1100)
    r["artifacts"] = [a for a in r["artifacts"] if a["name"] != "onnx-fp32"] + [art("litert")]
    result = compare(r, BASE)
    path = tmp_path / "ci" / "check.xml"
    write_junit(result, path)

    xml = JUnitXml.fromfile(str(path))
    suites = list(xml)
    assert len(suites) == 1
    suite = suites[0]
    # report.passed + onnx x5 + onnx-fp32.present + litert.present = 8 cases
    assert (suite.name, suite.tests, suite.failures, suite.errors, suite.skipped) == ("edgeprep.check", 8, 3, 0, 1)
    assert (xml.tests, xml.failures, xml.skipped) == (8, 3, 1)
    by_name = {c.name: c for c in suite}
    assert list(by_name) == [c.name for c in result.cases]
    assert by_name["onnx.latency_p50"].classname == "edgeprep.check.onnx"
    failures = {name: [res for res in c.result if isinstance(res, Failure)] for name, c in by_name.items()}
    assert sorted(n for n, f in failures.items() if f) == ["onnx-fp32.present", "onnx.latency_p50", "onnx.size_bytes"]
    assert failures["onnx.latency_p50"][0].message == (
        "onnx.latency_p50: 12.000 ms vs baseline 10.000 ms (+20.0%; limit +15% = 11.500 ms) - regression")
    assert failures["onnx.size_bytes"][0].message == (
        "onnx.size_bytes: 1,100 bytes vs baseline 1,000 bytes (+10.0%; limit +1% = 1,010 bytes) - regression")
    assert failures["onnx-fp32.present"][0].message == (
        "onnx-fp32.present: artifact in the baseline is missing from the report")
    assert by_name["litert.present"].is_skipped and isinstance(by_name["litert.present"].result[0], Skipped)
    assert by_name["onnx.metric"].is_passed
    assert not list(path.parent.glob("*.tmp"))
