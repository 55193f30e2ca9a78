"""report.json / report.md / report.html / plot: exact JSON round trip, numbers in the views,
a self-contained HTML with failed gates in red, a valid PNG, and robustness to missing measurements."""
from __future__ import annotations

import base64
import copy
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from edgeprep.report import (
    REPORT_SCHEMA,
    build_document,
    json_safe,
    plot_metric_vs_latency,
    render_markdown,
    write_reports,
)
from edgeprep.report_html import render_html
from edgeprep.report_schema import ReportSchemaError, load_report_document

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def art(name, role, p50, metric, sqnr, nbytes, frac, ops, speedup):
    return {"name": name, "target": "onnx", "runtime": "onnxruntime", "role": role,
            "path": f"artifacts/{name}/model.onnx", "bytes": nbytes, "sha256": "ab" * 32,
            "parity": {"sqnr_db": sqnr, "max_abs": 0.0031, "top1_agreement": 0.9972},
            "metric": {"name": "accuracy", "value": metric},
            "latency_ms": {"p50": p50, "p90": round(p50 * 1.08, 3), "p99": 9.9, "mean": p50, "iters": 200,
                           "threads": 1, "batch": 1, "ci95_p50": [p50 - 0.05, p50 + 0.05], "warmup": 20,
                           "peak_rss_bytes": 412_000_000},
            "precision": {"low_precision_op_fraction": frac, "ops": ops}, "speedup": speedup,
            "info": {"exporter": "dynamo", "opset": 18}, "runtime_version": None, "memory": None}


@pytest.fixture
def sample() -> dict:
    return {
        "schema": REPORT_SCHEMA, "recipe": "vit-bench-qat", "created": "2025-01-01T12:00:00+00:00",
        "edgeprep_version": "0.1.0",
        "machine": {"platform": "Linux-6.1-x86_64", "processor": "x86_64", "python": "3.11.7", "torch": "2.13.0+cpu",
                    "cpu_threads": 2, "cpu": {"model": "AMD EPYC", "arch": "x86_64", "isa": ["avx2"], "cores": 2}},
        "model": {"name": "vit-bench", "params": 2_690_186, "macs": 176_947_200},
        "baseline": {"metric": {"name": "accuracy", "value": 0.9694}, "params": 2_690_186, "bytes": 10_784_512},
        "stages": [{"kind": "qat", "seconds": 41.7, "params": 2_690_186, "macs": 176_947_200,
                    "metric": {"name": "accuracy", "value": 0.9667}, "notes": ["int8 on 36 Linear", "head | skipped"],
                    "details": {}}],
        "artifacts": [
            art("onnx-fp32", "baseline", 9.812, 0.9694, None, 10_784_512, 0.0, {"MatMul": 37}, 1.0),
            art("onnx-ptq-dynamic", "ptq", 6.204, 0.9611, 31.42, 2_871_040, 1.0, {"DynamicQuantizeMatMul": 37}, 1.58),
            art("onnx", "edgeprep", 5.402, 0.9667, 38.71, 2_889_744, 0.973, {"MatMulInteger": 36, "MatMul": 1}, 1.82),
        ],
        "gates": [
            {"name": "min_sqnr_db", "artifact": "onnx", "limit": 30.0, "value": 38.71, "passed": True, "note": None},
            {"name": "max_latency_ms_p90", "artifact": "onnx", "limit": 5.5, "value": 5.834, "passed": False,
             "note": None},
        ],
        "passed": False,
    }


