"""report.html: one self-contained file (inline CSS, plots as base64 PNGs, no script, no URL).

A report gets mailed, attached to CI runs and opened offline, so it must not load anything. Every
string from the report is passed through ``html.escape``: names, notes and paths come from user
recipes and models.
"""
from __future__ import annotations

import base64
import html
from typing import Mapping, Optional

from edgeprep.report_model import Document, Section, Table

_CSS = """
:root { --pass: #047857; --pass-bg: #d1fae5; --fail: #b91c1c; --fail-bg: #fee2e2; --line: #e5e7eb; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #111827;
       margin: 0 auto; padding: 24px 28px 48px; max-width: 1240px; font-size: 14px; line-height: 1.45; }
h1 { font-size: 22px; margin: 0 0 12px; }
h2 { font-size: 16px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 18px 0 6px; }
.banner { padding: 10px 14px; border-radius: 6px; font-weight: 600; border: 1px solid; }
.banner.pass { color: var(--pass); background: var(--pass-bg); border-color: #6ee7b7; }
.banner.fail { color: var(--fail); background: var(--fail-bg); border-color: #fca5a5; }
.banner.unknown { color: #374151; background: #f3f4f6; border-color: #d1d5db; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #f9fafb; font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td:first-child { white-space: nowrap; }
td.mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; white-space: nowrap; }
td.hash { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 11px; word-break: break-all;
          min-width: 16em; color: #4b5563; }
tr.shipped td { font-weight: 600; background: #eff6ff; }
.row { display: flex; flex-wrap: wrap; gap: 0 40px; align-items: flex-start; }
tr.pass td { background: var(--pass-bg); }
tr.fail td { background: var(--fail-bg); color: var(--fail); }
td.verdict { font-weight: 700; }
tr.pass td.verdict { color: var(--pass); }
p.note { color: #4b5563; margin: 6px 0; }
p.machine { color: #374151; margin: 8px 0 0; font-size: 13px; }
img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
"""

# Paths stay on one line (the table scrolls); a 64-hex-digit hash may wrap anywhere.
_CELL_CLASS = {"path": "mono", "sha256": "hash", "result": "verdict"}


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _cls(name: str) -> str:
    return f' class="{name}"' if name else ""


def _table(t: "Table") -> str:
    numeric = list(t.numeric) + [False] * (len(t.headers) - len(t.numeric))
    head = "".join(f"<th{_cls('num' if n else '')}>{_e(h)}</th>" for h, n in zip(t.headers, numeric))
    body = []
    for i, row in enumerate(t.rows):
        status: Optional[str] = t.row_status[i] if i < len(t.row_status) else None
        cells = []
        for h, n, c in zip(t.headers, numeric, row):
            cls = "num" if n else _CELL_CLASS.get(h, "")
            cells.append(f"<td{_cls(cls)}>{_e(c)}</td>")
        body.append(f"<tr{_cls(status if status in ('pass', 'fail', 'shipped') else '')}>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _img(png: bytes, alt: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _section(sec: "Section", plot_png: Optional[bytes], images: Mapping[str, bytes], level: int = 2) -> str:
    parts = [f"<h{level}>{_e(sec.title)}</h{level}>"]
    parts += [f"<p>{_e(p)}</p>" for p in sec.intro]
    if sec.plot:
        parts.append(_img(plot_png, "metric vs p50 latency per artifact") if plot_png
                     else '<p class="note">No plot.</p>')
    for im in sec.images:
        png = images.get(im.relpath)
        parts.append(_img(png, im.alt) if png else f'<p class="note">No plot ({_e(im.relpath)}).</p>')
    if sec.table is not None and sec.table.rows:
        parts.append(_table(sec.table))
    parts += [f'<p class="note">{_e(p)}</p>' for p in sec.text]
    parts += [_section(sub, plot_png, images, min(level + 1, 6)) for sub in sec.subsections]
    return "\n".join(parts)


def render_html(doc: "Document", plot_png: Optional[bytes], images: Optional[Mapping[str, bytes]] = None) -> str:
    """``images``: relative path -> PNG bytes for the sections' ``images`` (inlined, not linked)."""
    images = images or {}
    status = {True: "pass", False: "fail"}.get(doc.passed, "unknown")
    parts: list[str] = []
    group: list[str] = []  # consecutive compact sections share one flex row
    for s in doc.sections:
        if s.compact:
            group.append(f"<div>{_section(s, plot_png, images)}</div>")
            continue
        if group:
            parts.append(f'<div class="row">{"".join(group)}</div>')
            group = []
        parts.append(_section(s, plot_png, images))
    if group:
        parts.append(f'<div class="row">{"".join(group)}</div>')
    sections = "\n".join(parts)
    machine = f'<p class="machine">{_e(doc.machine)}</p>' if doc.machine else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(doc.title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_e(doc.title)}</h1>
<div class="banner {status}">{_e(doc.headline)}</div>
{machine}
{sections}
</body>
</html>
"""
