"""The typed report schema (edgeprep.report/2): every kind of entry validates, /1 is read and
upgraded, an invalid report is one line naming the field, and the checked-in JSON Schema and the
field-by-field doc match the models."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
from conftest import REPO

from edgeprep.errors import EXIT_BAD_INPUT, BadInputError
from edgeprep.report_schema import (
    REPORT_SCHEMA,
    Artifact,
    Baseline,
    CpuInfo,
    DeviceEntry,
    DeviceRuntime,
    Diagnosis,
    GateResult,
    Latency,
    Machine,
    Memory,
    Metric,
    ModelSummary,
    Parity,
    Precision,
    Report,
    Stage,
    json_schema_text,
    load_report_document,
)


def latency(p50: float) -> dict:
    return {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.5, "mean": p50 * 1.02, "ci95_p50": [p50 * 0.99, p50 * 1.01],
            "iters": 200, "warmup": 20, "threads": 1, "batch": 1}


def artifact(name: str, role: str, sqnr, **more) -> dict:
    return {"name": name, "target": "onnx", "runtime": "onnxruntime", "role": role,
            "path": f"runs/r/artifacts/{name}/model.onnx",
            "bytes": 127_591, "sha256": "55" * 32, "runtime_version": "1.32.0",
            "parity": {"sqnr_db": sqnr, "max_abs": 0.0376, "top1_agreement": 1.0},
            "metric": {"name": "accuracy", "value": 0.9407, "samples": 270}, "latency_ms": latency(0.0911),
            "memory": {"method": "subprocess", "load_and_run_bytes": 13_721_600, "peak_rss_bytes": 63_782_912,
                       "rss_before_load_bytes": 50_061_312, "rss_source": "VmHWM", "peak_reset": True, "load_ms": 15.0,
                       "batch": 1, "warmup": 1, "iters": 3, "threads": 1, "seconds": 1.163},
            "precision": {"low_precision_op_fraction": 0.95, "ops": {"QGemm": 13, "Conv": 1},
                          "optimization_level": "extended"},
            "speedup": 1.28, "info": {"exporter": "dynamo", "opset": 20}, **more}


def document() -> dict:
    """A /2 report with every kind of entry: devices of each shape, a diagnosis, an artifact not run here."""
    devices = [
        {"device": "native", "url": "native", "native": True, "emulated": False, "description": {"cpu": "AMD EPYC"},
         "runtime": {"package": "onnxruntime", "version": "1.32.0"}, "latency_ms": latency(0.0911), "memory": None,
         "parity": {"sqnr_db": 63.9, "max_abs": 0.0376, "top1_agreement": 1.0},
         "metric": {"name": "accuracy", "value": 0.9407, "samples": 270}, "note": "this host", "speedup": 1.28},
        {"device": "emu://x86-avx2", "url": "emu://x86-avx2", "emulated": True, "description": {"cpu": "Haswell"},
         "runtime": {"package": "onnxruntime", "version": "1.32.0"}, "latency_ms": latency(4.2), "load_ms": 120.5,
         "memory": {"method": "device runner", "peak_rss_bytes": 70_000_000, "rss_before_load_bytes": 50_000_000},
         "parity": {"sqnr_db": 15.6, "max_abs": 0.9, "top1_agreement": 0.75},
         "metric": {"name": "accuracy", "value": 0.7, "samples": 64}, "family": "x86-avx2", "latency_is_timing": False,
         "latency_note": "QEMU", "qemu": {"binary": "/usr/bin/qemu-x86_64", "version": "7.2", "cpu": "Haswell"},
         "speedup": None, "diagnosis": {"summary": "first diverging layer fc1 (MatMulInteger)", "fixes": [
             {"option": "int8_weights: u8", "where": "export", "sqnr_db": 146.6, "passes": True, "bytes": 1000,
              "bytes_delta": 0, "host_p50_ms": 0.09, "host_p50_ms_before": 0.09, "host_latency_ratio": 1.0}],
             "target": "device emu://x86-avx2", "retrain": "or retrain with qat target_cpu: portable"}},
        {"device": "pi", "url": "ssh://pi@raspberrypi", "exit_code": 3, "error": "device pi: unreachable",
         "speedup": None},
        {"device": "emu://arm64-a53", "url": "emu://arm64-a53", "not_run": "coreml artifacts are not run emulated",
         "speedup": None},
    ]
    coreml = artifact("coreml", "edgeprep", None, target="coreml", runtime="coreml",
                      not_run="Core ML prediction needs macOS")
    coreml.update(parity=None, metric=None, latency_ms=None, memory=None, precision=None, speedup=None)
    return {
        "schema": "edgeprep.report/2", "recipe": "quickstart", "created": "2026-12-08T00:04:30+00:00",
        "edgeprep_version": "0.1.0",
        "machine": {"platform": "Linux-6.1-x86_64", "processor": "x86_64", "python": "3.11.7", "torch": "2.13.0+cpu",
                    "cpu_threads": 2,
                    "cpu": {"model": "AMD EPYC", "arch": "x86_64", "isa": ["avx2", "fma"], "cores": 2}},
        "model": {"name": "vit-tiny-digits", "params": 51_382, "macs": 867_520},
        "baseline": {"metric": {"name": "accuracy", "value": 0.9296}, "params": 102_666, "bytes": 434_446,
                     "metric_on_parity_rows": {"name": "accuracy", "value": 0.9297, "samples": 256}},
        "stages": [{"kind": "finetune", "seconds": 41.2, "params": 102_666, "macs": 1_786_880,
                    "metric": {"name": "accuracy", "value": 0.9296}, "notes": [],
                    "details": {"steps": 300, "final_loss": 0.1}}],
        "artifacts": [artifact("onnx", "edgeprep", 63.9, devices=devices),
                      artifact("onnx-baseline", "baseline", 200.0, speedup=1.0), coreml],
        "gates": [{"name": "min_sqnr_db", "artifact": "onnx", "limit": 40.0, "value": 63.9, "passed": True,
                   "note": None},
                  {"name": "min_sqnr_db", "artifact": "onnx@emu://x86-avx2", "limit": 40.0, "value": 15.6,
                   "passed": False, "note": None, "device": "emu://x86-avx2", "device_url": "emu://x86-avx2",
                   "emulated": True},
                  {"name": "min_sqnr_db", "artifact": "coreml", "limit": 40.0, "value": None, "passed": True,
                   "note": "not run on this machine: Core ML prediction needs macOS", "skipped": True}],
        "passed": False,
    }


def as_v1(doc: dict) -> dict:
    """What an older edgeprep wrote: schema /1, no runtime_version / memory per artifact, no
    machine.cpu, the whole process's peak RSS under latency_ms, an identical-output SQNR as null."""
    old = copy.deepcopy(doc)
    old["schema"] = "edgeprep.report/1"
    del old["machine"]["cpu"]
    for a in old["artifacts"]:
        del a["runtime_version"], a["memory"]
        if a["latency_ms"]:
            a["latency_ms"]["peak_rss_bytes"] = 640_000_000
    old["artifacts"][1]["parity"]["sqnr_db"] = None
    return old