class Rows(HTMLParser):
    """Collects every <tr> as (class attribute, [cell texts]) and every src/href value."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[str, list[str]]] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href")]
        if tag == "tr":
            self.rows.append((a.get("class") or "", []))
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1][1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_json_round_trips_exactly(tmp_path, sample):
    paths = write_reports(tmp_path, sample)
    assert paths == {"json": tmp_path / "report.json", "md": tmp_path / "report.md",
                     "html": tmp_path / "report.html", "plot": tmp_path / "plots" / "metric_vs_latency.png"}
    assert json.loads(paths["json"].read_text()) == sample
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary file behind


def test_markdown_has_the_numbers(tmp_path, sample):
    md = write_reports(tmp_path, sample)["md"].read_text()
    assert "**FAILED: 1 of 2 gate(s) failed: max_latency_ms_p90 (onnx)**" in md
    assert ("| onnx | edgeprep | onnxruntime | 0.9667 | 38.71 | 0.0031 | 99.72% | 5.402 | 5.834 | 1.82× | 97.3% "
            "| 2,889,744 |") in md
    assert "| onnx-fp32 | baseline | onnxruntime | 0.9694 | ∞ |" in md  # null SQNR = identical
    assert "| max_latency_ms_p90 | onnx | 5.500 ms | 5.834 ms | FAIL |" in md
    assert "| min_sqnr_db | onnx | 30.00 dB | 38.71 dB | PASS |" in md
    assert "| 0 | qat | 41.7 | 2,690,186 | 176,947,200 | accuracy 0.9667 | int8 on 36 Linear; head \\| skipped |" in md
    assert "| baseline accuracy (PyTorch) | 0.9694 |" in md
    assert "| onnx | 100.0% |" not in md and "| onnx | 97.3% | MatMulInteger×36, MatMul×1 |" in md
    assert "![metric vs p50 latency](plots/metric_vs_latency.png)" in md


def test_html_is_self_contained_and_failed_gate_is_red(tmp_path, sample):
    paths = write_reports(tmp_path, sample)
    html = paths["html"].read_text()
    p = Rows()
    p.feed(html)
    assert "http" not in html.lower()
    assert {"script", "link", "iframe"}.isdisjoint(p.tags)
    assert len(p.urls) == 1 and p.urls[0].startswith("data:image/png;base64,")
    embedded = base64.b64decode(p.urls[0].split(",", 1)[1])
    assert embedded == paths["plot"].read_bytes()
    # Gate rows: the failed one has class "fail", the passed one "pass"; the CSS paints them red / green.
    gate_rows = {cells[0]: (cls, cells) for cls, cells in p.rows if cells and cells[0] in ("min_sqnr_db", "max_latency_ms_p90")}
    assert gate_rows["max_latency_ms_p90"] == ("fail", ["max_latency_ms_p90", "onnx", "5.500 ms", "5.834 ms", "FAIL"])
    assert gate_rows["min_sqnr_db"][0] == "pass"
    assert re.search(r"--fail: #b91c1c;", html) and re.search(r"tr\.fail td \{[^}]*color: var\(--fail\)", html)
    assert re.search(r"--pass-bg: #d1fae5;", html) and re.search(r"tr\.pass td \{[^}]*var\(--pass-bg\)", html)
    assert '<div class="banner fail">FAILED: 1 of 2 gate(s) failed' in html
    art_row = next(cells for _, cells in p.rows if cells[:2] == ["onnx", "edgeprep"])
    assert art_row[3:] == ["0.9667", "38.71", "0.0031", "99.72%", "5.402", "5.834", "1.82×", "97.3%", "2,889,744"]


def test_html_escapes_report_strings(tmp_path, sample):
    sample["recipe"] = "<script>alert(1)</script>"
    sample["artifacts"][2]["name"] = 'x"><img src=y onerror=alert(2)>'
    sample["gates"][1]["artifact"] = sample["artifacts"][2]["name"]
    html = write_reports(tmp_path, sample)["html"].read_text()
    assert "<script>" not in html and "<img src=y" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "x&quot;&gt;&lt;img src=y onerror=alert(2)&gt;" in html


def test_plot_is_a_valid_png(tmp_path, sample):
    from PIL import Image

    path = write_reports(tmp_path, sample)["plot"]
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400


def test_passed_report_is_green(tmp_path, sample):
    sample["gates"] = sample["gates"][:1]
    sample["passed"] = True
    paths = write_reports(tmp_path, sample)
    assert '<div class="banner pass">PASSED: all 1 gate(s) passed</div>' in paths["html"].read_text()
    assert "**PASSED: all 1 gate(s) passed**" in paths["md"].read_text()


def test_missing_measurements_render_as_dashes(tmp_path, sample):
    a = sample["artifacts"][2]
    a.update(parity=None, metric=None, latency_ms=None, precision=None, speedup=None)
    sample["gates"] = [{"name": "min_speedup", "artifact": "onnx", "limit": 1.5, "value": None, "passed": False,
                        "note": "speedup unknown"}]
    md = write_reports(tmp_path, sample)["md"].read_text()
    assert "| onnx | edgeprep | onnxruntime | — | — | — | — | — | — | — | — | 2,889,744 |" in md
    assert "| min_speedup | onnx | 1.50× | — | FAIL | speedup unknown |" in md
    assert "onnx not plotted: metric and p50 latency not measured." in md


def test_machine_line_names_cpu_flags_runtime_and_threads(tmp_path, sample):
    sample["machine"]["cpu"] = {"model": "AMD EPYC 7B12", "arch": "x86_64", "isa": ["avx", "avx2", "fma"], "cores": 4}
    for a in sample["artifacts"]:
        a["runtime_version"] = "1.32.0"
    sample["artifacts"][0]["latency_ms"]["threads"] = 4
    paths = write_reports(tmp_path, sample)
    md, html = paths["md"].read_text(), paths["html"].read_text()
    line = "Measured on AMD EPYC 7B12 (x86_64: avx, avx2, fma), 4 cores; onnxruntime 1.32.0; 1, 4 threads"
    # right under the verdict, as a plain paragraph (no table, so the Markdown stays valid GFM)
    assert f"**FAILED: 1 of 2 gate(s) failed: max_latency_ms_p90 (onnx)**\n\n{line}\n\n## Gates" in md
    assert f'<div class="banner fail">FAILED: 1 of 2 gate(s) failed: max_latency_ms_p90 (onnx)</div>\n' \
           f'<p class="machine">{line}</p>' in html
    assert "| machine.cpu | AMD EPYC 7B12 (x86_64: avx, avx2, fma) |" in md  # the Run table: a label, not a dict
    assert json.loads(paths["json"].read_text()) == sample


def test_machine_line_of_an_older_report(sample):
    # The views render any report dict, also one no edgeprep.report/2 writer would write (those are refused).
    sample["machine"] = {"cpu": "x86_64", "threads": 2}  # machine.cpu as a plain string, no runtime_version
    md = render_markdown(build_document(sample))
    assert "\nMeasured on x86_64; onnxruntime (version not recorded); 1 thread\n" in md
    sample["machine"] = {"cpu": {"model": "A | B", "arch": "aarch64", "isa": [], "cores": None}}
    md = render_markdown(build_document(sample))
    assert "\nMeasured on A \\| B (aarch64: no kernel-relevant ISA flags); onnxruntime" in md  # a "|" is escaped


def test_minimal_report_renders():
    report = {"schema": REPORT_SCHEMA, "recipe": "empty"}
    png, notes = plot_metric_vs_latency(report)
    md = render_markdown(build_document(report, notes))
    assert "UNKNOWN" in md and "No artifact was exported." in md and "No gate configured" in md
    assert png[:8] == PNG_SIGNATURE


def test_a_report_that_does_not_match_its_schema_is_not_written(tmp_path, sample):
    # The writer validates just before writing: a mismatch is a bug in edgeprep, one line naming the field.
    sample["artifacts"][1]["latency_ms"]["iters"] = "200"
    with pytest.raises(ReportSchemaError) as exc:
        write_reports(tmp_path, sample)
    assert str(exc.value) == ("report.json does not match edgeprep.report/2 (a bug in edgeprep; please report it): "
                              'artifacts.1.latency_ms.iters: Input should be a valid integer (got "200")')
    del sample["artifacts"][1]["latency_ms"]
    with pytest.raises(ReportSchemaError, match=r"it\): artifacts\.1\.latency_ms: Field required$"):
        write_reports(tmp_path, sample)
    assert not list(tmp_path.iterdir())  # nothing written, not even report.json


def test_the_writer_labels_the_schema_it_writes(tmp_path, sample):
    sample["schema"] = "edgeprep.report/1"  # what pipeline.py still spells: the same shape
    written = json.loads(write_reports(tmp_path, sample)["json"].read_text())
    assert written["schema"] == "edgeprep.report/2" == REPORT_SCHEMA
    assert written == dict(sample, schema="edgeprep.report/2")
    assert load_report_document(written).artifacts[2].parity.sqnr_db == 38.71


def test_json_safe_makes_plain_strict_json(tmp_path, sample):
    report = copy.deepcopy(sample)
    report["artifacts"][1]["parity"]["sqnr_db"] = math.inf
    report["artifacts"][1]["metric"]["value"] = np.float32(0.5)
    report["artifacts"][1]["bytes"] = np.int64(7)
    report["artifacts"][1]["latency_ms"]["ci95_p50"] = (1.0, float("nan"))
    text = write_reports(tmp_path, report)["json"].read_text()
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    a = back["artifacts"][1]
    assert a["parity"]["sqnr_db"] is None and a["metric"]["value"] == 0.5 and a["bytes"] == 7
    assert a["latency_ms"]["ci95_p50"] == [1.0, None]
    assert json_safe({"k": (np.float64(1.5),)}) == {"k": [1.5]}


# ----------------------------------------------------------------------------- pruning
def prune_entry() -> dict:
    """A prune stage entry as edgeprep.stages.prune writes it (a 3-block ViT, 40% of params removed)."""
    layers = [("blocks.0", "heads", "blocks.0.attn", 4, 4), ("blocks.0", "mlp", "blocks.0.mlp", 128, 99),
              ("blocks.1", "heads", "blocks.1.attn", 4, 2), ("blocks.1", "mlp", "blocks.1.mlp", 128, 1),
              ("blocks.2", "heads", "blocks.2.attn", 4, 3), ("blocks.2", "mlp", "blocks.2.mlp", 128, 96)]
    return {
        "kind": "prune", "seconds": 6.5, "params": 61_580, "macs": 1_057_920,
        "metric": {"name": "accuracy", "value": 0.9704}, "notes": ["pruned 40% of params"],
        "details": {"pruning": {
            "settings": {"ratio": 0.4, "budget": "params", "allocation": "adaptive", "schedule": "incremental",
                         "stages": 2, "inner_steps": 10, "importance": "taylor", "amplitude": 0.02,
                         "train_steps_per_stage": 25, "distill": True},
            "params_before": 102_666, "params_after": 61_580, "macs_before": 1_786_880, "macs_after": 1_057_920,
            "removed": {"params": 0.4001909103305865, "macs": 0.40795128939828085},
            "layers": [{"block": b, "unit": u, "module": m, "original": o, "kept": k,
                        "sparsity": round(1 - k / o, 6), "unit_cost": 4144.0 if u == "heads" else 129.0}
                       for b, u, m, o, k in layers],
            "history": [
                {"stage": 1, "of": 2, "target_removed": 0.2, "removed": 0.179991, "block_sparsity": [0.0, 0.56, 0.0],
                 "params": 84_187, "train_loss": 0.220428, "val_accuracy": 0.914815},
                {"stage": 2, "of": 2, "target_removed": 0.4, "removed": 0.400191,
                 "block_sparsity": [0.11, 0.87, 0.26], "params": 61_580, "train_loss": 0.085349,
                 "val_accuracy": 0.944444},
            ]}},
    }


def png_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_pruning_section_in_markdown(tmp_path, sample):
    sample["stages"].append(prune_entry())
    paths = write_reports(tmp_path, sample)
    md = paths["md"].read_text()
    section = md.split("## Pruning\n", 1)[1].split("\n## ", 1)[0]
    assert "ratio 40.0% of params, allocation adaptive, schedule incremental, stages 2" in section
    assert "distill yes" in section
    assert "| params | 102,666 | 61,580 | 40.0% |" in section
    assert "| MACs | 1,786,880 | 1,057,920 | 40.8% |" in section
    assert "| blocks.0.attn | heads | 4 | 4 | 0.0% |" in section
    assert "| blocks.1.attn | heads | 4 | 2 | 50.0% |" in section
    assert "| blocks.1.mlp | mlp | 128 | 1 | 99.2% |" in section
    assert "| blocks.2.mlp | mlp | 128 | 96 | 25.0% |" in section
    assert "| pruning stage | target removed | removed | params | train loss | val accuracy |" in section
    assert "| 1/2 | 20.0% | 18.0% | 84,187 | 0.2204 | 0.9148 |" in section
    assert "| 2/2 | 40.0% | 40.0% | 61,580 | 0.0853 | 0.9444 |" in section
    assert "![per-layer sparsity](plots/prune_sparsity.png)" in section
    # After the Stages table, before the model details; the stage itself is still listed.
    assert md.index("## Stages") < md.index("## Pruning") < md.index("## Model and baseline")
    assert "| 1 | prune | 6.5 | 61,580 | 1,057,920 | accuracy 0.9704 |" in md


def test_pruning_chart_is_a_png_embedded_in_html(tmp_path, sample):
    sample["stages"].append(prune_entry())
    paths = write_reports(tmp_path, sample)
    chart = tmp_path / "plots" / "prune_sparsity.png"
    assert paths["prune_sparsity"] == chart
    data = chart.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    width, height = png_size(chart)
    assert width >= 600 and height >= 400
    html = paths["html"].read_text()
    p = Rows()
    p.feed(html)
    assert "http" not in html.lower()
    assert len(p.urls) == 2 and all(u.startswith("data:image/png;base64,") for u in p.urls)
    assert base64.b64decode(p.urls[1].split(",", 1)[1]) == data
    assert '<img class="plot" alt="per-layer sparsity"' in html
    assert "<h2>Pruning</h2>" in html and "<h3>Per-layer sparsity</h3>" in html
    assert ["blocks.1.attn", "heads", "4", "2", "50.0%"] in [cells for _, cells in p.rows]
    assert ["params", "102,666", "61,580", "40.0%"] in [cells for _, cells in p.rows]
    assert ["2/2", "40.0%", "40.0%", "61,580", "0.0853", "0.9444"] in [cells for _, cells in p.rows]


def test_several_prune_stages_get_one_chart_each(tmp_path, sample):
    second = prune_entry()
    second["details"]["pruning"]["history"] = [{"stage": 1, "of": 1, "target_removed": 0.1, "removed": 0.1,
                                                "params": 55_000}]  # no training: no loss/accuracy columns
    sample["stages"] += [prune_entry(), second]
    paths = write_reports(tmp_path, sample)
    md = paths["md"].read_text()
    assert "## Pruning (stage #1)" in md and "## Pruning (stage #2)" in md
    assert "![per-layer sparsity](plots/prune_sparsity_1.png)" in md
    assert "![per-layer sparsity](plots/prune_sparsity_2.png)" in md
    assert "| 1/1 | 10.0% | 10.0% | 55,000 |" in md
    for i in (1, 2):
        assert paths[f"prune_sparsity_{i}"].read_bytes()[:8] == PNG_SIGNATURE
    assert not (tmp_path / "plots" / "prune_sparsity.png").exists()
    assert len(re.findall(r"<img ", paths["html"].read_text())) == 3


def test_no_pruning_section_without_pruning_details(tmp_path, sample):
    md = write_reports(tmp_path / "plain", sample)["md"].read_text()
    assert "Pruning" not in md and "prune_sparsity" not in md
    assert not (tmp_path / "plain" / "plots" / "prune_sparsity.png").exists()
    # An old report.json: a prune stage without "details" still renders, with no Pruning section
    # (the views render it; the writer, which writes edgeprep.report/2, would refuse it).
    old = prune_entry()
    del old["details"]
    sample["stages"].append(old)
    doc = build_document(sample)
    md, html = render_markdown(doc), render_html(doc, PNG_SIGNATURE, {})
    assert "| 1 | prune |" in md and "## Pruning" not in md and "Pruning</h2>" not in html
    assert html.count("<img ") == 1


def test_pruning_details_with_missing_fields_render(tmp_path, sample):
    entry = prune_entry()
    entry["details"]["pruning"] = {"params_before": 1000, "params_after": 750, "layers": [None, {"unit": "mlp"}]}
    sample["stages"].append(entry)
    paths = write_reports(tmp_path, sample)
    md = paths["md"].read_text()
    assert "| params | 1,000 | 750 | 25.0% |" in md  # removed share derived from before/after
    assert "| MACs | — | — | — |" in md
    assert "settings: not recorded." in md and "No pruning history was recorded." in md
    assert paths["prune_sparsity"].read_bytes()[:8] == PNG_SIGNATURE


def test_ort_mobile_usability_section(tmp_path, sample):
    entry = {"ep": "NNAPI (Android)", "nodes": 40, "supported_nodes": 1, "partitions": 1, "unsupported_ops": ["ai.onnx:Gelu"],
             "nodes_unsupported_due_to_dynamic_shapes": 38, "verdict": "NO",
             "if_inputs_fixed": {"nodes": 40, "supported_nodes": 39, "partitions": 1, "verdict": "YES"}}
    mobile = art("ort-mobile", "edgeprep", 5.0, 0.9667, 38.71, 2_000_000, 0.9, {"MatMul": 3}, 1.9)
    mobile["target"] = "ort-mobile"
    mobile["info"]["mobile"] = {"file": "model.ort", "fixed_batch": None,
                                "usability": {"dynamic_inputs": ["x"], "eps": {"nnapi": entry}}}
    sample["artifacts"].append(mobile)
    md = write_reports(tmp_path, sample)["md"].read_text()
    assert "## ORT Mobile usability" in md
    assert ("ort-mobile (model.ort, dynamic batch): NNAPI (Android): NO (1/40 nodes, 1 partition), "
            "with fixed input shapes YES (39/40)") in md
    assert "mobile=model.ort" in md  # the files table names the file, not the whole verdict
