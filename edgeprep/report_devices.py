"""The report's on-device section: every artifact as profiled on each remote device of the recipe's
``validate.devices`` (edgeprep/remote/), with the device's own description. None without devices."""
from __future__ import annotations

from typing import Any, Mapping

from edgeprep.gates import artifact_name
from edgeprep.report import MISSING, Section, Table, _get, _text, fmt, fmt_metric, fmt_pct, fmt_sqnr


def device_sections(arts: list[Mapping[str, Any]]) -> list[Section]:
    t = Table(["artifact", "device", "runtime", "p50 ms", "p90 ms", "p99 ms", "speedup on device", "peak RSS MiB",
               "SQNR dB", "top-1 agree", "metric", "status"],
              numeric=[False, False, False, True, True, True, True, True, True, True, True, False])
    described: dict[str, str] = {}
    for a in arts:
        for d in a.get("devices") or []:
            label = _text(d.get("device"))
            desc = d.get("description")
            if isinstance(desc, Mapping) and label not in described:
                board = f"{desc.get('board')}, " if desc.get("board") else ""
                mem = desc.get("memory_bytes")
                described[label] = (f"{label} ({_text(d.get('url'))}): {board}{_text(desc.get('cpu'))}, "
                                    f"{_text(desc.get('cores'))} cores, {_text(desc.get('machine'))}, "
                                    f"{_text(desc.get('os'))} (kernel {_text(desc.get('kernel'))}), "
                                    f"{'memory ' + fmt(mem / 2**30, '.1f', ' GiB') + ', ' if mem else ''}"
                                    f"Python {_text(desc.get('python'))}, numpy {_text(desc.get('numpy'))}")
            lat = d.get("latency_ms") or {}
            peak = _get(d, "memory", "peak_rss_bytes")
            runtime = f"{_get(d, 'runtime', 'package')} {_get(d, 'runtime', 'version')}" if d.get("runtime") else MISSING
            status = d.get("error") or d.get("not_run") or "ok"
            t.rows.append([artifact_name(a), label, runtime, fmt(lat.get("p50"), ".3f"), fmt(lat.get("p90"), ".3f"),
                           fmt(lat.get("p99"), ".3f"), fmt(d.get("speedup"), ".2f", "x"),
                           fmt(peak / 2**20 if peak else None, ".1f"), fmt_sqnr(d.get("parity")),
                           fmt_pct(_get(d, "parity", "top1_agreement"), 2), fmt_metric(d.get("metric")), status])
            t.row_status.append("fail" if d.get("error") else None)
    if not t.rows:
        return []
    notes = list(described.values())
    notes.append("Measured on each device over SSH: the artifact and a standalone runner are copied to a temp dir "
                 "there and removed afterwards. Parity and metric are on the device's outputs for the manifest's "
                 "reference inputs; peak RSS is the runner process's high-water mark (Python and the runtime "
                 "included); speedup is against the fp32 artifact of the same export entry on the same device.")
    return [Section("On-device profiles (SSH)", t, notes)]