# ----------------------------------------------------------------------------- /2
def test_every_kind_of_entry_validates_as_typed_fields():
    doc = document()
    report = load_report_document(doc)
    assert report.schema_ == REPORT_SCHEMA == "edgeprep.report/2" and report.passed is False
    onnx, base, coreml = report.artifacts
    assert (onnx.latency_ms.p90, onnx.memory.load_and_run_bytes, onnx.precision.ops) == (
        pytest.approx(0.10021), 13_721_600, {"QGemm": 13, "Conv": 1})
    assert onnx.precision.optimization_level == "extended"  # a runtime's own key is kept
    assert (coreml.not_run, coreml.parity, coreml.latency_ms) == ("Core ML prediction needs macOS", None, None)
    native, emu, ssh, not_run = onnx.devices
    assert (native.native, native.emulated, emu.native, emu.emulated) == (True, False, False, True)
    assert (emu.metric.samples, emu.memory.method, emu.memory.peak_rss_bytes, emu.diagnosis.fixes[0]["sqnr_db"]) == (
        64, "device runner", 70_000_000, 146.6)
    assert (ssh.error, ssh.exit_code, ssh.parity, not_run.not_run) == (
        "device pi: unreachable", 3, None, "coreml artifacts are not run emulated")
    assert report.baseline.metric_on_parity_rows.samples == 256
    assert [(g.artifact, g.passed, g.skipped, g.device) for g in report.gates] == [
        ("onnx", True, False, None), ("onnx@emu://x86-avx2", False, False, "emu://x86-avx2"),
        ("coreml", True, True, None)]
    assert report.stages[0].details == {"steps": 300, "final_loss": 0.1}
    assert doc == document()  # reading never changes the document


