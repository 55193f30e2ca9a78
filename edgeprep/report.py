"""report.json (schema ``edgeprep.report/2``: docs/report-schema.md) and its views: report.md, report.html, plots.

The pipeline builds the report dict (its schema: docs/report-schema.md); this module checks and writes it.
Both views are rendered from one ``Document`` (edgeprep/report_model.py: titled tables of formatted strings), so the
Markdown and the HTML always show the same numbers. Missing measurements (``null``) render as "—";
``parity.sqnr_db: null`` means identical outputs and renders as "∞". Stages that pruned also get a
"Pruning" section and a per-layer sparsity chart (``edgeprep.report_prune``); a qat stage gets a
"Quantization-aware training" section (``edgeprep.report_qat``), a reparam stage a
"Re-parameterization" section (``edgeprep.report_reparam``), a binarize stage a "Binarization" section
(``edgeprep.report_binarize``).
"""
from __future__ import annotations

import math
from io import BytesIO
from pathlib import Path
from typing import Any, Mapping, Optional

from edgeprep import report_html
from edgeprep.fsutil import write_bytes_atomic, write_json_atomic, write_text_atomic
from edgeprep.gates import artifact_name, as_number

# The document model lives in report_model, below this module: the section modules (report_prune,
# report_devices, ...) import it and this module imports them, so neither imports the other back.
from edgeprep.report_model import (
    MISSING,
    Document,
    Section,
    Table,
    cell_text,
    fmt,
    fmt_int,
    fmt_metric,
    fmt_pct,
    fmt_sqnr,
    get_nested,
)
from edgeprep.report_schema import REPORT_SCHEMA  # noqa: F401  ("edgeprep.report/2", re-exported)

PLOT_RELPATH = "plots/metric_vs_latency.png"

# Marker, colour and legend label per artifact role (types.ARTIFACT_ROLES); unknown roles get "other".
ROLE_STYLE: dict[str, dict[str, Any]] = {
    "baseline": {"marker": "o", "color": "#4b5563", "label": "fp32 baseline", "s": 70},
    "ptq": {"marker": "s", "color": "#d97706", "label": "runtime PTQ", "s": 70},
    "edgeprep": {"marker": "*", "color": "#059669", "label": "edgeprep", "s": 220},
    "other": {"marker": "D", "color": "#7c3aed", "label": "other", "s": 60},
}


# Gate values carry the unit of their gate.
_GATE_FORMAT = {
    "max_metric_drop": lambda v: fmt(v),
    "min_sqnr_db": lambda v: fmt(v, ".2f", " dB"),
    "max_latency_ms_p90": lambda v: fmt(v, ".3f", " ms"),
    "min_speedup": lambda v: fmt(v, ".2f", "×"),
    "max_size_bytes": lambda v: fmt_int(v) + (" B" if as_number(v) is not None else ""),
}


# ----------------------------------------------------------------------------- document
def build_document(report: Mapping[str, Any], plot_notes: Optional[list[str]] = None) -> Document:
    from edgeprep.registry import stage_specs, target_specs
    from edgeprep.report_devices import device_sections
    from edgeprep.report_diagnosis import diagnosis_sections
    from edgeprep.report_latency import latency_section
    from edgeprep.report_targets import not_run_sections

    passed = report.get("passed")
    gates = [g for g in report.get("gates") or [] if isinstance(g, Mapping)]
    failed = [g for g in gates if not g.get("passed")]
    if passed is True:
        headline = f"PASSED: all {len(gates)} gate(s) passed" if gates else "PASSED (no gates configured)"
    elif passed is False:
        names = ", ".join(f"{g.get('name')} ({g.get('artifact') or 'no artifact'})" for g in failed)
        headline = f"FAILED: {len(failed)} of {len(gates)} gate(s) failed" + (f": {names}" if names else "")
        device_failures = sum(1 for a in report.get("artifacts") or [] if isinstance(a, Mapping)
                              for d in a.get("devices") or [] if isinstance(d, Mapping) and d.get("error"))
        if device_failures:
            headline += f"; {device_failures} on-device profile(s) failed (see On-device profiles)"
    else:
        headline = "UNKNOWN: the report has no pass/fail verdict"
        passed = None
    arts = [a for a in report.get("artifacts") or [] if isinstance(a, Mapping)]
    # Verdict first (gates), then what was shipped, then how it got there; details last.
    sections = [
        _gates_section(gates),
        *diagnosis_sections(arts),  # none unless an SQNR gate failed: where parity broke, and the fix
        _artifacts_section(arts),
        Section("Metric vs p50 latency", text=list(plot_notes or []), plot=True),
        _stages_section(report),
        # each registered stage kind's own sections (none when the run has no stage of that kind)
        *(section for spec in stage_specs().values() if spec.sections for section in spec.sections(report)),
        _model_section(report),
        _run_section(report),
        latency_section(arts),  # and each artifact's own memory
        _precision_section(arts),
        *not_run_sections(arts),  # none when every runtime ran here
        # each registered target's own sections (none without an artifact of that target)
        *(section for spec in target_specs().values() if spec.sections for section in spec.sections(arts)),
        *device_sections(arts),  # none without validate.devices
        _files_section(arts),
    ]
    return Document(f"edgeprep report: {cell_text(report.get('recipe'))}", passed, headline, sections,
                    machine_line(report))


