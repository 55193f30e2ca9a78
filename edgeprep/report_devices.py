"""The report's on-device section: every artifact as profiled on each remote device of the recipe's
``validate.devices`` (edgeprep/remote/), with the device's own description. None without devices.
Emulated CPU families (emu://) show parity and metric only: their latency is QEMU's translation
speed, so its cells say "emulated" instead of a number; `native` rows repeat the host's own entry."""
from __future__ import annotations

from typing import Any, Mapping

from edgeprep.gates import artifact_name
from edgeprep.measure.memory import load_and_run_bytes
from edgeprep.report_model import MISSING, Section, Table, cell_text, fmt, fmt_metric, fmt_pct, fmt_sqnr, get_nested


def device_sections(arts: list[Mapping[str, Any]]) -> list[Section]:
    t = Table(["artifact", "device", "runtime", "p50 ms", "p90 ms", "p99 ms", "speedup on device", "load+run MiB",
               "SQNR dB", "top-1 agree", "metric", "status"],
              numeric=[False, False, False, True, True, True, True, True, True, True, True, False])
    described: dict[str, str] = {}
    emulated = native = False
    for a in arts:
        for d in a.get("devices") or []:
            label = cell_text(d.get("device"))
            desc = d.get("description")
            emulated, native = emulated or bool(d.get("emulated")), native or bool(d.get("native"))
            if isinstance(desc, Mapping) and label not in described and (d.get("emulated") or d.get("native")):
                flags = desc.get("isa_flags") if isinstance(desc.get("isa_flags"), Mapping) else {}
                on = " ".join(k for k, v in flags.items() if v) or " ".join(desc.get("isa") or []) or MISSING
                off = " ".join(k for k, v in flags.items() if not v)
                how = (f"emulated by {cell_text(desc.get('emulated_by'))} on this host" if d.get("emulated")
                       else "this host, the artifact's own measurement")
                described[label] = (f"{label} ({cell_text(d.get('url'))}): {cell_text(desc.get('cpu'))}; ISA {on}"
                                    f"{'; not ' + off if off else ''}; {how}, Python {cell_text(desc.get('python'))}")
            elif isinstance(desc, Mapping) and label not in described:
                board = f"{desc.get('board')}, " if desc.get("board") else ""
                mem = desc.get("memory_bytes")
                described[label] = (f"{label} ({cell_text(d.get('url'))}): {board}{cell_text(desc.get('cpu'))}, "
                                    f"{cell_text(desc.get('cores'))} cores, {cell_text(desc.get('machine'))}, "
                                    f"{cell_text(desc.get('os'))} (kernel {cell_text(desc.get('kernel'))}), "
                                    f"{'memory ' + fmt(mem / 2**30, '.1f', ' GiB') + ', ' if mem else ''}"
                                    f"Python {cell_text(desc.get('python'))}, numpy {cell_text(desc.get('numpy'))}")
            lat = d.get("latency_ms") or {}
            added = load_and_run_bytes(d.get("memory"))
            timed = not d.get("emulated")  # emulated milliseconds are not a timing: no number shown
            runtime = (f"{get_nested(d, 'runtime', 'package')} {get_nested(d, 'runtime', 'version')}"
                       if d.get("runtime") else MISSING)
            status = d.get("error") or d.get("not_run") or ("ok (emulated)" if d.get("emulated") else
                                                            "ok (host)" if d.get("native") else "ok")
            ms = (lambda k: fmt(lat.get(k), ".3f")) if timed else (lambda k: "emulated")
            t.rows.append([artifact_name(a), label, runtime, ms("p50"), ms("p90"), ms("p99"),
                           fmt(d.get("speedup"), ".2f", "x") if timed else "emulated",
                           fmt(added / 2**20 if added is not None else None, ".1f") if timed else "emulated",
                           fmt_sqnr(d.get("parity")),
                           fmt_pct(get_nested(d, "parity", "top1_agreement"), 2), fmt_metric(d.get("metric")), status])
            t.row_status.append("fail" if d.get("error") else None)
    if not t.rows:
        return []
    notes = list(described.values())
    notes.append("Measured on each ssh:// device (or under QEMU on this host for emu://): the artifact and a "
                 "standalone runner are copied to a temp dir there and removed afterwards. Parity and metric are on "
                 "the device's outputs for the manifest's reference inputs; load+run MiB is what loading the "
                 "artifact and running it adds to the runner process (its peak RSS minus its RSS before the load, "
                 "Python and the runtime already imported; both are in report.json's memory); speedup is against "
                 "the fp32 artifact of the same export entry on the same device.")
    if emulated:
        notes.append("Emulated devices (emu://) run the same runner and runtime under QEMU user mode on this host, "
                     "so the runtime picks that CPU family's kernels: their SQNR, top-1 agreement and metric are that "
                     "family's numerics. Their latency is NOT a timing (QEMU translates every instruction) and their "
                     "memory includes QEMU's own translation buffers: both are kept in report.json (latency with "
                     "latency_is_timing false), shown here as 'emulated', and no latency or speedup gate reads them.")
    if native:
        notes.append("native is this host: its row repeats the artifact's own measurement (not run again).")
    title = "On-device profiles (SSH" + (", emulated CPUs" if emulated else "") + ")"
    return [Section(title, t, notes)]
