"""The report.json schema, ``edgeprep.report/2``, as pydantic models; the reader for ``/1``.

``edgeprep run`` writes report.json through these models (``report.write_reports`` validates the
document just before writing it), and ``edgeprep check`` and the gates read it through them, so a
field is named, typed and documented in one place. docs/report-schema.md explains every field and
its unit; docs/report-schema.json is the JSON Schema generated from these models
(``python -m edgeprep.report_schema > docs/report-schema.json``; a test keeps the two equal).

Rules, for every model here:

- A key the pipeline always writes is required; its value may be ``null`` where the pipeline
  writes null (not measured, not run here, or a non-finite float: strict JSON has no NaN/inf).
- Types are strict: a string where a number belongs, or ``true`` where a count belongs, is an error.
- The top level and the gate results allow no other key (both are built in one place, so an unknown
  key is a typo); the other objects allow more keys (exporters, runtimes and devices add their own).

``/2`` has the shape of ``/1``: reports written by older versions are read by
``load_report_document`` (edgeprep/report_schema_v1.py says what it fills in).
"""
from __future__ import annotations

import json
import sys
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from edgeprep.errors import BadInputError
from edgeprep.report_schema_measures import (
    ClosedModel,
    DeviceEntry,
    DeviceRuntime,
    Diagnosis,
    Latency,
    Memory,
    Metric,
    OpenModel,
    Parity,
    Precision,
)
from edgeprep.report_schema_v1 import SCHEMA_V1, upgrade_v1
from edgeprep.types import ARTIFACT_ROLES

__all__ = ["REPORT_SCHEMA", "Artifact", "Baseline", "CpuInfo", "DeviceEntry", "DeviceRuntime", "Diagnosis",
           "GateInputs", "GateResult", "Latency", "Machine", "Memory", "Metric", "ModelSummary", "Parity",
           "Precision", "Report", "ReportSchemaError", "Stage", "check_written_report", "describe_errors",
           "gate_inputs", "json_schema", "json_schema_text", "load_report_document"]

REPORT_SCHEMA = "edgeprep.report/2"

Role = Literal[ARTIFACT_ROLES]  # type: ignore[valid-type]  # Literal["edgeprep", "baseline", "ptq"]


# ----------------------------------------------------------------------------- artifacts
class Artifact(OpenModel):
    """One exported artifact, judged on its own runtime on this host."""

    name: str
    """Unique in the run: ``onnx``, ``onnx-baseline``, ``onnx-ptq-static``, ..."""
    target: str
    """Exporter: ``onnx``, ``ort-mobile``, ``litert``, ``executorch``, ``coreml``, ``tensorrt``, ..."""
    runtime: str
    """Runtime it was judged on: ``onnxruntime``, ``litert``, ``executorch``, ``coreml``, ``tensorrt``."""
    role: Role
    """``edgeprep`` (the recipe's final model: what ships, and what the gates judge), ``baseline``
    (the fp32 model before compression, same target) or ``ptq`` (the runtime's own post-training
    quantization of the baseline, for comparison)."""
    path: str
    """The model file."""
    bytes: int = Field(ge=0)
    """Size of the model file, bytes."""
    sha256: str
    """Hex digest of the model file."""
    runtime_version: Optional[str]
    """The runtime release that measured it (int8 kernels differ between releases)."""
    parity: Optional[Parity]
    """Against the final PyTorch model (``edgeprep``) or the fp32 baseline model (others); null when not run."""
    metric: Optional[Metric]
    """The task metric of the runtime's outputs over the eval split; null when not run."""
    latency_ms: Optional[Latency]
    """Measured in edgeprep's process; null when not run."""
    memory: Optional[Memory]
    """Measured in a process of its own; null when not run."""
    precision: Optional[Precision]
    """Precision census; null when the runtime cannot show its graph or did not run."""
    speedup: Optional[float]
    """p50 of the export entry's fp32 artifact / this p50 (on this host); null when unknown."""
    info: dict[str, Any]
    """Exporter facts (exporter used, opset, quantization, ...): per target, not specified here."""
    not_run: Optional[str] = None
    """Present when the runtime cannot run here (Core ML off macOS, TensorRT without a GPU): why."""
    devices: Optional[list[DeviceEntry]] = None
    """Present with ``validate.devices``: one entry per device, in the recipe's order."""
    diagnosis: Optional[Diagnosis] = None
    """Present when its SQNR is below ``gates.min_sqnr_db``."""


