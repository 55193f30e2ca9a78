"""The report's document model (``Document`` of ``Section``\\ s of ``Table``\\ s) and the cell formatters.

Every report view is rendered from one ``Document`` of already-formatted strings, so report.md and
report.html show the same numbers. This module sits below everything that builds or renders a
document: ``edgeprep.report`` (the builder and writer), the per-topic section modules
(``edgeprep.report_prune``, ``report_qat``, ...), ``edgeprep.report_html`` and plugins' section
providers all import it, and it imports none of them, so the report modules form no import cycle.

Missing measurements (``None``) format as ``MISSING`` ("—"); an infinite value as "∞".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from edgeprep.gates import as_number
from edgeprep.measure.metrics import EXTRA_METRICS

MISSING = "—"


# ----------------------------------------------------------------------------- document model
@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    numeric: list[bool] = field(default_factory=list)  # per column: right-align in HTML
    row_status: list[Optional[str]] = field(default_factory=list)  # per row: "pass" | "fail" | "shipped" | None


@dataclass
class Image:
    relpath: str  # PNG path relative to the run directory: linked from report.md, inlined in report.html
    alt: str


@dataclass
class Section:
    title: str
    table: Optional[Table] = None
    text: list[str] = field(default_factory=list)  # plain-text paragraphs (escaped by each renderer)
    plot: bool = False  # the metric-vs-latency plot goes here
    compact: bool = False  # a small field/value table: HTML puts neighbouring ones side by side
    intro: list[str] = field(default_factory=list)  # paragraphs before the images and the table
    images: list[Image] = field(default_factory=list)  # further plots, shown before the table
    subsections: list["Section"] = field(default_factory=list)  # one heading level down, after the text


@dataclass
class Document:
    title: str
    passed: Optional[bool]
    headline: str  # one line: PASSED / FAILED and why
    sections: list[Section]
    machine: str = ""  # one line under the headline: the CPU, runtime versions and threads measured with


# ----------------------------------------------------------------------------- reading the report dict
def get_nested(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...``, or None as soon as a level is missing or not a mapping: a report may come
    from an older or partial run, and a view shows what is there instead of failing."""
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


def cell_text(x: Any) -> str:
    """A free-text value as a cell: ``MISSING`` for None or an empty string, else ``str(x)``."""
    return MISSING if x is None or x == "" else str(x)


# ----------------------------------------------------------------------------- formatting numbers
def fmt(x: Any, spec: str = ".4f", suffix: str = "") -> str:
    v = as_number(x)
    if v is None:
        return MISSING
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return f"{v:{spec}}{suffix}"


def fmt_int(x: Any) -> str:
    v = as_number(x)
    return MISSING if v is None or not math.isfinite(v) else f"{int(round(v)):,}"


def fmt_pct(x: Any, decimals: int = 1) -> str:
    v = as_number(x)
    return MISSING if v is None else fmt(v * 100, f".{decimals}f", "%")


def fmt_sqnr(parity: Any) -> str:
    if not isinstance(parity, Mapping) or "sqnr_db" not in parity:
        return MISSING
    return "∞" if parity["sqnr_db"] is None else fmt(parity["sqnr_db"], ".2f")


def fmt_metric(metric: Any) -> str:
    """The metric's value, then any extra metrics reported beside it (embedding: top-10 overlap)."""
    if not isinstance(metric, Mapping):
        return MISSING
    extras = sorted({k for names in EXTRA_METRICS.values() for k in names} & set(metric))
    return fmt(metric.get("value")) + "".join(f" ({k} {fmt(metric[k])})" for k in extras)
