"""Recipe gates: each gate at its boundary, unmeasured quantities fail, only role "edgeprep" is gated."""
from __future__ import annotations

import math

import pytest

from edgeprep.errors import EXIT_GATE_FAILED, GateFailedError
from edgeprep.gates import describe_failures, evaluate_gates, raise_for_failed_gates, within
from edgeprep.recipe import GatesConfig
from edgeprep.report_schema import GateInputs, ReportSchemaError


def artifact(name="onnx", role="edgeprep", metric=0.93, sqnr=35.0, p90=5.0, speedup=2.0, nbytes=1000):
    """An artifact entry with every key edgeprep.report/2 requires (docs/report-schema.md)."""
    return {"name": name, "target": "onnx", "runtime": "onnxruntime", "role": role,
            "path": f"artifacts/{name}/model.onnx", "bytes": nbytes, "sha256": "ab" * 32, "runtime_version": "1.32.0",
            "parity": {"sqnr_db": sqnr, "max_abs": 0.01, "top1_agreement": 0.99},
            "metric": {"name": "accuracy", "value": metric},
            "latency_ms": {"p50": p90 * 0.9, "p90": p90, "p99": p90 * 1.2, "mean": p90 * 0.95,
                           "ci95_p50": [p90 * 0.85, p90 * 0.95], "iters": 30, "warmup": 5, "threads": 1, "batch": 1},
            "memory": None, "precision": None, "speedup": speedup, "info": {}}


def report(*arts, baseline_metric=0.95):
    """A report being built, as the pipeline hands it to the gates: no gates, no verdict yet."""
    return {"schema": "edgeprep.report/2",
            "baseline": {"metric": {"name": "accuracy", "value": baseline_metric}, "params": 100, "bytes": 4000},
            "artifacts": list(arts)}


def one(gates: GatesConfig, art: dict, **kw) -> dict:
    results = evaluate_gates(gates, report(art, **kw))
    assert len(results) == 1
    return results[0]


# ----------------------------------------------------------------------------- boundaries
@pytest.mark.parametrize("metric, passed, value", [
    (0.93, True, 0.02),      # drop == limit passes (0.95 - 0.93 is 0.020000000000000018 in binary)
    (0.9299, False, 0.0201),
    (0.96, True, -0.01),     # an improvement is a negative drop
])
def test_max_metric_drop_boundary(metric, passed, value):
    r = one(GatesConfig(max_metric_drop=0.02), artifact(metric=metric))
    assert r == {"name": "max_metric_drop", "artifact": "onnx", "limit": 0.02, "value": value,
                 "passed": passed, "note": None}


@pytest.mark.parametrize("sqnr, passed", [(30.0, True), (29.99, False), (55.5, True)])
def test_min_sqnr_db_boundary(sqnr, passed):
    r = one(GatesConfig(min_sqnr_db=30), artifact(sqnr=sqnr))
    assert (r["value"], r["passed"]) == (sqnr, passed)


def test_min_sqnr_null_means_identical_and_passes():
    r = one(GatesConfig(min_sqnr_db=200), artifact(sqnr=None))
    assert r["passed"] is True and r["value"] is None  # JSON has no infinity
    assert "identical" in r["note"]


def test_min_sqnr_infinite_float_passes_and_stays_json_safe():
    r = one(GatesConfig(min_sqnr_db=40), artifact(sqnr=math.inf))
    assert r["passed"] is True and r["value"] is None


@pytest.mark.parametrize("p90, passed", [(5.5, True), (5.5001, False), (0.1, True)])
def test_max_latency_ms_p90_boundary(p90, passed):
    r = one(GatesConfig(max_latency_ms_p90=5.5), artifact(p90=p90))
    assert (r["value"], r["passed"]) == (p90, passed)


@pytest.mark.parametrize("speedup, passed", [(1.5, True), (1.4999, False), (3.0, True),
                                             (15.0 / 10.0, True)])
def test_min_speedup_boundary(speedup, passed):
    r = one(GatesConfig(min_speedup=1.5), artifact(speedup=speedup))
    assert (r["value"], r["passed"]) == (speedup, passed)


@pytest.mark.parametrize("nbytes, passed", [(4_000_000, True), (4_000_001, False), (1, True)])
def test_max_size_bytes_boundary(nbytes, passed):
    r = one(GatesConfig(max_size_bytes=4_000_000), artifact(nbytes=nbytes))
    assert (r["value"], r["passed"]) == (nbytes, passed)
    assert isinstance(r["value"], int)  # byte counts stay integers in report.json


def test_within_absorbs_only_float_noise():
    assert within(10 * 1.15, 11.5, upper=True)  # 11.499999999999998
    assert within(11.5 + 1e-12, 11.5, upper=True)
    assert not within(11.5 + 1e-6, 11.5, upper=True)
    assert not within(math.nan, 1.0, upper=True)