def test_extra_metrics_are_numbers():
    doc = document()
    doc["artifacts"][0]["metric"]["top10_overlap"] = 0.98  # the embedding task's extra metric
    assert load_report_document(doc).artifacts[0].metric.top10_overlap == 0.98
    doc["artifacts"][0]["metric"]["top10_overlap"] = "high"
    with pytest.raises(BadInputError, match=r"artifacts\.0\.metric\.top10_overlap: Input should be a valid number"):
        load_report_document(doc)


# ----------------------------------------------------------------------------- invalid: one line, the field named
def _set(path: str, value):
    def mutate(doc):
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (_set("artifacts.0.bytes", "1000"), 'artifacts.0.bytes: Input should be a valid integer (got "1000")'),
    (_set("artifacts.0.bytes", True), "artifacts.0.bytes: Input should be a valid integer (got true)"),
    (_set("artifacts.0.bytes", -1), "artifacts.0.bytes: Input should be greater than or equal to 0 (got -1)"),
    (_set("artifacts.1.sha256", KeyError), "artifacts.1.sha256: Field required"),
    (_set("artifacts.0.parity.sqnr_db", KeyError), "artifacts.0.parity.sqnr_db: Field required"),
    (_set("artifacts.0.role", "shipped"),
     "artifacts.0.role: Input should be 'edgeprep', 'baseline' or 'ptq' (got \"shipped\")"),
    (_set("artifacts.0.latency_ms.ci95_p50", [1.0]),
     "artifacts.0.latency_ms.ci95_p50: List should have at least 2 items after validation, not 1"),
    (_set("artifacts.0.devices.2.device", KeyError), "artifacts.0.devices.2.device: Field required"),
    (_set("stages.0.seconds", "41.2"), 'stages.0.seconds: Input should be a valid number (got "41.2")'),
    (_set("stages.0.details", KeyError), "stages.0.details: Field required"),
    (_set("gates.0.colour", "green"), 'gates.0.colour: Extra inputs are not permitted (got "green")'),
    (_set("recipie", "typo"), 'recipie: Extra inputs are not permitted (got "typo")'),
    (_set("passed", True), "(top level): passed is true but gate min_sqnr_db (onnx@emu://x86-avx2) failed"),
    (_set("artifacts.2.name", "onnx"), "artifacts: artifact name(s) onnx appear twice; names must be unique"),
    (_set("machine.cpu_threads", KeyError), "machine.cpu_threads: Field required"),
])
def test_an_invalid_report_is_one_line_naming_the_field(mutate, message):
    doc = document()
    mutate(doc)
    with pytest.raises(BadInputError) as exc:
        load_report_document(doc, "base.json")
    assert str(exc.value) == f"base.json: not a valid edgeprep.report/2 report: {message}"
    assert exc.value.exit_code == EXIT_BAD_INPUT


def test_several_problems_are_counted_on_the_one_line():
    doc = document()
    del doc["created"], doc["model"]["macs"], doc["artifacts"][0]["path"]
    with pytest.raises(BadInputError) as exc:
        load_report_document(doc)
    assert str(exc.value) == "report: not a valid edgeprep.report/2 report: created: Field required; 2 more problem(s)"


@pytest.mark.parametrize("doc, message", [
    ([], "report: expected a JSON object with schema 'edgeprep.report/2', got list"),
    ({"schema": "edgeprep.report/3"}, "report: schema is 'edgeprep.report/3', expected 'edgeprep.report/2' or the "
                                      "older 'edgeprep.report/1' (produce it with this edgeprep version, or "
                                      "regenerate the baseline)"),
    ({"recipe": "r"}, "report: schema is None, expected 'edgeprep.report/2' or the older 'edgeprep.report/1' "
                      "(produce it with this edgeprep version, or regenerate the baseline)"),
])
def test_not_a_report(doc, message):
    with pytest.raises(BadInputError) as exc:
        load_report_document(doc)
    assert str(exc.value) == message


