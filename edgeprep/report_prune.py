"""The "Pruning" part of the report: one section per stage entry that carries ``details.pruning``
(written by ``edgeprep.stages.prune``), and its per-layer sparsity bar chart.

Each section has a settings line, params/MACs before/after/removed, the per-layer table (with the
chart, ``plots/prune_sparsity.png``; ``plots/prune_sparsity_<i>.png`` with the stage index ``i`` when
a run has several prune stages) and the per-pruning-stage history. Runs without pruning details
(no prune stage, or a report.json written before stages had ``details``) get no section at all.
"""
from __future__ import annotations

from io import BytesIO
from typing import Any, Mapping

from edgeprep.gates import as_number
from edgeprep.report_model import Image, Section, Table, cell_text, fmt, fmt_int, fmt_pct, get_nested

SPARSITY_PLOT_STEM = "plots/prune_sparsity"
UNIT_COLORS = ["#2563eb", "#d97706", "#059669", "#7c3aed", "#db2777", "#4b5563"]


def pruning_entries(report: Mapping[str, Any]) -> list[tuple[int, Mapping[str, Any]]]:
    """(stage index as numbered in the Stages table, details.pruning) for every stage that pruned."""
    stages = [s for s in report.get("stages") or [] if isinstance(s, Mapping)]
    return [(i, p) for i, s in enumerate(stages) if isinstance(p := get_nested(s, "details", "pruning"), Mapping)]


def sparsity_plot_relpaths(report: Mapping[str, Any]) -> dict[int, str]:
    """Stage index -> relative path of its sparsity chart (only stages with per-layer data)."""
    entries = [(i, p) for i, p in pruning_entries(report) if _layers(p)]
    if len(entries) == 1:
        return {entries[0][0]: f"{SPARSITY_PLOT_STEM}.png"}
    return {i: f"{SPARSITY_PLOT_STEM}_{i}.png" for i, _ in entries}