def machine_line(report: Mapping[str, Any]) -> str:
    """"Measured on AMD EPYC (x86_64: avx, avx2, ...), 2 cores; onnxruntime 1.32.0; 1 thread": a
    parity or latency number means little without the CPU family and runtime release that made it
    (int8 kernels differ per CPU). Empty when the report names none of them."""
    from edgeprep.measure.host import cpu_label

    machine = report.get("machine") if isinstance(report.get("machine"), Mapping) else {}
    cpu = machine.get("cpu") or machine.get("processor")
    parts = []
    if cpu:
        cores = get_nested(cpu, "cores")
        parts.append(cpu_label(cpu, all_flags=True) + (f", {cores} cores" if cores else ""))
    arts = [a for a in report.get("artifacts") or [] if isinstance(a, Mapping)]
    runtimes = sorted({f"{a['runtime']} {a.get('runtime_version') or '(version not recorded)'}"
                       for a in arts if a.get("runtime")})
    parts += runtimes
    threads = sorted({int(t) for a in arts if (t := as_number(get_nested(a, "latency_ms", "threads"))) is not None})
    if threads:
        parts.append(f"{', '.join(map(str, threads))} thread{'s' if threads != [1] else ''}")
    return ("Measured on " + "; ".join(parts)) if parts else ""


def _kv_table(pairs: list[tuple[str, str]]) -> Table:
    return Table(["field", "value"], [[k, v] for k, v in pairs], [False, False], [None] * len(pairs))


def _run_section(report: Mapping[str, Any]) -> Section:
    pairs = [("recipe", cell_text(report.get("recipe"))), ("created", cell_text(report.get("created"))),
             ("edgeprep version", cell_text(report.get("edgeprep_version"))),
             ("schema", cell_text(report.get("schema")))]
    machine = report.get("machine")
    if isinstance(machine, Mapping):
        from edgeprep.measure.host import cpu_label

        pairs += [(f"machine.{k}",
                   cpu_label(v, all_flags=True) if k == "cpu" and isinstance(v, Mapping) else cell_text(v))
                  for k, v in machine.items()]
    return Section("Run", _kv_table(pairs), compact=True)


def _model_section(report: Mapping[str, Any]) -> Section:
    model, base = report.get("model") or {}, report.get("baseline") or {}
    metric = get_nested(base, "metric")
    metric_name = cell_text(get_nested(metric, "name"))
    pairs = [("model", cell_text(get_nested(model, "name"))), ("model params", fmt_int(get_nested(model, "params"))),
             ("model MACs", fmt_int(get_nested(model, "macs"))),
             (f"baseline {metric_name} (PyTorch)", fmt_metric(metric)),
             ("baseline params", fmt_int(get_nested(base, "params"))),
             ("baseline bytes", fmt_int(get_nested(base, "bytes")))]
    return Section("Model and baseline", _kv_table(pairs), compact=True)


