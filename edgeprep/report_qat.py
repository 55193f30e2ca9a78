"""The "Quantization-aware training" part of the report: one section per stage entry carrying
``details.qat`` (written by ``edgeprep.stages.qat``), plus what the exported artifacts run.

It states the settings, the validation accuracy of the fp32 teacher, of the model right after
calibration and after training, a sampled loss history (each distillation term), and for every
quantized artifact how its weights are stored and which MatMulNBits accuracy level its sessions use
(edgeprep sets 1, fp32 activations, on purpose: ORT's default 4 re-quantizes activations per block).
"""
from __future__ import annotations

from typing import Any, Mapping

from edgeprep.report_model import Section, Table, cell_text, fmt, get_nested

HISTORY_ROWS = 8  # sampled rows of the loss history shown in the report (the JSON keeps all)


def qat_entries(report: Mapping[str, Any]) -> list[tuple[int, Mapping[str, Any]]]:
    stages = [s for s in report.get("stages") or [] if isinstance(s, Mapping)]
    return [(i, q) for i, s in enumerate(stages) if isinstance(q := get_nested(s, "details", "qat"), Mapping)]


def _settings(q: Mapping[str, Any]) -> str:
    weights = get_nested(q, "loss_weights") or {}
    loss = ", ".join(f"{k} {v:g}" for k, v in weights.items()) if isinstance(weights, Mapping) else "—"
    return (f"settings: weights {cell_text(q.get('weights'))}, activations {cell_text(q.get('activations'))}, "
            f"intervention {cell_text(q.get('intervention'))} for {cell_text(q.get('intervention_steps'))} of "
            f"{cell_text(q.get('steps'))} steps, then KD-QAT; loss weights {loss}; ground-truth loss weight "
            f"{cell_text(q.get('label_loss'))}; {cell_text(q.get('quantized_linears'))} Linears and "
            f"{cell_text(q.get('activation_quantizers'))} activation quantizers.")


def _accuracy(q: Mapping[str, Any]) -> str:
    acc = q.get("val_accuracy") or {}
    return (f"validation accuracy: fp32 teacher {fmt(acc.get('fp32'))}, after calibration "
            f"{fmt(acc.get('calibrated'))}, after training {fmt(acc.get('trained'))}.")


def sampled(history: Any, rows: int = HISTORY_ROWS) -> list[Mapping[str, Any]]:
    """At most ``rows`` entries of a stage's per-step history, evenly spaced, first and last kept."""
    hist = [h for h in history or [] if isinstance(h, Mapping)]
    if len(hist) > rows:
        idx = sorted({round(i * (len(hist) - 1) / (rows - 1)) for i in range(rows)})
        hist = [hist[i] for i in idx]
    return hist


def history_table(q: Mapping[str, Any]) -> Table:
    """The sampled loss history of a distilling stage (qat, binarize): each term and the intervention."""
    hist = sampled(q.get("history"))
    terms = sorted({k for h in hist for k in h if k.startswith("ti_") or k in ("ce", "val_accuracy")})
    headers = ["step", "intervention", "loss", *terms]
    rows = [[cell_text(h.get("step")), cell_text(h.get("intervention")), fmt(h.get("loss"))]
            + [fmt(h.get(t)) for t in terms] for h in hist]
    return Table(headers, rows, [True, False] + [True] * (len(headers) - 2), [None] * len(rows))


def _artifact_lines(report: Mapping[str, Any]) -> list[str]:
    lines = []
    for art in report.get("artifacts") or []:
        graph = get_nested(art, "info", "quantized_graph")
        if not isinstance(graph, Mapping):
            continue
        nbits = graph.get("nbits")
        storage = "int8 weight initializers, Q/DQ activations (integer kernels)"
        if isinstance(nbits, Mapping):
            kinds = sorted(set((nbits.get("storage") or {}).values()))
            storage = (f"{nbits.get('converted')} weight-only weights stored as {'/'.join(kinds)} "
                       f"(block {nbits.get('block_size')}, opset {nbits.get('opset')}) for MatMulNBits")
        lines.append(f"artifact {art.get('name')}: {storage}; MatMulNBits accuracy level "
                     f"{graph.get('matmulnbits_accuracy_level')} (fp32 activations: exact; ORT's default 4 "
                     "re-quantizes activations per block and changes the numbers).")
    return lines


def qat_sections(report: Mapping[str, Any]) -> list[Section]:
    entries = qat_entries(report)
    several = len(entries) > 1
    sections = []
    for i, q in entries:
        title = f"Quantization-aware training (stage #{i})" if several else "Quantization-aware training"
        sections.append(Section(title, table=history_table(q),
                                intro=[_settings(q), _accuracy(q), *_artifact_lines(report)]))
    return sections
