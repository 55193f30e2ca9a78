"""The CI gate: compare a run's report.json against a stored baseline report.json.

Artifacts are matched by name. For each artifact in the baseline, four quantities are compared:
metric (must not drop), parity SQNR (must not drop), size (must not grow), p50 latency (must not
grow), each within a tolerance. A baseline artifact missing from the report fails, and so does a
report whose own gates failed (``"passed": false``). A quantity the baseline has but the report
lost (null) fails; one the baseline never measured cannot regress and is reported as skipped.

Both reports are read through the typed schema (edgeprep/report_schema.py, docs/report-schema.md):
``edgeprep.report/2``, or a baseline written by an older edgeprep as ``/1``.
``compare`` returns a ``CheckResult``; ``write_junit`` turns it into JUnit XML for CI dashboards.
The CLI prints ``result.summary()`` and exits 1 (``GateFailedError``) when ``not result.passed``.
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from edgeprep.errors import BadInputError, GateFailedError
from edgeprep.fsutil import write_bytes_atomic, write_json_atomic
from edgeprep.gates import as_number, clean, metric_drop, within
from edgeprep.jsonfile import JsonFileError, read_json
from edgeprep.report_schema import Artifact, Report, load_report_document

# SQNR at or above this is float32 rounding noise (fp32 kernels that merely reorder sums land at
# ~100-140 dB; fp16 is ~60 dB, int8 ~20-45 dB). Values are clamped here before comparing, so an
# fp32 artifact going from bit-identical (infinite) to 118 dB after a runtime upgrade is no regression.
SQNR_CEILING_DB = 90.0


@dataclass(frozen=True)
class Case:
    name: str  # "<artifact>.<quantity>", e.g. "onnx.latency_p50", or "report.passed"
    passed: bool
    message: str
    value: Optional[float] = None  # this report's value
    baseline: Optional[float] = None  # the baseline report's value
    limit: Optional[float] = None  # the worst value that still passes
    skipped: bool = False  # nothing to compare (quantity absent from the baseline, new artifact)


@dataclass
class CheckResult:
    cases: list[Case] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    @property
    def failures(self) -> list[Case]:
        return [c for c in self.cases if not c.passed]

    def summary(self) -> str:
        """One line: the verdict and every failure's message."""
        n_skip = sum(c.skipped for c in self.cases)
        head = f"{len(self.cases) - len(self.failures) - n_skip} passed, {len(self.failures)} failed, {n_skip} skipped"
        if self.passed:
            return f"check passed: {head}"
        return f"check failed: {head}: " + "; ".join(c.message for c in self.failures)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "cases": [asdict(c) for c in self.cases]}