def _stages_section(report: Mapping[str, Any]) -> Section:
    t = Table(["#", "kind", "seconds", "params", "MACs", "metric", "notes"],
              numeric=[True, False, True, True, True, True, False])
    for i, s in enumerate(st for st in report.get("stages") or [] if isinstance(st, Mapping)):
        metric = s.get("metric")
        metric_s = fmt_metric(metric)
        if isinstance(metric, Mapping) and metric.get("name") and metric_s != MISSING:
            metric_s = f"{metric['name']} {metric_s}"
        notes = s.get("notes") or []
        t.rows.append([str(i), cell_text(s.get("kind")), fmt(s.get("seconds"), ".1f"), fmt_int(s.get("params")),
                       fmt_int(s.get("macs")), metric_s,
                       "; ".join(map(str, notes)) if isinstance(notes, list) else str(notes)])
        t.row_status.append(None)
    return Section("Stages", t, [] if t.rows else ["No compression stage ran."])


ARTIFACT_HEADERS = ["name", "role", "runtime", "metric", "SQNR dB", "max abs", "top-1 agreement",
                    "p50 ms", "p90 ms", "speedup", "low-precision ops", "bytes"]


def _artifacts_section(arts: list[Mapping[str, Any]]) -> Section:
    t = Table(list(ARTIFACT_HEADERS), numeric=[False, False, False] + [True] * 9)
    for a in arts:
        parity, lat = a.get("parity"), a.get("latency_ms")
        t.rows.append([artifact_name(a), cell_text(a.get("role")), cell_text(a.get("runtime")),
                       fmt_metric(a.get("metric")), fmt_sqnr(parity), fmt(get_nested(parity, "max_abs"), ".3g"),
                       fmt_pct(get_nested(parity, "top1_agreement"), 2), fmt(get_nested(lat, "p50"), ".3f"),
                       fmt(get_nested(lat, "p90"), ".3f"), fmt(a.get("speedup"), ".2f", "×"),
                       fmt_pct(get_nested(a.get("precision"), "low_precision_op_fraction")), fmt_int(a.get("bytes"))])
        t.row_status.append("shipped" if a.get("role") == "edgeprep" else None)
    metric_names = sorted({str(get_nested(a, "metric", "name")) for a in arts if get_nested(a, "metric", "name")})
    text = [f"metric: {', '.join(metric_names)} measured by running each artifact on its runtime over the eval split;"
            " SQNR / max abs / top-1 agreement against the final PyTorch model; speedup = fp32 baseline p50 / p50."]
    return Section("Artifacts", t, text if arts else ["No artifact was exported."])


def _gates_section(gates: list[Mapping[str, Any]]) -> Section:
    with_notes = any(g.get("note") for g in gates)  # no empty column when nothing needs explaining
    t = Table(["gate", "artifact", "limit", "value", "result"] + (["note"] if with_notes else []),
              numeric=[False, False, True, True, False, False])
    for g in gates:
        f = _GATE_FORMAT.get(str(g.get("name")), lambda v: fmt(v, ".4g"))
        ok = bool(g.get("passed"))
        value = g.get("value")
        # gates.py stores an identical-output SQNR (infinite) as null with passed=True.
        value_s = "∞" if value is None and ok and g.get("name") == "min_sqnr_db" else f(value)
        word = "SKIP" if g.get("skipped") else ("PASS" if ok else "FAIL")
        t.rows.append([cell_text(g.get("name")), cell_text(g.get("artifact")), f(g.get("limit")), value_s,
                       word] + ([str(g.get("note") or "")] if with_notes else []))
        t.row_status.append(None if g.get("skipped") else ("pass" if ok else "fail"))
    return Section("Gates", t, [] if gates else ["No gate configured in the recipe."])


def _precision_section(arts: list[Mapping[str, Any]]) -> Section:
    t = Table(["name", "low-precision ops", "heavy ops that ran (op type × count)"], numeric=[False, True, False])
    for a in arts:
        prec = a.get("precision")
        if not isinstance(prec, Mapping):
            continue
        ops = prec.get("ops") if isinstance(prec.get("ops"), Mapping) else {}
        census = ", ".join(f"{k}×{v}" for k, v in sorted(ops.items(), key=lambda kv: (-(as_number(kv[1]) or 0), kv[0])))
        t.rows.append([artifact_name(a), fmt_pct(prec.get("low_precision_op_fraction")), census or MISSING])
        t.row_status.append(None)
    return Section("Precision census (optimized runtime graph)", t,
                   [] if t.rows else ["No precision census was taken."])


