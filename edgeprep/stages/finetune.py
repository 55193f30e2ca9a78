"""The ``finetune`` stage: train, or distil into, the current model with the shared training loop.

The quickstart trains its baseline through this stage, so the baseline goes through exactly the
machinery (optimizer, schedule, NaN handling, DDP) that the compression stages use later.
"""
from __future__ import annotations

import torch

from edgeprep.context import Context
from edgeprep.errors import BadInputError
from edgeprep.recipe import FinetuneConfig
from edgeprep.train import evaluate_accuracy, train

LAST_GOOD_NAME = "last_good.safetensors"


class FinetuneStage:
    def __init__(self, config: FinetuneConfig):
        self.config = config

    def apply(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        cfg = self.config.train.resolve(ctx.train)
        distill = self.config.distill
        ctx.require_classification("finetune", "trains classifiers (cross-entropy on labels)",
                                   "remove the finetune stage for this model", also=("embedding",))
        if distill is not None and ctx.teacher is None:
            raise BadInputError("stage finetune: `distill` is set but there is no teacher model; "
                                "remove `distill` to train on the labels only")
        teacher = ctx.teacher if distill is not None else None
        val = ctx.data.val
        has_val = len(val.y) > 0
        eval_fn = (lambda m: {"val_accuracy": evaluate_accuracy(m, val)}) if has_val and cfg.eval_every else None
        result = train(model, ctx.data.train, cfg, seed=ctx.seed, teacher=teacher, distill=distill,
                       eval_fn=eval_fn, progress=ctx.progress, description="finetune",
                       last_good_path=ctx.stage_dir / LAST_GOOD_NAME if ctx.stage_dir else None)
        model.eval()
        metrics = ctx.report.metrics
        metrics.update(steps=result.steps, final_loss=result.final_loss, seconds=result.seconds)
        if has_val:
            metrics["val_accuracy"] = evaluate_accuracy(model, val)
        else:
            ctx.report.note("no validation split (data.val_fraction is 0): val accuracy not measured")
        if eval_fn is not None:  # the curve of the periodic evaluations: [[step, accuracy], ...]
            metrics["val_accuracy_curve"] = [[h["step"], h["val_accuracy"]] for h in result.history
                                             if "val_accuracy" in h]
        if distill is not None:
            ctx.report.note(f"distilled from the teacher (the model before this stage) with "
                            f"T={distill.temperature:g} alpha={distill.alpha:g}")
        ctx.report.note(f"trained {cfg.steps} steps x {cfg.batch_size * cfg.grad_accum_steps} samples "
                        f"(lr {cfg.lr:g}, warmup {cfg.warmup_steps}, final loss {result.final_loss:.4f})"
                        + (f" on {result.world_size} processes" if result.world_size > 1 else ""))
        return model
