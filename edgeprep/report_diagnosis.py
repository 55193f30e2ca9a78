"""The report's "Where parity breaks" section: for every shipped artifact (or device) whose SQNR
fell below ``gates.min_sqnr_db``, the first diverging heavy layer and the fixes measured on that
same target (``edgeprep.measure.diagnose``). None when parity held everywhere."""
from __future__ import annotations

from typing import Any, Mapping

from edgeprep.gates import artifact_name
from edgeprep.report_model import Section, Table, cell_text, fmt, fmt_int


def diagnosis_sections(arts: list[Mapping[str, Any]]) -> list[Section]:
    where = Table(["artifact", "target", "first diverging layer", "op", "SQNR before", "SQNR after", "reference"],
                  numeric=[False, False, False, False, True, True, False])
    fixes = Table(["artifact", "target", "fix", "SQNR dB there", "bytes delta", "host p50 ms", "vs before"],
                  numeric=[False, False, False, True, True, True, True])
    notes = []
    for a in arts:
        for entry in [a, *(a.get("devices") or [])]:
            d = entry.get("diagnosis") if isinstance(entry, Mapping) else None
            if not isinstance(d, Mapping):
                continue
            target = cell_text(d.get("target"))
            div = d.get("divergence") or {}
            layer = div.get("layer") or {}
            if layer:
                where.rows.append([artifact_name(a), target, cell_text(layer.get("name")),
                                   cell_text(layer.get("op_type")), fmt(div.get("sqnr_before_db"), ".1f", " dB"),
                                   fmt(div.get("sqnr_after_db"), ".1f", " dB"), cell_text(div.get("reference"))])
                where.row_status.append("fail")
            else:
                notes.append(f"{artifact_name(a)} on {target}: {cell_text(d.get('summary'))}")
            for f in d.get("fixes") or []:
                if f.get("error"):
                    notes.append(f"{artifact_name(a)} on {target}: {f.get('option')}: {f['error']}")
                    continue
                fixes.rows.append([artifact_name(a), target, cell_text(f.get("option")), fmt(f.get("sqnr_db"), ".1f"),
                                   fmt_int(f.get("bytes_delta")), fmt(f.get("host_p50_ms"), ".3f"),
                                   fmt(f.get("host_latency_ratio"), ".2f", "x")])
                fixes.row_status.append(None if f.get("passes") else "fail")
            if d.get("retrain"):
                notes.append(f"{artifact_name(a)} on {target}: {d['retrain']}")
    if not where.rows and not notes:
        return []
    notes.append("Each heavy layer's output is compared on the failing target with the PyTorch module's output "
                 "(named layers) or this host's run with ONNX Runtime's QDQ fusions off (the graph's own float "
                 "semantics). Fixes are rewrites of the artifact file re-run on that target; host p50 is batch 1, "
                 "1 thread, on this machine.")
    sections = [Section("Where parity breaks", where if where.rows else None, notes)]
    if fixes.rows:
        sections.append(Section("Fixes measured on the failing target", fixes))
    return sections