def _files_section(arts: list[Mapping[str, Any]]) -> Section:
    t = Table(["name", "target", "path", "sha256", "info"], numeric=[False] * 5)
    for a in arts:
        info = a.get("info")
        if isinstance(info, Mapping) and isinstance(info.get("mobile"), Mapping):  # its verdict has a section
            info = {**info, "mobile": info["mobile"].get("file")}
        if isinstance(info, Mapping):  # nested details (a Core ML spec summary...) live in report.json
            info = {k: ("(in report.json)" if isinstance(v, Mapping) and len(v) > 3 else v) for k, v in info.items()}
        info_s = ", ".join(f"{k}={v}" for k, v in info.items()) if isinstance(info, Mapping) else cell_text(info)
        t.rows.append([artifact_name(a), cell_text(a.get("target")), cell_text(a.get("path")),
                       cell_text(a.get("sha256")), info_s or MISSING])
        t.row_status.append(None)
    return Section("Artifact files", t) if arts else Section("Artifact files", text=["None."])


# ----------------------------------------------------------------------------- markdown
def _md_cell(s: str) -> str:
    # A "|" would end the cell and a newline the row.
    return " ".join(s.replace("\\", "\\\\").replace("|", "\\|").split())


def _md_section(sec: Section, level: int, plot_relpath: str) -> list[str]:
    out = [f"{'#' * level} {_md_cell(sec.title)}", ""]
    for p in sec.intro:
        out += [_md_cell(p), ""]
    if sec.plot:
        out += [f"![metric vs p50 latency]({plot_relpath})", ""]
    for im in sec.images:
        out += [f"![{_md_cell(im.alt)}]({im.relpath})", ""]
    if sec.table is not None and sec.table.rows:
        t = sec.table
        out.append("| " + " | ".join(_md_cell(h) for h in t.headers) + " |")
        # exactly one delimiter cell per header: GFM renders a table whose counts differ as plain text
        numeric = (list(t.numeric) + [False] * len(t.headers))[:len(t.headers)]
        out.append("|" + "|".join("---:" if num else "---" for num in numeric) + "|")
        for row in t.rows:
            out.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
        out.append("")
    for p in sec.text:
        out += [_md_cell(p), ""]
    for sub in sec.subsections:
        out += _md_section(sub, level + 1, plot_relpath)
    return out


