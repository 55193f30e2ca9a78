"""Recipe gates: judge each shipped artifact against the tolerances in the recipe's ``gates:``.

A gate applies to every artifact with role ``"edgeprep"`` (the model the user ships); the
``baseline`` and ``ptq`` artifacts are in the report for comparison only and are never gated.
A gate whose quantity could not be measured FAILS, with ``value: null`` and a note saying what is
missing: a tolerance is never skipped silently (README: "a failed tolerance is never a warning").

The gates read the report through its typed model (edgeprep/report_schema.py): a ``Report``, or
the pipeline's report being built (a dict with ``baseline`` and ``artifacts``, no gates yet).
Each result is a dict ``{"name", "artifact", "limit", "value", "passed", "note"}`` that goes
verbatim into ``report["gates"]`` (``GateResult`` in docs/report-schema.md); ``note`` is ``None``
unless something needs explaining.

Devices: the numeric gates (DEVICE_GATES: metric drop, SQNR, top-1 agreement) also judge every
entry in a shipped artifact's ``"devices"`` (ssh:// boards and emu:// emulated CPU families), each
as its own result with ``artifact: "<name>@<device>"`` and the added fields ``device``,
``device_url`` and ``emulated``. A device entry with an error, or without parity, fails them. The
latency, speedup and size gates judge the host's artifact only: no gate ever reads a device's
latency, least of all an emulated one's, which is QEMU's translation speed and not a timing. A
`native` device entry is the host's own measurement, already judged by the artifact's results.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Union

from edgeprep.errors import GateFailedError
from edgeprep.recipe import GatesConfig
from edgeprep.report_schema import Artifact, DeviceEntry, GateInputs, Metric, Report, gate_inputs

SHIPPED_ROLE = "edgeprep"

# Limits are compared after rounding the measured value to this many decimals, and with a relative
# slack of 1e-9: 0.95 - 0.93 is 0.020000000000000018 in binary floating point, and a drop of
# exactly the limit must pass. Neither is large enough to hide a real difference in any quantity
# we gate (metrics, dB, milliseconds, ratios, bytes).
_ROUND_DECIMALS = 12
_REL_SLACK = 1e-9


def as_number(x: Any) -> Optional[float]:
    """``x`` as a finite-or-infinite float, or ``None`` when it is missing or not a number.

    ``bool`` is refused on purpose (``True`` is an ``int`` in Python, but never a measurement);
    NaN becomes ``None`` because a NaN measurement is no measurement.
    """
    if isinstance(x, bool) or x is None:
        return None
    if hasattr(x, "item") and not isinstance(x, (int, float)):  # numpy scalar
        x = x.item()
    if not isinstance(x, (int, float)):
        return None
    x = float(x)
    return None if math.isnan(x) else x


def clean(value: float) -> float:
    """Drop binary-floating-point noise from a derived value (e.g. a difference of two metrics)."""
    return round(value, _ROUND_DECIMALS) if math.isfinite(value) else value


def within(value: float, limit: float, *, upper: bool) -> bool:
    """``value <= limit`` (``upper=True``) or ``value >= limit`` (``upper=False``); a value equal
    to the limit up to floating-point noise passes."""
    if math.isnan(value) or math.isnan(limit):
        return False
    ok = value <= limit if upper else value >= limit
    return ok or math.isclose(value, limit, rel_tol=_REL_SLACK, abs_tol=1e-12)


def metric_drop(reference: Optional[Metric], metric: Optional[Metric]) -> tuple[Optional[float], Optional[str]]:
    """How much ``metric`` lost against ``reference``, and why not if unknown.

    Metrics are higher-is-better (accuracy, embedding cosine fidelity) unless the metric says
    ``higher_is_better: false``; then the drop is ``value - reference`` (e.g. a loss that grew).
    """
    ref_v = as_number(reference.value) if reference is not None else None
    if reference is None or ref_v is None:
        return None, "baseline metric not measured"
    v = as_number(metric.value) if metric is not None else None
    if metric is None or v is None:
        return None, "metric not measured on the runtime"
    if reference.name != metric.name:
        return None, f"metric '{metric.name}' cannot be compared with baseline metric '{reference.name}'"
    higher_is_better = next((h for h in (metric.higher_is_better, reference.higher_is_better) if h is not None), True)
    drop = (ref_v - v) if higher_is_better else (v - ref_v)
    return clean(drop), None


def artifact_name(artifact: Mapping[str, Any]) -> str:
    """An artifact entry's name in a report dict (the views read dicts). The first report schema had
    no "name"; the target is unique per run when name is absent (report_schema_v1.py does the same)."""
    return str(artifact.get("name") or artifact.get("target") or "?")


# What a gate judges: an artifact's measurement on this host, or one of its device entries.
Entry = Union[Artifact, DeviceEntry]
# What it judges them against: a whole report, or the pipeline's report being built (no gates yet).
Judged = Union[Report, GateInputs]
# Each measure returns (value, note). value None means "could not be measured" -> the gate fails.
Measure = Callable[[Judged, Entry], tuple[Optional[float], Optional[str]]]


def _metric_drop(report: Judged, entry: Entry) -> tuple[Optional[float], Optional[str]]:
    return metric_drop(report.baseline.metric if report.baseline else None, entry.metric)


def _device_metric_drop(report: Judged, dev: Entry) -> tuple[Optional[float], Optional[str]]:
    """A device's metric is computed on the parity rows (the reference inputs it was sent), so its
    drop is taken against the baseline's metric on those same rows when the report has it."""
    rows = report.baseline.metric_on_parity_rows if report.baseline else None
    if rows is not None and dev.metric is not None and rows.samples == dev.metric.samples:
        return metric_drop(rows, dev.metric)
    return _metric_drop(report, dev)


