"""The report's "Latency and memory details" section: each artifact's latency percentiles (measured
in edgeprep's process) and its own memory (measured in a subprocess of its own,
edgeprep/measure/memory.py), with a note that says what each memory number is."""
from __future__ import annotations

from typing import Any, Mapping

from edgeprep.gates import artifact_name
from edgeprep.measure.memory import load_and_run_bytes
from edgeprep.report_model import MISSING, Section, Table, fmt, fmt_int, get_nested

MIB = 2**20
LOAD_RUN_HEADER = "load+run MiB (own process)"
PEAK_HEADER = "process peak MiB (own process)"


def mib(n: Any) -> str:
    return fmt(n / MIB if isinstance(n, (int, float)) else None, ".1f")


def latency_section(arts: list[Mapping[str, Any]]) -> Section:
    t = Table(["name", "p50 ms", "p90 ms", "p99 ms", "mean ms", "95% CI of p50 ms", "iters", "warmup",
               "threads", "batch", LOAD_RUN_HEADER, PEAK_HEADER], numeric=[False] + [True] * 11)
    old_process_rss = False  # a report written before "memory": only the whole process's mark
    unmeasured: list[str] = []
    for a in arts:
        lat = a.get("latency_ms")
        if not isinstance(lat, Mapping):
            continue
        ci = lat.get("ci95_p50")
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            ci_s = f"{fmt(ci[0], '.3f')} – {fmt(ci[1], '.3f')}"
        else:
            ci_s = fmt(ci, ".3f")
        memory = a.get("memory")
        old_process_rss = old_process_rss or (memory is None and lat.get("peak_rss_bytes") is not None)
        why = ((get_nested(memory, "error") or get_nested(memory, "not_measured")) if isinstance(memory, Mapping)
               else None)
        if why:
            unmeasured.append(f"{artifact_name(a)}: memory not measured: {why}")
        t.rows.append([artifact_name(a)] + [fmt(lat.get(k), ".3f") for k in ("p50", "p90", "p99", "mean")]
                      + [ci_s] + [fmt_int(lat.get(k)) for k in ("iters", "warmup", "threads", "batch")]
                      + [mib(load_and_run_bytes(memory)),
                         MISSING if why else mib(get_nested(memory, "peak_rss_bytes"))])
        t.row_status.append(None)
    if not t.rows:
        return Section("Latency and memory details", t, ["No artifact was profiled."])
    notes = [f"Latency: measured in edgeprep's process on the artifact's runtime. {LOAD_RUN_HEADER}: what "
             "loading the artifact and running it at the profile batch adds to a fresh process of its own (one "
             "subprocess per artifact, with Python, numpy and the runtime already imported): its peak RSS minus its "
             f"RSS right before the load (report.json: memory.load_and_run_bytes). {PEAK_HEADER}: that "
             "subprocess's whole high-water mark, the Python interpreter and the runtime included "
             "(memory.peak_rss_bytes)."]
    if old_process_rss:
        notes.append("This report predates per-artifact memory: it recorded only the whole edgeprep process's peak "
                     "RSS (latency_ms.peak_rss_bytes), the same for every artifact, so no memory is shown.")
    return Section("Latency and memory details", t, notes + unmeasured)