def render_markdown(doc: Document, plot_relpath: str = PLOT_RELPATH) -> str:
    out = [f"# {_md_cell(doc.title)}", "", f"**{_md_cell(doc.headline)}**", ""]
    if doc.machine:
        out += [_md_cell(doc.machine), ""]
    for sec in doc.sections:
        out += _md_section(sec, 2, plot_relpath)
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------- plot
def plot_metric_vs_latency(report: Mapping[str, Any]) -> tuple[bytes, list[str]]:
    """PNG of metric (y) vs p50 latency in ms (x), one labelled point per artifact, a marker per role.

    Returns the PNG bytes and one note per artifact that could not be placed (missing metric or
    latency), so the report says why a point is absent instead of dropping it silently.
    """
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    notes: list[str] = []
    points = []
    for a in report.get("artifacts") or []:
        if not isinstance(a, Mapping):
            continue
        x, y = as_number(get_nested(a, "latency_ms", "p50")), as_number(get_nested(a, "metric", "value"))
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            missing = " and ".join(n for n, v in (("metric", y), ("p50 latency", x)) if v is None)
            notes.append(f"{artifact_name(a)} not plotted: {missing or 'non-finite value'} not measured.")
            continue
        role = a.get("role") if a.get("role") in ROLE_STYLE else "other"
        points.append((x, y, artifact_name(a), role))
    metric_name = next((str(get_nested(a, "metric", "name")) for a in report.get("artifacts") or []
                        if get_nested(a, "metric", "name")), None) \
        or str(get_nested(report, "baseline", "metric", "name") or "metric")
    seen_roles = set()
    for i, (x, y, name, role) in enumerate(sorted(points)):
        style = ROLE_STYLE[role]
        ax.scatter([x], [y], marker=style["marker"], c=style["color"], s=style["s"], zorder=3, edgecolors="white",
                   linewidths=0.6, label=None if role in seen_roles else style["label"])
        seen_roles.add(role)
        # Alternate labels above/below so neighbours (e.g. two PTQ variants) do not print on top of each other.
        ax.annotate(name, (x, y), xytext=(7, 7 if i % 2 == 0 else -13), textcoords="offset points", fontsize=8.5,
                    color="#111827", zorder=4)
    base_metric = as_number(get_nested(report, "baseline", "metric", "value"))
    if base_metric is not None:
        ax.axhline(base_metric, color="#9ca3af", linestyle="--", linewidth=1, label="PyTorch fp32 baseline")
        drop_gate = next((g for g in report.get("gates") or [] if isinstance(g, Mapping)
                          and g.get("name") == "max_metric_drop" and as_number(g.get("limit")) is not None), None)
        if drop_gate is not None:
            ax.axhline(base_metric - as_number(drop_gate["limit"]), color="#dc2626", linestyle=":", linewidth=1,
                       label="gate: max_metric_drop")
    if not points:
        ax.text(0.5, 0.5, "no artifact has both a metric and a p50 latency", ha="center", va="center",
                transform=ax.transAxes, color="#6b7280")
    else:
        ax.set_xlim(left=0, right=max(p[0] for p in points) * 1.25)  # from 0: distances show speedups honestly
        ax.margins(y=0.25)
    ax.set_xlabel("p50 latency (ms, on the runtime)")
    ax.set_ylabel(metric_name)
    ax.set_title(f"{metric_name} vs p50 latency per artifact", fontsize=11)
    ax.grid(True, color="#e5e7eb", linewidth=0.8, zorder=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    buf = BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version string: reproducible bytes
    return buf.getvalue(), notes


# ----------------------------------------------------------------------------- writing
def json_safe(obj: Any) -> Any:
    """A plain-JSON copy: numpy scalars/arrays to Python, paths to str, tuples to lists, and
    non-finite floats to ``null`` (strict JSON has no NaN/Infinity; for ``sqnr_db`` null already
    means identical outputs, i.e. infinite SQNR)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy scalar or array
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_reports(run_dir: Path, report: Mapping[str, Any]) -> dict[str, Path]:
    """Write report.json, report.md, report.html and plots/metric_vs_latency.png into ``run_dir``,
    plus plots/prune_sparsity[_<stage index>].png for each stage that pruned.

    Every file is written atomically. report.json comes first: it is what CI reads, so it exists
    even if rendering a view fails. Returns {"json", "md", "html", "plot"} -> path, plus one
    "prune_sparsity[_<i>]" (the chart's file stem) -> path per sparsity chart.
    """
    from edgeprep.report_prune import sparsity_plots
    from edgeprep.report_schema import check_written_report

    run_dir = Path(run_dir)
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md", "html": run_dir / "report.html",
             "plot": run_dir / PLOT_RELPATH}
    safe = json_safe(report)
    # The writer labels the document with the schema it writes and proves the label true: one that
    # does not match is a bug in edgeprep (ReportSchemaError, one line naming the field), not a file.
    safe["schema"] = REPORT_SCHEMA
    check_written_report(safe)
    write_json_atomic(paths["json"], safe)
    png, plot_notes = plot_metric_vs_latency(safe)
    write_bytes_atomic(paths["plot"], png)
    images = sparsity_plots(safe)
    for relpath, data in images.items():
        paths[Path(relpath).stem] = run_dir / relpath
        write_bytes_atomic(run_dir / relpath, data)
    doc = build_document(safe, plot_notes)
    write_text_atomic(paths["md"], render_markdown(doc))
    write_text_atomic(paths["html"], report_html.render_html(doc, png, images))
    return paths