# ----------------------------------------------------------------------------- /1
def test_a_v1_report_is_read_as_v2():
    old = as_v1(document())
    before = copy.deepcopy(old)
    report = load_report_document(old)
    assert old == before  # the reader works on a copy
    assert report.schema_ == "edgeprep.report/2" and report.machine.cpu is None
    assert [(a.name, a.runtime_version, a.memory) for a in report.artifacts] == [
        ("onnx", None, None), ("onnx-baseline", None, None), ("coreml", None, None)]
    assert report.artifacts[1].parity.sqnr_db is None  # still "identical outputs"
    assert report.artifacts[0].latency_ms.peak_rss_bytes == 640_000_000  # kept, as an extra key
    assert report.artifacts[0].devices[1].parity.sqnr_db == 15.6
    # everything /1 already had is read unchanged
    new = load_report_document(document())
    assert report.model_dump(exclude={"machine", "artifacts"}) == new.model_dump(exclude={"machine", "artifacts"})


def test_a_v1_artifact_without_a_name_is_named_by_its_target():
    old = as_v1(document())
    old["artifacts"] = old["artifacts"][:1]
    del old["artifacts"][0]["name"]
    old["gates"], old["passed"] = [], True
    assert [a.name for a in load_report_document(old).artifacts] == ["onnx"]


def test_a_v1_report_lacking_what_every_v1_writer_wrote_is_refused():
    old = as_v1(document())
    del old["artifacts"][0]["bytes"]
    with pytest.raises(BadInputError) as exc:
        load_report_document(old, "baselines/old.json")
    assert str(exc.value) == ("baselines/old.json: not a valid edgeprep.report/1 report: "
                              "artifacts.0.bytes: Field required")


# ----------------------------------------------------------------------------- JSON Schema and the doc
def test_checked_in_json_schema_is_the_generated_one():
    checked_in = (REPO / "docs" / "report-schema.json").read_text(encoding="utf-8")
    assert checked_in == json_schema_text(), "regenerate: python -m edgeprep.report_schema > docs/report-schema.json"
    proc = subprocess.run([sys.executable, "-m", "edgeprep.report_schema"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout == checked_in, proc.stderr[-2000:]
    schema = json.loads(checked_in)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["schema"]["const"] == "edgeprep.report/2"
    assert schema["additionalProperties"] is False and schema["required"] == [
        "schema", "recipe", "created", "edgeprep_version", "machine", "model", "baseline", "stages", "artifacts",
        "gates", "passed"]
    assert schema["$defs"]["Latency"]["properties"]["p90"]["description"] == (
        "90th percentile, ms (what ``max_latency_ms_p90`` gates).")


# each section of docs/report-schema.md documents one model: "## `artifacts[]` (Artifact)"
DOCUMENTED = {"Report": Report, "Machine": Machine, "CpuInfo": CpuInfo, "ModelSummary": ModelSummary,
              "Baseline": Baseline, "Stage": Stage, "Artifact": Artifact, "Metric": Metric, "Parity": Parity,
              "Latency": Latency, "Memory": Memory, "Precision": Precision, "DeviceEntry": DeviceEntry,
              "DeviceRuntime": DeviceRuntime, "Diagnosis": Diagnosis, "GateResult": GateResult}


def test_the_doc_lists_every_field_of_every_model():
    text = (REPO / "docs" / "report-schema.md").read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    documented = {}
    for section in sections:
        title = section.splitlines()[0]
        m = re.search(r"\((\w+)\)$", title)
        if m and m.group(1) in DOCUMENTED:
            table = section.split("| field | type | meaning |\n", 1)[1].split("\n\n", 1)[0]  # the field table
            documented[m.group(1)] = re.findall(r"^\| `(\w+)` \| ", table, flags=re.M)
    assert sorted(documented) == sorted(DOCUMENTED)
    for name, model in DOCUMENTED.items():
        fields = [f.alias or key for key, f in model.model_fields.items()]
        assert documented[name] == fields, name  # the same fields, in the models' order
    assert "DESIGN.md" not in text