def _sqnr_db(report: Judged, entry: Entry) -> tuple[Optional[float], Optional[str]]:
    if entry.parity is None:
        return None, "parity not measured on the runtime"
    raw = entry.parity.sqnr_db
    if raw is None:  # the schema's convention: identical outputs, infinite SQNR
        return math.inf, "outputs identical to the reference (infinite SQNR)"
    value = as_number(raw)
    if value is None:
        return None, f"SQNR is not a number ({raw!r})"
    return value, None


def _top1(report: Judged, entry: Entry) -> tuple[Optional[float], Optional[str]]:
    if entry.parity is None:
        return None, "parity not measured on the runtime"
    value = as_number(entry.parity.top1_agreement)
    if value is None:  # a tolerance the run cannot show fails: the recipe asks for something meaningless here
        return None, ("top-1 agreement does not apply: the model's first output is not class logits (e.g. an "
                      "embedding model); remove min_top1_agreement from the recipe's gates")
    return value, None


def _latency_p90(report: Judged, entry: Entry) -> tuple[Optional[float], Optional[str]]:
    value = as_number(entry.latency_ms.p90) if entry.latency_ms is not None else None
    return (value, None) if value is not None else (None, "p90 latency not measured on the runtime")


def _speedup(report: Judged, entry: Entry) -> tuple[Optional[float], Optional[str]]:
    value = as_number(entry.speedup)
    if value is None:
        return None, "speedup unknown (no fp32 baseline artifact profiled on the same runtime)"
    return value, None


def _size_bytes(report: Judged, entry: Entry) -> tuple[Optional[float], Optional[str]]:
    # a host artifact always has its file size (the schema requires it); no device entry is size-gated
    return (float(entry.bytes), None) if isinstance(entry, Artifact) else (None, "artifact size unknown")


# gate name -> (measure, upper limit?) ; order = order in the report
GATES: dict[str, tuple[Measure, bool]] = {
    "max_metric_drop": (_metric_drop, True),
    "min_sqnr_db": (_sqnr_db, False),
    "min_top1_agreement": (_top1, False),
    "max_latency_ms_p90": (_latency_p90, True),
    "min_speedup": (_speedup, False),
    "max_size_bytes": (_size_bytes, True),
}


# The gates that also judge each device entry: numerics only (never latency; see the docstring).
DEVICE_GATES = ("max_metric_drop", "min_sqnr_db", "min_top1_agreement")


