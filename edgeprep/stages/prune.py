"""The ``prune`` stage: Adapt-Pruner on the recipe's model and data (see ``edgeprep.pruning.engine``).

Training between pruning stages goes through the shared loop (``edgeprep.train.train``), distilling
from the unpruned model (the stage's teacher) by default. The whole stage follows one
warmup-stable-decay learning-rate curve across its pruning stages, as the paper trains; each stage
re-warms briefly because it starts a fresh optimizer on the smaller shapes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from edgeprep.context import Context
from edgeprep.errors import BadInputError
from edgeprep.measure.cost import count_macs, count_params
from edgeprep.pruning.engine import PruneSettings, describe, prune_model
from edgeprep.recipe import PruneConfig, TrainConfig
from edgeprep.train import embedding_loss, evaluate_accuracy, is_embedding_target, logits_of, train

LAST_GOOD_NAME = "last_good.safetensors"
DECAY_FRACTION = 0.2  # WSD: the last 20% of the stage's training steps decay the lr linearly to 0


class ClassificationCalibration:
    """Seeded random batches of the training split; the loss is cross-entropy on the labels
    (1 - cosine to the target embeddings for an embedding task)."""

    def __init__(self, split: Any, batch_size: int, seed: int):
        self.split, self.batch_size, self.seed = split, batch_size, seed

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.split.y)
        gen = torch.Generator().manual_seed(self.seed * 7919 + i)  # fresh batch per step, reproducible
        idx = torch.randperm(n, generator=gen)[:min(self.batch_size, n)]
        return self.split.x[idx], self.split.y[idx]

    def inputs(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return batch[0]

    def forward(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        return model(batch[0])

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out, y = logits_of(model(batch[0])), batch[1]
        return embedding_loss(out, y).mean() if is_embedding_target(y) else F.cross_entropy(out, y)


def settings_from(config: PruneConfig, seed: int) -> PruneSettings:
    return PruneSettings(ratio=config.pruning_ratio, budget=config.budget, allocation=config.allocation,
                         schedule=config.schedule, ratio_per_stage=config.ratio_per_stage,
                         inner_steps=config.inner_steps, importance=config.importance,
                         amplitude=config.amplitude, units=tuple(config.units) if config.units else None,
                         targets=tuple(config.targets), ignore=tuple(config.ignore), seed=seed)


def wsd_lr(peak: float, total_steps: int, stage_warmup: int, steps_per_stage: int, stage: int):
    """lr for local step t of pruning stage ``stage`` (1-based): brief re-warmup, stable, final decay."""
    decay_from = int(total_steps * (1 - DECAY_FRACTION))

    def lr(t: int) -> float:
        g = (stage - 1) * steps_per_stage + t  # step within the whole prune stage
        scale = min(1.0, (t + 1) / stage_warmup) if stage_warmup else 1.0
        if g >= decay_from:
            scale *= max(0.0, (total_steps - g) / max(1, total_steps - decay_from))
        return peak * scale
    return lr


class PruneStage:
    def __init__(self, config: PruneConfig):
        self.config = config

    def apply(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        cfg = self.config
        ctx.require_classification("prune", "scores and trains with classification labels",
                                   "use the Python API (edgeprep.pruning.engine) with your own loss",
                                   also=("embedding",))
        # after qat / binarize is refused by the order rules (their rank is higher): pruning rebuilds Linears
        # as float nn.Linear and would drop the quantizers
        if cfg.distill is not None and ctx.teacher is None:
            raise BadInputError("stage prune: `distill` is set but there is no teacher model; set distill: null")
        settings = settings_from(cfg, ctx.seed)
        train_cfg: TrainConfig = cfg.train.resolve(ctx.train)
        k_stages = settings.num_stages
        per_stage = cfg.steps_per_stage if cfg.steps_per_stage is not None else train_cfg.steps // k_stages
        total_steps = per_stage * k_stages
        stage_warmup = max(1, min(train_cfg.warmup_steps, per_stage // 5)) if per_stage else 0
        example = (ctx.example_inputs[0][:1],)
        params_before, macs_before = count_params(model), count_macs(model, example)
        val = ctx.data.val
        teacher = ctx.teacher if cfg.distill is not None else None

        def train_between(m: torch.nn.Module, stage: int, of: int) -> dict[str, Any]:
            out: dict[str, Any] = {"params": count_params(m)}
            if per_stage:
                stage_cfg = train_cfg.model_copy(update={"steps": per_stage})
                result = train(m, ctx.data.train, stage_cfg, seed=ctx.seed * 1000 + stage, teacher=teacher,
                               distill=cfg.distill, progress=ctx.progress, description=f"prune {stage}/{of}",
                               last_good_path=ctx.stage_dir / LAST_GOOD_NAME if ctx.stage_dir else None,
                               lr_fn=wsd_lr(train_cfg.lr, total_steps, stage_warmup, per_stage, stage))
                out["train_loss"] = round(result.final_loss, 6)
            if len(val.y):
                out["val_accuracy"] = round(evaluate_accuracy(m, val), 6)
            return out

        outcome = prune_model(model, settings, ClassificationCalibration(ctx.data.train, cfg.calibration_batch, ctx.seed),
                              run_macs=lambda m: count_macs(m, example), train_between=train_between)
        ctx.decisions.extend(outcome.decisions)
        params_after, macs_after = count_params(model), count_macs(model, example)
        ctx.report.metrics["pruning"] = {
            "settings": {"ratio": settings.ratio, "budget": settings.budget, "allocation": settings.allocation,
                         "schedule": settings.schedule, "stages": k_stages, "inner_steps": outcome.inner_steps,
                         "importance": settings.importance, "amplitude": settings.amplitude,
                         "train_steps_per_stage": per_stage, "distill": cfg.distill is not None},
            "params_before": params_before, "params_after": params_after,
            "macs_before": macs_before, "macs_after": macs_after,
            "removed": {"params": 1 - params_after / params_before, "macs": 1 - macs_after / macs_before},
            "layers": outcome.layers,
            "history": outcome.history,
        }
        ctx.report.note(f"pruned {describe(settings, outcome.inner_steps)}: params {params_before:,} -> {params_after:,} "
                        f"(-{1 - params_after / params_before:.1%}), MACs {macs_before:,} -> {macs_after:,} "
                        f"(-{1 - macs_after / macs_before:.1%})")
        return model