def _layers(pruning: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [l for l in pruning.get("layers") or [] if isinstance(l, Mapping)]


def _title(index: int, several: bool) -> str:
    return f"Pruning (stage #{index})" if several else "Pruning"


# ----------------------------------------------------------------------------- sections
def _settings_line(settings: Any) -> str:
    if not isinstance(settings, Mapping) or not settings:
        return "settings: not recorded."
    parts = []
    ratio_has_budget = as_number(settings.get("ratio")) is not None and bool(settings.get("budget"))
    for k, v in settings.items():
        if k == "budget" and ratio_has_budget:  # already said: "ratio 40.0% of params"
            continue
        name = str(k).replace("_", " ")
        if k == "ratio" and as_number(v) is not None:
            v_s = fmt_pct(v, 1) + (f" of {settings['budget']}" if settings.get("budget") else "")
        elif isinstance(v, bool):
            v_s = "yes" if v else "no"
        else:
            v_s = cell_text(v)
        parts.append(f"{name} {v_s}")
    return "settings: " + ", ".join(parts) + "."


def _removed(pruning: Mapping[str, Any], what: str) -> Any:
    r = get_nested(pruning, "removed", what)
    if as_number(r) is not None:
        return r
    before, after = as_number(pruning.get(f"{what}_before")), as_number(pruning.get(f"{what}_after"))
    return 1 - after / before if before and after is not None else None


def prune_sections(report: Mapping[str, Any]) -> list[Section]:
    """One "Pruning" section per pruning stage entry; [] when nothing was pruned."""
    entries = pruning_entries(report)
    plots = sparsity_plot_relpaths(report)
    sections = []
    for index, p in entries:
        summary = Table(["", "before", "after", "removed"], numeric=[False, True, True, True])
        for label, key in (("params", "params"), ("MACs", "macs")):
            summary.rows.append([label, fmt_int(p.get(f"{key}_before")), fmt_int(p.get(f"{key}_after")),
                                 fmt_pct(_removed(p, key))])
            summary.row_status.append(None)

        layers = Table(["module", "unit", "original", "kept", "sparsity"], numeric=[False, False, True, True, True])
        for l in _layers(p):
            layers.rows.append([cell_text(l.get("module") or l.get("block")), cell_text(l.get("unit")),
                                fmt_int(l.get("original")), fmt_int(l.get("kept")), fmt_pct(l.get("sparsity"))])
            layers.row_status.append(None)
        layer_sec = Section("Per-layer sparsity", layers, [] if layers.rows else ["No prunable layer was recorded."],
                            images=[Image(plots[index], "per-layer sparsity")] if index in plots else [])

        hist = [h for h in p.get("history") or [] if isinstance(h, Mapping)]
        extra = [(k, label) for k, label in (("train_loss", "train loss"), ("val_accuracy", "val accuracy"))
                 if any(as_number(h.get(k)) is not None for h in hist)]
        history = Table(["pruning stage", "target removed", "removed", "params"] + [label for _, label in extra],
                        numeric=[False] + [True] * (3 + len(extra)))
        for h in hist:
            stage = cell_text(h.get("stage")) + (f"/{h['of']}" if h.get("of") is not None else "")
            history.rows.append([stage, fmt_pct(h.get("target_removed")), fmt_pct(h.get("removed")),
                                 fmt_int(h.get("params"))] + [fmt(h.get(k)) for k, _ in extra])
            history.row_status.append(None)
        budget = get_nested(p, "settings", "budget")
        hist_text = [f"removed: share of the model's {budget} removed after each pruning stage."] if budget else []
        hist_sec = Section("History", history, hist_text if history.rows else ["No pruning history was recorded."])

        sections.append(Section(_title(index, len(entries) > 1), summary, intro=[_settings_line(p.get("settings"))],
                                subsections=[layer_sec, hist_sec]))
    return sections


# ----------------------------------------------------------------------------- chart
def _series(layers: list[Mapping[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """Blocks (x groups), series (one per unit kind) and (block, series) -> sparsity in %.

    When a block holds several groups of the same unit kind (CNN blocks with several conv pairs),
    the series also names the module inside the block, so no bar hides another.
    """
    def block(l: Mapping[str, Any]) -> str:
        return str(l.get("block") if l.get("block") is not None else l.get("module"))

    per_block_unit: dict[tuple[str, str], int] = {}
    for l in layers:
        key = (block(l), str(l.get("unit")))
        per_block_unit[key] = per_block_unit.get(key, 0) + 1
    duplicated = {u for (_, u), n in per_block_unit.items() if n > 1}
    blocks: list[str] = []
    series: list[str] = []
    values: dict[tuple[str, str], float] = {}
    for l in layers:
        s = as_number(l.get("sparsity"))
        if s is None:
            continue
        b, unit = block(l), str(l.get("unit"))
        name = unit
        if unit in duplicated:
            module = str(l.get("module") or "")
            name = f"{unit} ({module[len(b) + 1:] if module.startswith(b + '.') else module})"
        blocks += [b] if b not in blocks else []
        series += [name] if name not in series else []
        values[(b, name)] = 100.0 * s
    return blocks, series, values


def plot_prune_sparsity(pruning: Mapping[str, Any], title: str = "Per-layer sparsity") -> bytes:
    """PNG bar chart: per block, one bar per unit kind (heads, mlp, channels), height = share of units removed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    blocks, series, values = _series(_layers(pruning))
    fig = Figure(figsize=(max(7.5, min(18.0, 1.0 + 0.55 * len(blocks) * max(1, len(series)))), 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(series))
    label_bars = len(blocks) * len(series) <= 40  # value labels only while they stay readable
    for j, name in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i, b in enumerate(blocks) if (b, name) in values]
        ys = [values[(b, name)] for b in blocks if (b, name) in values]
        bars = ax.bar(xs, ys, width=width * 0.92, color=UNIT_COLORS[j % len(UNIT_COLORS)], label=name, zorder=3)
        if label_bars:
            ax.bar_label(bars, labels=[f"{y:.0f}%" for y in ys], fontsize=7.5, padding=2, color="#111827")
    budget = str(get_nested(pruning, "settings", "budget") or "params")
    removed = as_number(get_nested(pruning, "removed", budget))
    if removed is not None:
        ax.axhline(100 * removed, color="#dc2626", linestyle="--", linewidth=1, zorder=2,
                   label=f"model {budget} removed ({100 * removed:.1f}%)")
    if not blocks:
        ax.text(0.5, 0.5, "no per-layer sparsity recorded", ha="center", va="center", transform=ax.transAxes,
                color="#6b7280")
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels(blocks, rotation=30 if len(blocks) > 8 else 0, ha="right" if len(blocks) > 8 else "center",
                       fontsize=8.5)
    ax.set_ylim(0, 100)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=100))
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity (share of units removed)")
    ax.set_title(title, fontsize=11, pad=12)  # room for a label on a bar near 100%
    ax.grid(True, axis="y", color="#e5e7eb", linewidth=0.8, zorder=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    buf = BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version string: reproducible bytes
    return buf.getvalue()


def sparsity_plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    """Relative path -> PNG bytes for every pruning stage with per-layer data."""
    entries = dict(pruning_entries(report))
    relpaths = sparsity_plot_relpaths(report)
    several = len(entries) > 1
    return {rel: plot_prune_sparsity(entries[i], "Per-layer sparsity after pruning"
                                     + (f" (stage #{i})" if several else "")) for i, rel in relpaths.items()}
