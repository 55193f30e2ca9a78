"""The "Re-parameterization" part of the report: one section per stage entry carrying
``details.reparam`` (written by ``edgeprep.stages.reparam``).

It states what was swapped (norms, attention), the lam schedule and where it stands (an unfinished
schedule means the model cannot be exported yet), validation accuracy before the stage, right after
the surgery and after training, and a sampled loss history.
"""
from __future__ import annotations

from typing import Any, Mapping

from edgeprep.report_model import Section, Table, cell_text, fmt, get_nested
from edgeprep.report_qat import sampled


def reparam_entries(report: Mapping[str, Any]) -> list[tuple[int, Mapping[str, Any]]]:
    stages = [s for s in report.get("stages") or [] if isinstance(s, Mapping)]
    return [(i, r) for i, s in enumerate(stages) if isinstance(r := get_nested(s, "details", "reparam"), Mapping)]


def _settings(r: Mapping[str, Any]) -> str:
    sla = r.get("sla_layers")
    return (f"settings: norm {cell_text(r.get('norm'))} on {cell_text(r.get('norms'))} LayerNorms, attention "
            f"{cell_text(r.get('attention'))}" + (f" ({sla} layers)" if sla else "") + f"; lam 1 for "
            f"{cell_text(r.get('warmup_steps'))} steps, then 1 -> 0 over {cell_text(r.get('decay_steps'))}; "
            f"{cell_text(r.get('steps'))} steps trained; schedule at step {cell_text(r.get('schedule_steps_done'))}, "
            f"lam {fmt(r.get('lam'))}" + (" (not finished: export is refused until lam is 0)."
                                          if (r.get("lam") or 0) > 0 else "."))


def _accuracy(r: Mapping[str, Any]) -> str:
    acc = r.get("val_accuracy") or {}
    return (f"validation accuracy: before the stage {fmt(acc.get('before'))}, right after the surgery "
            f"{fmt(acc.get('after_surgery'))}, after training {fmt(acc.get('trained'))}.")


def _history(r: Mapping[str, Any]) -> Table:
    hist = sampled(r.get("history"))
    terms = [t for t in ("ce", "kd", "hidden", "val_accuracy") if any(t in h for h in hist)]
    headers = ["step", "loss", *terms]
    rows = [[cell_text(h.get("step")), fmt(h.get("loss"))] + [fmt(h.get(t)) for t in terms] for h in hist]
    return Table(headers, rows, [True] * len(headers), [None] * len(rows))


def reparam_sections(report: Mapping[str, Any]) -> list[Section]:
    entries = reparam_entries(report)
    several = len(entries) > 1
    return [Section(f"Re-parameterization (stage #{i})" if several else "Re-parameterization",
                    table=_history(r), intro=[_settings(r), _accuracy(r)]) for i, r in entries]