# ----------------------------------------------------------------------------- loading
def read_report_file(path: Path) -> tuple[Path, dict[str, Any], Report]:
    """(the report.json path, its document as read, the document as a ``Report``) for a report.json or
    the run directory holding it; ``BadInputError`` (exit 2) in one line when it is missing, is not
    JSON, or is not an ``edgeprep.report/2`` (or ``/1``) report."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise BadInputError(f"report not found: {path} (give a report.json or the run directory holding it)")
    try:
        document = read_json(path)
    except JsonFileError as e:
        raise BadInputError(f"{path}: {e}; give a report.json written by `edgeprep run`") from None
    return path, document, validate_report(document, str(path))


def load_report(path: Path) -> Report:
    """A report.json (or a run directory holding one) as a ``Report`` (``read_report_file``)."""
    return read_report_file(path)[2]


def save_as_baseline(report_path: Path, baseline_path: Path) -> dict[str, Any]:
    """Store a run's report as the baseline later runs are checked against (``check --save-baseline``).

    A run that failed its own gates is refused (``GateFailedError``): blessing it would make every
    later regression of the same size pass. The document is stored as it was read (validated
    first), atomically, so an existing baseline is replaced whole or not at all.
    """
    source, document, report = read_report_file(report_path)
    if not report.passed:
        raise GateFailedError(f"{source}: the run failed its gates, so it cannot be a baseline; fix the run "
                              "(or its gates) and save again")
    write_json_atomic(Path(baseline_path), document)
    return {"report": str(source), "baseline": str(baseline_path), "artifacts": len(report.artifacts)}


def validate_report(report: Any, where: str = "report") -> Report:
    """``report`` as a typed ``Report``: a ``Report`` as it is, a parsed document through the schema
    reader (``edgeprep.report/2``, or ``/1`` upgraded); ``BadInputError`` naming the first problem."""
    return report if isinstance(report, Report) else load_report_document(report, where)


# ----------------------------------------------------------------------------- comparing
def compare(report: Report | Mapping[str, Any], baseline: Report | Mapping[str, Any], latency_tolerance: float = 0.15,
            metric_tolerance: float = 0.0, sqnr_tolerance_db: float = 1.0, size_tolerance: float = 0.01) -> CheckResult:
    """Compare ``report`` with ``baseline`` (``Report``s, or documents read as ones), artifact by name.

    Tolerances (a value exactly at the limit passes):

    - ``latency_tolerance=0.15``: p50 may grow by up to 15% (a fraction of the baseline p50).
      Timing on shared CI machines moves by several percent between runs; 15% still catches a
      kernel falling back to float. Compare reports from the same machine class, and profile with
      the same threads and batch: different settings fail the case rather than compare apples to pears.
    - ``metric_tolerance=0.0``: the task metric may not drop at all (absolute, in metric units).
      Runs are seeded and deterministic, so the same code gives the same metric; any drop is a change
      a human should accept by refreshing the baseline. Raise it (e.g. 0.005) across machines whose
      float kernels differ. Improvements always pass.
    - ``sqnr_tolerance_db=1.0``: parity SQNR may drop by up to 1 dB (about 26% more error power),
      after clamping both sides at ``SQNR_CEILING_DB`` (float32-noise level). Null SQNR = identical = ∞.
    - ``size_tolerance=0.01``: the artifact may grow by up to 1% (a fraction of the baseline bytes):
      room for serializer metadata, not for a layer left in float.
    """
    for name, tol in (("latency_tolerance", latency_tolerance), ("metric_tolerance", metric_tolerance),
                      ("sqnr_tolerance_db", sqnr_tolerance_db), ("size_tolerance", size_tolerance)):
        if as_number(tol) is None or tol < 0 or math.isinf(tol):
            raise BadInputError(f"{name} must be a finite number >= 0, got {tol!r}")
    report = validate_report(report, "report")
    baseline = validate_report(baseline, "baseline")
    cases: list[Case] = []
    if not report.passed:
        failed = [f"{g.name} ({g.artifact})" for g in report.gates if not g.passed]
        why = f"gate(s) failed: {', '.join(failed)}" if failed else "the report is not marked passed"
        cases.append(Case("report.passed", False, f"report.passed: {why}"))
    else:
        cases.append(Case("report.passed", True, "report.passed: all recipe gates passed"))

    current = {a.name: a for a in report.artifacts}
    for base_art in baseline.artifacts:
        name = base_art.name
        art = current.pop(name, None)
        if art is None:
            cases.append(Case(f"{name}.present", False, f"{name}.present: artifact in the baseline is missing from the report"))
            continue
        cases.append(Case(f"{name}.present", True, f"{name}.present: artifact found"))
        cases.append(_metric_case(name, base_art, art, metric_tolerance))
        cases.append(_sqnr_case(name, base_art, art, sqnr_tolerance_db))
        cases.append(_size_case(name, base_art, art, size_tolerance))
        cases.append(_latency_case(name, base_art, art, latency_tolerance))
    for name in current:  # new artifacts: nothing to regress against yet
        cases.append(Case(f"{name}.present", True, f"{name}.present: new artifact, not in the baseline", skipped=True))
    return CheckResult(cases)


def _skip(case: str, what: str) -> Case:
    return Case(case, True, f"{case}: {what} not measured in the baseline; nothing to compare", skipped=True)


def _lost(case: str, what: str, base: float) -> Case:
    return Case(case, False, f"{case}: {what} was measured in the baseline ({base:g}) but not in the report", baseline=base)


def _metric_case(name: str, base_art: Artifact, art: Artifact, tol: float) -> Case:
    case = f"{name}.metric"
    bm, m = base_art.metric, art.metric
    base = as_number(bm.value) if bm is not None else None
    if bm is None or base is None:
        return _skip(case, "metric")
    drop, why = metric_drop(bm, m)
    if m is None or drop is None:
        if "cannot be compared" in (why or ""):
            return Case(case, False, f"{case}: {why}; refresh the baseline", baseline=base)
        return _lost(case, "metric", base)
    value = as_number(m.value)
    ok = within(drop, tol, upper=True)
    lower_better = next((h for h in (m.higher_is_better, bm.higher_is_better) if h is not None), True) is False
    limit = clean(base + tol if lower_better else base - tol)
    msg = (f"{case}: {m.name} {value:g} vs baseline {base:g} (drop {drop:g}, tolerance {tol:g})"
           + ("" if ok else " - regression"))
    return Case(case, ok, msg, value, base, limit)


def _clamp_sqnr(art: Artifact) -> Optional[float]:
    if art.parity is None:
        return None
    v = math.inf if art.parity.sqnr_db is None else as_number(art.parity.sqnr_db)  # null: identical outputs
    return None if v is None else min(v, SQNR_CEILING_DB)


def _sqnr_case(name: str, base_art: Artifact, art: Artifact, tol_db: float) -> Case:
    case = f"{name}.sqnr_db"
    base, value = _clamp_sqnr(base_art), _clamp_sqnr(art)
    if base is None:
        return _skip(case, "SQNR")
    if value is None:
        return _lost(case, "SQNR", base)
    limit = clean(base - tol_db)
    ok = within(value, limit, upper=False)
    capped = f" (values above {SQNR_CEILING_DB:g} dB count as {SQNR_CEILING_DB:g})" if max(base, value) >= SQNR_CEILING_DB else ""
    msg = (f"{case}: {value:.2f} dB vs baseline {base:.2f} dB (limit {limit:.2f} dB){capped}"
           + ("" if ok else " - regression"))
    return Case(case, ok, msg, value, base, limit)


def _grow_case(case: str, what: str, unit: str, base: Optional[float], value: Optional[float], tol: float,
               spec: str) -> Case:
    """Shared by size and latency: ``value`` may exceed ``base`` by at most ``tol`` (a fraction)."""
    if base is None:
        return _skip(case, what)
    if value is None:
        return _lost(case, what, base)
    limit = clean(base * (1 + tol))
    ok = within(value, limit, upper=True)
    change = f"{(value / base - 1) * 100:+.1f}%" if base else "n/a"
    msg = (f"{case}: {value:{spec}} {unit} vs baseline {base:{spec}} {unit} "
           f"({change}; limit +{tol * 100:g}% = {limit:{spec}} {unit})"
           + ("" if ok else " - regression"))
    return Case(case, ok, msg, value, base, limit)


def _size_case(name: str, base_art: Artifact, art: Artifact, tol: float) -> Case:
    return _grow_case(f"{name}.size_bytes", "size", "bytes", base_art.bytes, art.bytes, tol, ",.0f")


def _latency_case(name: str, base_art: Artifact, art: Artifact, tol: float) -> Case:
    case = f"{name}.latency_p50"
    bl, lat = base_art.latency_ms, art.latency_ms
    base = as_number(bl.p50) if bl is not None else None
    value = as_number(lat.p50) if lat is not None else None
    if bl is not None and lat is not None and base is not None and value is not None:
        differs = [f"{k} {getattr(lat, k)} vs {getattr(bl, k)}" for k in ("threads", "batch")
                   if getattr(bl, k) != getattr(lat, k)]
        if differs:
            return Case(case, False, f"{case}: profiled with different settings ({', '.join(differs)}); "
                        "profile with the baseline's settings or refresh the baseline", value, base)
    return _grow_case(case, "p50 latency", "ms", base, value, tol, ".3f")


# ----------------------------------------------------------------------------- JUnit
def write_junit(result: CheckResult, path: Path, suite_name: str = "edgeprep.check") -> None:
    """JUnit XML (testsuites > testsuite > testcase, <failure message=...> / <skipped>), atomically.

    The classname is the artifact ("onnx") so dashboards group cases per artifact.
    """
    n, n_fail = len(result.cases), len(result.failures)
    n_skip = sum(c.skipped for c in result.cases)
    counts = {"tests": str(n), "failures": str(n_fail), "errors": "0", "skipped": str(n_skip), "time": "0"}
    root = ET.Element("testsuites", {"name": suite_name, **counts})
    suite = ET.SubElement(root, "testsuite", {"name": suite_name, **counts})
    for c in result.cases:
        classname = f"{suite_name}.{c.name.rsplit('.', 1)[0]}"
        tc = ET.SubElement(suite, "testcase", {"classname": classname, "name": c.name, "time": "0"})
        details = "\n".join(f"{k}: {v}" for k, v in (("value", c.value), ("baseline", c.baseline), ("limit", c.limit))
                            if v is not None)
        if not c.passed:
            el = ET.SubElement(tc, "failure", {"message": c.message, "type": "regression"})
            el.text = details or c.message
        elif c.skipped:
            ET.SubElement(tc, "skipped", {"message": c.message})
        else:
            ET.SubElement(tc, "system-out").text = c.message
    ET.indent(root)
    write_bytes_atomic(Path(path), ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n")