def evaluate_gates(gates: GatesConfig, report: Union[Judged, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One result per (configured gate, artifact with role ``"edgeprep"``), in ``GATES`` order,
    each followed by one per device entry of that artifact for the DEVICE_GATES.

    A configured gate with no ``edgeprep`` artifact to judge yields one failed result with
    ``artifact: None``: the recipe promised a tolerance the run cannot show.
    """
    inputs = gate_inputs(report)
    shipped = [a for a in inputs.artifacts if a.role == SHIPPED_ROLE]
    results: list[dict[str, Any]] = []
    for name, (measure, upper) in GATES.items():
        limit = getattr(gates, name, None)
        if limit is None:
            continue
        if not shipped:
            results.append(_result(name, None, limit, None, False, "no artifact with role 'edgeprep' to judge"))
            continue
        for art in shipped:
            results.append(_judge(gates, inputs, name, art, art.name, limit, measure, upper, "this machine"))
            if name not in DEVICE_GATES:
                continue
            for dev in art.devices or []:
                if dev.native:  # the host's own measurement: the result just above
                    continue
                label = dev.device or dev.url or "?"
                result = _judge(gates, inputs, name, dev, f"{art.name}@{label}", limit,
                                _device_metric_drop if name == "max_metric_drop" else measure, upper, f"device {label}")
                result.update(device=label, device_url=dev.url, emulated=bool(dev.emulated))
                results.append(result)
    return results


def _judge(gates: GatesConfig, report: Judged, name: str, entry: Entry, label: str,
           limit: Any, measure: Measure, upper: bool, where: str) -> dict[str, Any]:
    """One gate on one entry: an artifact's host measurement or one of its device entries."""
    error = entry.error if isinstance(entry, DeviceEntry) else None
    if error:  # a device that failed: its numbers are unknown, so the gate fails
        return _result(name, label, limit, None, False, f"{where} failed: {error}")
    not_run = entry.not_run
    if not_run and name != "max_size_bytes":  # the size is known without running it
        skip = getattr(gates, "unavailable_runtimes", "fail") == "skip"
        note = f"not run on {where}: {not_run}" + (" (skipped: gates.unavailable_runtimes is skip)" if skip else "")
        return _result(name, label, limit, None, skip, note, skipped=skip)
    value, note = measure(report, entry)
    passed = value is not None and within(value, float(limit), upper=upper)
    return _result(name, label, limit, value, passed, note)


def _result(name: str, artifact: Optional[str], limit: Any, value: Optional[float], passed: bool,
            note: Optional[str], skipped: bool = False) -> dict[str, Any]:
    # JSON has no infinity: an identical-output SQNR is stored as null with its note (and passed).
    json_value = value if value is None or math.isfinite(value) else None
    if isinstance(limit, int) and json_value is not None and float(json_value).is_integer():
        json_value = int(json_value)  # byte counts stay integers in report.json
    result = {"name": name, "artifact": artifact, "limit": limit, "value": json_value,
              "passed": bool(passed), "note": note}
    if skipped:
        result["skipped"] = True
    return result


def failed_gates(results: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in results if not r.get("passed")]


def describe_failures(results: list[Mapping[str, Any]]) -> str:
    """One line naming every failed gate with its value and limit ('' when all passed)."""
    parts = []
    for r in failed_gates(results):
        where = f" on {r['artifact']}" if r.get("artifact") else ""
        got = "not measured" if r.get("value") is None else f"{r['value']:g}"
        why = f" ({r['note']})" if r.get("note") and r.get("value") is None else ""
        parts.append(f"{r['name']}{where}: {got}{why}, limit {r['limit']:g}")
    return "; ".join(parts)


def raise_for_failed_gates(results: list[Mapping[str, Any]]) -> None:
    """Raise ``GateFailedError`` (exit 1) if any gate failed. Call it after the report is written,
    so the user can open the report and see the failed gate in red."""
    if failed_gates(results):
        raise GateFailedError(f"gate(s) failed: {describe_failures(results)}")
