"""Every table report.md writes is a real GFM table (parsed by markdown-it-py, the CommonMark parser
rich already depends on, with its table rule), with one delimiter cell per header."""
from __future__ import annotations

from markdown_it import MarkdownIt


def _table_blocks(text: str) -> list[list[str]]:
    blocks, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            blocks.append(cur)
            cur = []
    return blocks


def _cells(line: str) -> int:
    return len(line.strip().strip("|").replace("\\|", "").split("|"))


def test_every_report_table_parses_as_a_gfm_table(fast_run):
    text = (fast_run / "report.md").read_text()
    blocks = _table_blocks(text)
    assert len(blocks) >= 5  # gates, artifacts, stages, model / run, latency, precision, files
    for block in blocks:
        assert _cells(block[0]) == _cells(block[1]), block[:2]
        assert all(_cells(row) == _cells(block[0]) for row in block[2:]), block[0]
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    assert sum(t.type == "table_open" for t in tokens) == len(blocks)
    gates = next(b for b in blocks if b[0].startswith("| gate "))
    assert gates[1].count("|") == gates[0].count("|")  # was 5 header cells, 6 delimiter cells
