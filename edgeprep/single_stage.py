"""One stage or one export on a checkpoint, for chaining by hand (`edgeprep finetune|export CKPT`).

A checkpoint's meta records the resolved data config, so a stage run alone sees the same data as
the recipe that produced it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from edgeprep.artifacts import FP32_MIN_SQNR_DB, export_artifact
from edgeprep.context import Context, StageReport
from edgeprep.errors import BadInputError
from edgeprep.exporters.options import ExportOptions
from edgeprep.measure.metrics import metric_for, torch_outputs
from edgeprep.pipeline import frozen_copy
from edgeprep.recipe import DataConfig, TrainConfig
from edgeprep.text_data import TEXT_SOURCES
from edgeprep.types import Artifact

REFERENCE_SAMPLES = 256


def _load(ckpt_dir: Path, trust_pickle: bool):
    from edgeprep.checkpoint import load_checkpoint
    from edgeprep.data import load_data

    ckpt = load_checkpoint(resolve_checkpoint_dir(ckpt_dir), trust_pickle=trust_pickle)
    if "data" not in ckpt.meta:
        raise BadInputError(f"{ckpt_dir}: checkpoint has no data config in its meta; "
                            "it was not written by `edgeprep run` or a stage command")
    try:
        data_cfg = DataConfig(**ckpt.meta["data"])
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"{ckpt_dir}: the checkpoint's data config is invalid "
                            f"({' '.join(str(exc).split())[:200]}); re-create the checkpoint") from None
    if data_cfg.source in TEXT_SOURCES:
        # the targets are the ORIGINAL model's embeddings: rebuild it from the checkpoint's model
        # config (no decisions replayed), never from the compressed weights
        from edgeprep.models import load_model
        from edgeprep.text_data import load_text_data

        return ckpt, load_text_data(data_cfg, load_model(ckpt.model_cfg))
    return ckpt, load_data(data_cfg)


def resolve_checkpoint_dir(path: Path) -> Path:
    """A checkpoint directory, or a run's stage directory (``runs/x/stages/0-finetune``) holding one."""
    path = Path(path)
    return path / "checkpoint" if (path / "checkpoint" / "checkpoint.json").is_file() else path


def apply_stage(ckpt_dir: Path, out_dir: Path, config: Any, seed: int = 0,
                trust_pickle: bool = False) -> dict[str, Any]:
    from edgeprep.checkpoint import read_checkpoint_json, save_checkpoint
    from edgeprep.stages import run_stage

    ckpt, data = _load(Path(ckpt_dir), trust_pickle)
    model = ckpt.model.eval()
    teacher = frozen_copy(model)
    ctx = Context(data=data, train=TrainConfig(), example_inputs=(data.test.x[:2].clone(),), seed=seed,
                  report=StageReport(kind=config.kind), teacher=teacher, stage_dir=Path(out_dir),
                  decisions=list(ckpt.decisions))
    t0 = time.perf_counter()
    model = run_stage(config, model, ctx)
    name, fn = metric_for(data.task)
    entry = {"kind": config.kind, "seconds": round(time.perf_counter() - t0, 3),
             "metric": {"name": name, "value": fn(torch_outputs(model, data.test.x), data.test.y.numpy())},
             "notes": ctx.report.notes, "details": ctx.report.metrics}
    base_dir = read_checkpoint_json(resolve_checkpoint_dir(ckpt_dir)).get("base_dir")  # where a local factory module lives
    save_checkpoint(Path(out_dir), model, ckpt.model_cfg, ctx.decisions, {**ckpt.meta, "last_stage": entry},
                    base_dir=Path(base_dir) if base_dir else None)
    return entry


def export_checkpoint(ckpt_dir: Path, out_dir: Path, options: Mapping[str, Any], trust_pickle: bool = False,
                      min_sqnr_db: Optional[float] = FP32_MIN_SQNR_DB) -> Artifact:
    from edgeprep.exporters import get_exporter
    from edgeprep.recipe import parse_export_target

    cfg: ExportOptions = parse_export_target(dict(options), where="--target/options")
    ckpt, data = _load(Path(ckpt_dir), trust_pickle)
    model = ckpt.model.eval()
    ref_x = np.ascontiguousarray(data.test.x[:REFERENCE_SAMPLES].numpy())
    return export_artifact(get_exporter(cfg.target), model, (data.test.x[:2].clone(),), Path(out_dir), cfg,
                           name=Path(out_dir).name, role="edgeprep", task=data.task, ref_x=ref_x,
                           labels=data.test.y[:REFERENCE_SAMPLES].numpy(),
                           expect={"min_sqnr_db": min_sqnr_db} if min_sqnr_db is not None else {})