# ----------------------------------------------------------------------------- gates, stages, run
class GateResult(ClosedModel):
    """One configured gate on one shipped artifact (or one of its devices)."""

    name: str
    """The gate: ``max_metric_drop``, ``min_sqnr_db``, ``min_top1_agreement``,
    ``max_latency_ms_p90``, ``min_speedup`` or ``max_size_bytes``."""
    artifact: Optional[str]
    """``<artifact>`` or ``<artifact>@<device>``; null when no artifact had role ``edgeprep``."""
    limit: float
    """The recipe's limit, in the gate's unit (metric units, dB, fraction, ms, ratio, bytes)."""
    value: Optional[float]
    """The measured value in the same unit; null when not measured (the gate then fails) or for
    identical outputs under ``min_sqnr_db`` (infinite SQNR; it passes)."""
    passed: bool
    note: Optional[str]
    """Why the value is missing, or what else needs saying; null otherwise."""
    skipped: bool = False
    """True (and passed) when the runtime cannot run here and ``gates.unavailable_runtimes`` is ``skip``."""
    device: Optional[str] = None
    """Device gates only: the device's label."""
    device_url: Optional[str] = None
    """Device gates only: its URL."""
    emulated: Optional[bool] = None
    """Device gates only: whether the device is emulated."""


class Stage(OpenModel):
    """One compression stage of the recipe, in order."""

    kind: str
    """The stage kind (``finetune``, ``prune``, ``qat``, ``reparam``, ``binarize``, a plugin's)."""
    seconds: float
    """Wall time of the stage, seconds."""
    params: int
    """Parameters of the model after it."""
    macs: int
    """Multiply-accumulates of one forward pass at batch 1 after it."""
    metric: Metric
    """The PyTorch model's metric on the eval split after it."""
    notes: list[str]
    """One line per thing the stage wants said."""
    details: dict[str, Any]
    """Stage-specific measurements (``pruning``, ``qat``, ``reparam``, ``binarize``, training
    ``steps``/``final_loss``/...): per stage kind, not specified here."""


class CpuInfo(OpenModel):
    """This host's CPU (edgeprep/measure/host.py ``host_cpu``)."""

    model: Optional[str]
    """The CPU's model name."""
    arch: Optional[str]
    """Machine architecture, e.g. ``x86_64``, ``aarch64``."""
    isa: list[str]
    """Instruction-set extensions int8 kernels depend on (``avx2``, ``avx512_vnni``, ``asimddp``, ...)."""
    cores: Optional[int]
    """Logical cores."""


class Machine(OpenModel):
    """Where every number in the report was measured."""

    platform: str
    """``platform.platform()``."""
    processor: str
    """``platform.processor()`` (or the machine type)."""
    python: str
    """Python version."""
    torch: str
    """PyTorch version."""
    cpu_threads: int
    """Threads PyTorch used."""
    cpu: Optional[CpuInfo]
    """This host's CPU (int8 kernels differ per CPU family); null only in reports upgraded from /1
    that predate the field."""


class ModelSummary(OpenModel):
    """The model the recipe compressed, after its last stage."""

    name: str
    """The recipe's model."""
    params: int
    """Parameters of the final (compressed) model."""
    macs: int
    """Multiply-accumulates of one forward pass at batch 1, final model."""


class Baseline(OpenModel):
    """The fp32 PyTorch model before any compression stage (after leading finetune stages)."""

    metric: Metric
    """Its metric on the eval split: the reference of ``max_metric_drop``."""
    params: int
    """Its parameters."""
    bytes: Optional[int]
    """Size of its fp32 artifact (else the shipped one), bytes; null without artifacts."""
    metric_on_parity_rows: Optional[Metric] = None
    """With devices: its metric on the parity rows, the reference of a device's ``max_metric_drop``."""


