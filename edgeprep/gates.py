"""Recipe gates: judge each shipped artifact against the tolerances in the recipe's ``gates:``.

A gate applies to every artifact with role ``"edgeprep"`` (the model the user ships); the
``baseline`` and ``ptq`` artifacts are in the report for comparison only and are never gated.
A gate whose quantity could not be measured FAILS, with ``value: null`` and a note saying what is
missing: a tolerance is never skipped silently (DESIGN.md: "a failed tolerance is never a warning").

Each result is a dict ``{"name", "artifact", "limit", "value", "passed", "note"}`` that goes
verbatim into ``report["gates"]``; ``note`` is ``None`` unless something needs explaining.

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
from typing import Any, Callable, Mapping, Optional

from edgeprep.errors import GateFailedError
from edgeprep.recipe import GatesConfig

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


def metric_drop(reference: Any, metric: Any) -> tuple[Optional[float], Optional[str]]:
    """How much ``metric`` ({"name", "value"}) lost against ``reference``, and why not if unknown.

    Metrics are higher-is-better (accuracy, embedding cosine fidelity) unless the metric dict says
    ``"higher_is_better": false``; then the drop is ``value - reference`` (e.g. a loss that grew).
    """
    if not isinstance(reference, Mapping) or as_number(reference.get("value")) is None:
        return None, "baseline metric not measured"
    if not isinstance(metric, Mapping) or as_number(metric.get("value")) is None:
        return None, "metric not measured on the runtime"
    ref_name, name = reference.get("name"), metric.get("name")
    if ref_name is not None and name is not None and ref_name != name:
        return None, f"metric '{name}' cannot be compared with baseline metric '{ref_name}'"
    ref_v, v = as_number(reference["value"]), as_number(metric["value"])
    higher_is_better = metric.get("higher_is_better", reference.get("higher_is_better", True))
    drop = (ref_v - v) if higher_is_better is not False else (v - ref_v)
    return clean(drop), None


def artifact_name(artifact: Mapping[str, Any]) -> str:
    # DESIGN.md's first schema had no "name"; the target is unique per run when name is absent.
    return str(artifact.get("name") or artifact.get("target") or "?")


# Each measure returns (value, note). value None means "could not be measured" -> the gate fails.
Measure = Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[Optional[float], Optional[str]]]


def _metric_drop(report: Mapping[str, Any], art: Mapping[str, Any]) -> tuple[Optional[float], Optional[str]]:
    baseline = report.get("baseline") or {}
    return metric_drop(baseline.get("metric") if isinstance(baseline, Mapping) else None, art.get("metric"))


def _device_metric_drop(report: Mapping[str, Any], dev: Mapping[str, Any]) -> tuple[Optional[float], Optional[str]]:
    """A device's metric is computed on the parity rows (the reference inputs it was sent), so its
    drop is taken against the baseline's metric on those same rows when the report has it."""
    baseline = report.get("baseline") or {}
    rows = baseline.get("metric_on_parity_rows") if isinstance(baseline, Mapping) else None
    metric = dev.get("metric")
    if isinstance(rows, Mapping) and isinstance(metric, Mapping) and rows.get("samples") == metric.get("samples"):
        return metric_drop(rows, metric)
    return _metric_drop(report, dev)


def _sqnr_db(report: Mapping[str, Any], art: Mapping[str, Any]) -> tuple[Optional[float], Optional[str]]:
    parity = art.get("parity")
    if not isinstance(parity, Mapping) or "sqnr_db" not in parity:
        return None, "parity not measured on the runtime"
    raw = parity["sqnr_db"]
    if raw is None:  # the pipeline's convention: identical outputs, infinite SQNR
        return math.inf, "outputs identical to the reference (infinite SQNR)"
    value = as_number(raw)
    if value is None:
        return None, f"SQNR is not a number ({raw!r})"
    return value, None


def _top1(report: Mapping[str, Any], art: Mapping[str, Any]) -> tuple[Optional[float], Optional[str]]:
    parity = art.get("parity")
    if not isinstance(parity, Mapping):
        return None, "parity not measured on the runtime"
    value = as_number(parity.get("top1_agreement"))
    if value is None:  # a tolerance the run cannot show fails: the recipe asks for something meaningless here
        return None, ("top-1 agreement does not apply: the model's first output is not class logits (e.g. an "
                      "embedding model); remove min_top1_agreement from the recipe's gates")
    return value, None


def _latency_p90(report: Mapping[str, Any], art: Mapping[str, Any]) -> tuple[Optional[float], Optional[str]]:
    latency = art.get("latency_ms")
    value = as_number(latency.get("p90")) if isinstance(latency, Mapping) else None
    return (value, None) if value is not None else (None, "p90 latency not measured on the runtime")


def _speedup(report: Mapping[str, Any], art: Mapping[str, Any]) -> tuple[Optional[float], Optional[str]]:
    value = as_number(art.get("speedup"))
    if value is None:
        return None, "speedup unknown (no fp32 baseline artifact profiled on the same runtime)"
    return value, None


def _size_bytes(report: Mapping[str, Any], art: Mapping[str, Any]) -> tuple[Optional[float], Optional[str]]:
    value = as_number(art.get("bytes"))
    return (value, None) if value is not None else (None, "artifact size unknown")


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


def evaluate_gates(gates: GatesConfig, report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One result per (configured gate, artifact with role ``"edgeprep"``), in ``GATES`` order,
    each followed by one per device entry of that artifact for the DEVICE_GATES.

    A configured gate with no ``edgeprep`` artifact to judge yields one failed result with
    ``artifact: None``: the recipe promised a tolerance the run cannot show.
    """
    shipped = [a for a in report.get("artifacts") or [] if isinstance(a, Mapping) and a.get("role", SHIPPED_ROLE) == SHIPPED_ROLE]
    results: list[dict[str, Any]] = []
    for name, (measure, upper) in GATES.items():
        limit = getattr(gates, name, None)
        if limit is None:
            continue
        if not shipped:
            results.append(_result(name, None, limit, None, False, "no artifact with role 'edgeprep' to judge"))
            continue
        for art in shipped:
            results.append(_judge(gates, report, name, art, artifact_name(art), limit, measure, upper,
                                  "this machine"))
            if name not in DEVICE_GATES:
                continue
            for dev in art.get("devices") or []:
                if not isinstance(dev, Mapping) or dev.get("native"):  # native: the result just above
                    continue
                label = str(dev.get("device") or dev.get("url") or "?")
                result = _judge(gates, report, name, dev, f"{artifact_name(art)}@{label}", limit,
                                _device_metric_drop if name == "max_metric_drop" else measure, upper, f"device {label}")
                result.update(device=label, device_url=dev.get("url"), emulated=bool(dev.get("emulated")))
                results.append(result)
    return results


def _judge(gates: GatesConfig, report: Mapping[str, Any], name: str, entry: Mapping[str, Any], label: str,
           limit: Any, measure: Measure, upper: bool, where: str) -> dict[str, Any]:
    """One gate on one entry: an artifact's host measurement or one of its device entries."""
    if entry.get("error"):  # a device that failed: its numbers are unknown, so the gate fails
        return _result(name, label, limit, None, False, f"{where} failed: {entry['error']}")
    not_run = entry.get("not_run")
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