# ----------------------------------------------------------------------------- unmeasured -> fail
@pytest.mark.parametrize("gates, mutate, note_word", [
    (GatesConfig(max_metric_drop=0.5), lambda a: a.update(metric=None), "metric"),
    (GatesConfig(max_metric_drop=0.5), lambda a: a["metric"].update(value=float("nan")), "metric"),
    (GatesConfig(min_sqnr_db=1), lambda a: a.update(parity=None), "parity"),
    (GatesConfig(min_sqnr_db=1), lambda a: a["parity"].update(sqnr_db=float("nan")), "SQNR is not a number"),
    (GatesConfig(max_latency_ms_p90=1e9), lambda a: a.update(latency_ms=None), "latency"),
    (GatesConfig(max_latency_ms_p90=1e9), lambda a: a["latency_ms"].update(p90=None), "latency"),
    (GatesConfig(min_speedup=0.001), lambda a: a.update(speedup=None), "speedup"),
])
def test_unmeasured_gate_fails_with_a_note(gates, mutate, note_word):
    art = artifact()
    mutate(art)
    r = one(gates, art)
    assert r["passed"] is False and r["value"] is None
    assert note_word in r["note"]


def test_unmeasured_baseline_metric_fails():
    r = one(GatesConfig(max_metric_drop=0.5), artifact(), baseline_metric=None)
    assert r["passed"] is False and "baseline" in r["note"]


def test_metric_name_mismatch_fails():
    art = artifact()
    art["metric"]["name"] = "f1"
    r = one(GatesConfig(max_metric_drop=0.5), art)
    assert r["passed"] is False and "cannot be compared" in r["note"]


def test_lower_is_better_metric_drop_is_growth():
    art = artifact(metric=0.30)
    art["metric"]["higher_is_better"] = False  # e.g. a loss: 0.25 -> 0.30 lost 0.05
    r = one(GatesConfig(max_metric_drop=0.05), art, baseline_metric=0.25)
    assert (r["value"], r["passed"]) == (0.05, True)


# ----------------------------------------------------------------------------- roles
def test_only_edgeprep_artifacts_are_gated():
    bad = dict(metric=0.1, sqnr=1.0, p90=1e6, speedup=0.01, nbytes=10**12)
    arts = [artifact("onnx-fp32", "baseline", **bad), artifact("onnx-ptq-dynamic", "ptq", **bad),
            artifact("onnx", "edgeprep"), artifact("ort-mobile", "edgeprep", p90=9.0)]
    gates = GatesConfig(max_metric_drop=0.05, min_sqnr_db=30, max_latency_ms_p90=6.0, min_speedup=1.5,
                        max_size_bytes=2000)
    results = evaluate_gates(gates, report(*arts))
    assert [(r["name"], r["artifact"]) for r in results] == [
        (g, a) for g in ("max_metric_drop", "min_sqnr_db", "max_latency_ms_p90", "min_speedup", "max_size_bytes")
        for a in ("onnx", "ort-mobile")]
    assert [r["artifact"] for r in results if not r["passed"]] == ["ort-mobile"]  # only its p90 (9 ms > 6 ms)


def test_gate_without_an_edgeprep_artifact_fails():
    results = evaluate_gates(GatesConfig(max_size_bytes=10), report(artifact(role="baseline")))
    assert results == [{"name": "max_size_bytes", "artifact": None, "limit": 10, "value": None,
                        "passed": False, "note": "no artifact with role 'edgeprep' to judge"}]


def test_no_gates_configured_gives_no_results():
    assert evaluate_gates(GatesConfig(), report(artifact())) == []


def test_raise_for_failed_gates_is_one_line_exit_1():
    results = evaluate_gates(GatesConfig(max_latency_ms_p90=5.5, min_speedup=1.5),
                             report(artifact(p90=6.25, speedup=None)))
    with pytest.raises(GateFailedError) as exc:
        raise_for_failed_gates(results)
    assert exc.value.exit_code == EXIT_GATE_FAILED
    msg = str(exc.value)
    assert "\n" not in msg
    assert "max_latency_ms_p90 on onnx: 6.25, limit 5.5" in msg
    assert "min_speedup on onnx: not measured" in msg
    raise_for_failed_gates(evaluate_gates(GatesConfig(max_latency_ms_p90=7), report(artifact(p90=6.25))))
    assert describe_failures([]) == ""


# ----------------------------------------------------------------------------- runtimes that cannot run here
def _not_run(name="coreml"):
    a = artifact(name=name)
    a.update(parity=None, metric=None, latency_ms=None, speedup=None, not_run="Core ML prediction needs macOS")
    return a


