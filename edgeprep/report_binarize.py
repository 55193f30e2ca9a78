"""The "Binarization" part of the report: one section per stage entry carrying ``details.binarize``
(written by ``edgeprep.stages.binarize``), plus what each binarized artifact stores, in bytes.

It states the settings (activation precision, estimator rank, intervention, loss weights), the
validation accuracy of the fp32 teacher, right after binarizing (calibrated scales) and after
training, a sampled loss history, and for every binarized artifact the binary weights' storage:
bytes on disk (1 bit each packed, or 2 as INT2) against the same weights in fp32, and bits per
weight resident at run time (32 once ORT unpacks packed weights at load, 2 in MatMulNBits).
"""
from __future__ import annotations

from typing import Any, Mapping

from edgeprep.report_model import Section, cell_text, fmt, fmt_int, get_nested
from edgeprep.report_qat import history_table  # same columns: step, intervention, loss, terms


def binarize_entries(report: Mapping[str, Any]) -> list[tuple[int, Mapping[str, Any]]]:
    stages = [s for s in report.get("stages") or [] if isinstance(s, Mapping)]
    return [(i, b) for i, s in enumerate(stages) if isinstance(b := get_nested(s, "details", "binarize"), Mapping)]


def _settings(b: Mapping[str, Any]) -> str:
    weights = get_nested(b, "loss_weights") or {}
    loss = ", ".join(f"{k} {v:g}" for k, v in weights.items()) if isinstance(weights, Mapping) else "—"
    head = cell_text(b.get("head")) + " kept full precision" if b.get("head") else "head binarized"
    return (f"settings: binary weights, activations {cell_text(b.get('activations'))}, residual estimators rank "
            f"{cell_text(b.get('estimator_rank'))}; {cell_text(b.get('binary_linears'))} binary Linears, "
            f"{cell_text(b.get('attention_layers'))} attention layers, {cell_text(b.get('binary_embeddings'))} binary "
            f"embedding tables; {head}; intervention {cell_text(b.get('intervention'))} for "
            f"{cell_text(b.get('intervention_steps'))} of {cell_text(b.get('steps'))} steps; loss weights {loss}; "
            f"ground-truth loss weight {cell_text(b.get('label_loss'))}.")


def _accuracy(b: Mapping[str, Any]) -> str:
    acc = b.get("val_accuracy") or {}
    return (f"validation accuracy: fp32 teacher {fmt(acc.get('fp32'))}, binarized with calibrated scales "
            f"{fmt(acc.get('calibrated'))}, after training {fmt(acc.get('trained'))}.")


def _cost(b: Mapping[str, Any]) -> str:
    cost = b.get("cost") or {}
    fp, bn = cost.get("fp32") or {}, cost.get("binarized") or {}
    if not fp or not bn:
        return "cost: not recorded."
    return (f"cost per sample (binary multiply-accumulates at 1/64 of a FLOP, binary weights at 1 bit): "
            f"{fmt(fp.get('flops', 0) / 1e6, '.2f')} MFLOPs -> {fmt(bn.get('flops', 0) / 1e6, '.2f')} MFLOPs "
            f"({fmt(cost.get('flops_ratio'), '.1f')}x fewer), {fmt_int(fp.get('total_bytes'))} B -> "
            f"{fmt_int(bn.get('total_bytes'))} B ({fmt(cost.get('bytes_ratio'), '.1f')}x smaller).")


def _artifact_lines(report: Mapping[str, Any]) -> list[str]:
    lines = []
    for art in report.get("artifacts") or []:
        info = get_nested(art, "info", "quantized_graph", "binary")
        if not isinstance(info, Mapping):
            continue
        on_disk, fp32 = info.get("binary_weight_bytes_on_disk"), info.get("fp32_binary_weight_bytes")
        ratio = f", {fp32 / on_disk:.1f}x fewer than fp32's {fmt_int(fp32)} B" if on_disk and fp32 else ""
        lines.append(f"artifact {art.get('name')}: {fmt_int(info.get('binary_weights'))} binary weights stored "
                     f"as {'/'.join(info.get('binary_weight_storage') or [])}: {fmt_int(on_disk)} B on disk "
                     f"({cell_text(info.get('bits_per_binary_weight_on_disk'))} bits each{ratio}); at run time "
                     f"{cell_text(info.get('resident_bits_per_binary_weight'))} bits each ({info.get('note', '')}); "
                     f"other initializers {fmt_int(info.get('other_initializer_bytes'))} B.")
    return lines


def binarize_sections(report: Mapping[str, Any]) -> list[Section]:
    entries = binarize_entries(report)
    several = len(entries) > 1
    return [Section(f"Binarization (stage #{i})" if several else "Binarization", table=history_table(b),
                    intro=[_settings(b), _accuracy(b), _cost(b), *_artifact_lines(report)]) for i, b in entries]