class Report(ClosedModel):
    """report.json, schema ``edgeprep.report/2``."""

    schema_: Literal[REPORT_SCHEMA] = Field(alias="schema")  # "schema" would shadow a BaseModel attribute
    """Always ``edgeprep.report/2``."""
    recipe: str
    """The recipe's name."""
    created: str
    """When the report was written: ISO 8601, UTC, seconds."""
    edgeprep_version: str
    """The edgeprep release that wrote it."""
    machine: Machine
    model: ModelSummary
    baseline: Baseline
    stages: list[Stage]
    """In recipe order; empty when the recipe has none."""
    artifacts: list[Artifact]
    """In export order: each export entry's artifact, its fp32 baseline, then its PTQ peers."""
    gates: list[GateResult]
    """In gate order (see docs/report-schema.md), each followed by its device results."""
    passed: bool
    """Every gate passed and no device failed."""

    model_config = ConfigDict(populate_by_name=True)

    @field_validator("artifacts")
    @classmethod
    def _names_unique(cls, arts: list[Artifact]) -> list[Artifact]:
        names = [a.name for a in arts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:  # check matches artifacts by name: a duplicate would compare the wrong one
            raise PydanticCustomError("duplicate_names", "artifact name(s) {names} appear twice; names must be unique",
                                      {"names": ", ".join(dupes)})
        return arts

    @model_validator(mode="after")
    def _verdict_agrees(self) -> "Report":
        failed = [g for g in self.gates if not g.passed]
        if self.passed and failed:
            raise PydanticCustomError("verdict", "passed is true but gate {gate} failed",
                                      {"gate": f"{failed[0].name} ({failed[0].artifact})"})
        return self


class GateInputs(OpenModel):
    """What the gates read of a report being built (no gates, no verdict yet)."""

    baseline: Optional[Baseline] = None
    artifacts: list[Artifact] = []


# ----------------------------------------------------------------------------- reading
def describe_errors(exc: ValidationError) -> str:
    """One line: the first problem at its field path (``artifacts.0.parity.sqnr_db``), then how
    many more."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    path = ".".join(str(p) for p in first["loc"]) or "(top level)"
    got = first.get("input")
    shown = "" if first["type"] in ("missing", "duplicate_names", "verdict") or isinstance(got, (Mapping, list)) \
        else f" (got {json.dumps(got, default=str)[:60]})"
    more = f"; {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    return f"{path}: {first['msg']}{shown}{more}"


def load_report_document(obj: Any, where: str = "report") -> Report:
    """A report.json document (parsed JSON) as a ``Report``. Accepts ``edgeprep.report/2`` and the
    older ``/1`` (upgraded: edgeprep/report_schema_v1.py); anything else is ``BadInputError``
    (exit 2), one line naming ``where`` and the field."""
    if not isinstance(obj, Mapping):
        raise BadInputError(f"{where}: expected a JSON object with schema '{REPORT_SCHEMA}', got {type(obj).__name__}")
    schema = obj.get("schema")
    if schema == SCHEMA_V1:
        obj = upgrade_v1(obj, REPORT_SCHEMA)
    elif schema != REPORT_SCHEMA:
        raise BadInputError(f"{where}: schema is {schema!r}, expected '{REPORT_SCHEMA}' or the older '{SCHEMA_V1}' "
                            "(produce it with this edgeprep version, or regenerate the baseline)")
    try:
        return Report.model_validate(obj)
    except ValidationError as exc:
        raise BadInputError(f"{where}: not a valid {schema} report: {describe_errors(exc)}") from None


class ReportSchemaError(ValueError):
    """The pipeline built a report that does not match its schema: a bug in edgeprep, not in the input."""


def check_written_report(document: Mapping[str, Any]) -> Report:
    """The writer's check, on the JSON-safe document just before it is written."""
    try:
        return Report.model_validate(document)
    except ValidationError as exc:
        raise ReportSchemaError(f"report.json does not match {REPORT_SCHEMA} (a bug in edgeprep; please report "
                                f"it): {describe_errors(exc)}") from None


def gate_inputs(report: Union[Report, GateInputs, Mapping[str, Any]]) -> Union[Report, GateInputs]:
    """The typed view the gates read. A mapping is the pipeline's report being built: in-process
    values (numpy scalars, tuples), so it is read without strict types; its keys are checked."""
    if isinstance(report, (Report, GateInputs)):
        return report
    try:
        return GateInputs.model_validate(report, strict=False)
    except ValidationError as exc:
        raise ReportSchemaError(f"the report being judged does not match {REPORT_SCHEMA}: {describe_errors(exc)}") \
            from None


# ----------------------------------------------------------------------------- JSON Schema
def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of report.json, generated from ``Report``."""
    schema = Report.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":  # python -m edgeprep.report_schema > docs/report-schema.json
    sys.stdout.write(json_schema_text())