def test_an_artifact_not_run_here_fails_its_gates_by_default():
    results = evaluate_gates(GatesConfig(min_sqnr_db=30, max_size_bytes=2000), report(_not_run(), artifact()))
    by = {(r["name"], r["artifact"]): r for r in results}
    sq = by[("min_sqnr_db", "coreml")]
    assert sq["passed"] is False and sq["value"] is None and "needs macOS" in sq["note"] and "skipped" not in sq
    assert by[("min_sqnr_db", "onnx")]["passed"] is True
    assert by[("max_size_bytes", "coreml")]["passed"] is True  # the size is known without running it
    with pytest.raises(GateFailedError, match="min_sqnr_db on coreml: not measured"):
        raise_for_failed_gates(results)


def test_unavailable_runtimes_skip_records_skipped_gates_with_the_reason():
    gates = GatesConfig(min_sqnr_db=30, max_metric_drop=0.01, unavailable_runtimes="skip")
    results = evaluate_gates(gates, report(_not_run(), artifact(metric=0.80)))
    skipped = [r for r in results if r.get("skipped")]
    assert len(skipped) == 2 and all(r["artifact"] == "coreml" and r["passed"] for r in skipped)
    assert all("not run on this machine: Core ML prediction needs macOS" in r["note"] for r in skipped)
    # a measured artifact is still judged: its metric drop of 0.15 fails
    failed = [r for r in results if not r["passed"]]
    assert [(r["name"], r["artifact"]) for r in failed] == [("max_metric_drop", "onnx")]


# ----------------------------------------------------------------------------- typed input
def test_the_gates_read_the_typed_model():
    gates = GatesConfig(max_metric_drop=0.05, min_sqnr_db=30, max_size_bytes=2000)
    doc = report(artifact(), artifact("onnx-fp32", "baseline", sqnr=None))
    typed = GateInputs.model_validate(doc)
    assert typed.artifacts[0].parity.sqnr_db == 35.0 and typed.baseline.metric.value == 0.95
    assert evaluate_gates(gates, typed) == evaluate_gates(gates, doc) == [
        {"name": "max_metric_drop", "artifact": "onnx", "limit": 0.05, "value": 0.02, "passed": True, "note": None},
        {"name": "min_sqnr_db", "artifact": "onnx", "limit": 30, "value": 35.0, "passed": True, "note": None},
        {"name": "max_size_bytes", "artifact": "onnx", "limit": 2000, "value": 1000, "passed": True, "note": None}]


def test_a_report_being_built_that_does_not_match_the_schema_is_a_bug():
    art = artifact()
    del art["latency_ms"]["p90"]
    with pytest.raises(ReportSchemaError) as exc:
        evaluate_gates(GatesConfig(max_latency_ms_p90=5), report(art))
    assert str(exc.value) == ("the report being judged does not match edgeprep.report/2: "
                              "artifacts.0.latency_ms.p90: Field required")


def test_device_entries_of_every_shape():
    measured = {"device": "emu://x86-avx2", "url": "emu://x86-avx2", "emulated": True,
                "parity": {"sqnr_db": 15.6, "max_abs": 0.9, "top1_agreement": 0.75},
                "metric": {"name": "accuracy", "value": 0.70, "samples": 64}, "latency_ms": None}
    devices = [{"device": "native", "url": "native", "native": True, "parity": None},  # the host's own: judged once
               measured,
               {"device": "pi", "url": "ssh://pi@raspberrypi", "error": "device pi: unreachable", "exit_code": 3},
               {"device": "emu://arm64-a53", "url": "emu://arm64-a53", "not_run": "litert is not run emulated"}]
    doc = report(dict(artifact(), devices=devices))
    doc["baseline"]["metric_on_parity_rows"] = {"name": "accuracy", "value": 0.75, "samples": 64}
    results = evaluate_gates(GatesConfig(min_sqnr_db=30, max_metric_drop=0.01, max_latency_ms_p90=6), doc)
    assert [(r["name"], r["artifact"], r["value"], r["passed"], r["note"], r.get("device"), r.get("emulated"))
            for r in results] == [
        ("max_metric_drop", "onnx", 0.02, False, None, None, None),
        ("max_metric_drop", "onnx@emu://x86-avx2", 0.05, False, None, "emu://x86-avx2", True),  # 0.75 on its 64 rows
        ("max_metric_drop", "onnx@pi", None, False, "device pi failed: device pi: unreachable", "pi", False),
        ("max_metric_drop", "onnx@emu://arm64-a53", None, False,
         "not run on device emu://arm64-a53: litert is not run emulated", "emu://arm64-a53", False),
        ("min_sqnr_db", "onnx", 35.0, True, None, None, None),
        ("min_sqnr_db", "onnx@emu://x86-avx2", 15.6, False, None, "emu://x86-avx2", True),
        ("min_sqnr_db", "onnx@pi", None, False, "device pi failed: device pi: unreachable", "pi", False),
        ("min_sqnr_db", "onnx@emu://arm64-a53", None, False,
         "not run on device emu://arm64-a53: litert is not run emulated", "emu://arm64-a53", False),
        ("max_latency_ms_p90", "onnx", 5.0, True, None, None, None)]  # never a device's latency
