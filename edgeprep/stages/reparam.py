"""The ``reparam`` stage: LayerNorm -> PRepBN (and optionally attention -> SLA), then distillation.

1. Surgery (``edgeprep.reparam.surgery``): every LayerNorm becomes a PRepBN holding the original
   LayerNorm, so at lam = 1 the model computes what it did; with ``attention: sla`` every ViT
   attention becomes Simplified Linear Attention initialised from its Q/K/V/output weights.
2. Training through the shared loop, distilled from the model before the stage (KD on logits, the
   ground truth, and MSE between the teacher's and student's block outputs), while lam follows
   the optimizer steps: 1 for ``warmup_steps``, linear to 0 over ``decay_steps``, then 0.
3. The checkpoint keeps the PRepBN modules (and their step counters); exporters fold them away
   (``edgeprep.reparam.fold``) and refuse while lam > 0. A later qat stage folds them first, so
   the weights it quantizes are the folded ones.
A checkpoint whose schedule has not finished continues it: running the stage on it again trains
on from the saved step count, with no new surgery.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from edgeprep.context import Context
from edgeprep.errors import BadInputError
from edgeprep.pruning.bert import is_bert_layer
from edgeprep.pruning.groups import is_vit_block
from edgeprep.recipe import ReparamConfig, TrainConfig
from edgeprep.reparam.fold import has_reparam, unfinished
from edgeprep.reparam.norms import PRepBN, advance_all
from edgeprep.reparam.surgery import reparam_model
from edgeprep.train import StepState, evaluate_accuracy, train

LAST_GOOD_NAME = "last_good.safetensors"


def block_names(model: nn.Module) -> list[str]:
    """Transformer blocks whose outputs the hidden-state loss compares (ViT blocks, BERT layers)."""
    return [n for n, m in model.named_modules() if is_vit_block(m) or is_bert_layer(m)]


class HiddenStateLoss:
    """MSE between the student's and the teacher's block outputs (same block FQNs in both)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float):
        self.weight = weight
        self.names = block_names(student)
        missing = [n for n in self.names if n not in dict(teacher.named_modules())]
        if missing:
            raise BadInputError(f"stage reparam: the teacher has no block {missing[0]} to distil hidden states from")
        self.outputs: dict[tuple[str, str], torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._keep(role, n))
                        for role, model in (("student", student), ("teacher", teacher)) for n in self.names]

    def _keep(self, role: str, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[role, name] = output[0] if isinstance(output, tuple) else output
        return hook

    def __call__(self, state: StepState) -> Mapping[str, torch.Tensor]:
        if not self.names or self.weight == 0:
            return {}
        mse = sum(F.mse_loss(self.outputs["student", n], self.outputs["teacher", n].detach()) for n in self.names)
        return {"hidden": self.weight * mse / len(self.names)}

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.outputs.clear()


class ReparamStage:
    def __init__(self, config: ReparamConfig):
        self.config = config

    def apply(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        cfg = self.config
        ctx.require_classification("reparam", "distils classification logits",
                                   "use the Python API (edgeprep.reparam.surgery) with your own loss",
                                   also=("embedding",))
        train_cfg: TrainConfig = cfg.train_config(ctx.train)
        if ctx.teacher is None:
            raise BadInputError("stage reparam distils from the model before the stage; no teacher was given")
        val = ctx.data.val
        before_val = evaluate_accuracy(model, val) if len(val.y) else None
        continuing = has_reparam(model)
        if continuing:
            if not unfinished(model):
                raise BadInputError("stage reparam: the model's PRepBN schedule has already finished (lam = 0); "
                                    "nothing to continue (use finetune to train it further)")
            norm = next(m for m in model.modules() if isinstance(m, PRepBN))
            warmup, decay = norm.warmup_steps, norm.decay_steps
            decision = None
        else:
            warmup, decay = cfg.schedule(train_cfg.steps)
            decision = reparam_model(model, cfg.norm, cfg.attention, warmup, decay)
            ctx.decisions.append(decision)
        surgery_val = evaluate_accuracy(model, val) if len(val.y) else None
        hidden = HiddenStateLoss(model, ctx.teacher, cfg.hidden_loss)
        eval_fn = (lambda m: {"val_accuracy": evaluate_accuracy(m, val)}) if len(val.y) and train_cfg.eval_every \
            else None
        try:
            result = train(model, ctx.data.train, train_cfg, seed=ctx.seed, teacher=ctx.teacher,
                           distill=cfg.distill, loss_hooks=[hidden], step_callbacks=[lambda step, m: advance_all(m)],
                           eval_fn=eval_fn, progress=ctx.progress, description=f"reparam {cfg.norm}",
                           last_good_path=ctx.stage_dir / LAST_GOOD_NAME if ctx.stage_dir else None)
        finally:
            hidden.close()
        model.eval()
        final_val = evaluate_accuracy(model, val) if len(val.y) else None
        left = unfinished(model)
        norms = [m for m in model.modules() if isinstance(m, PRepBN)]
        ctx.report.metrics["reparam"] = {
            "norm": cfg.norm if decision else "continued", "attention": cfg.attention if decision else "unchanged",
            "warmup_steps": warmup, "decay_steps": decay, "steps": train_cfg.steps,
            "schedule_steps_done": int(norms[0].steps_done), "lam": norms[0].lam,
            "norms": len(norms), "sla_layers": len(decision["sla"]) if decision else None,
            "val_accuracy": {"before": before_val, "after_surgery": surgery_val, "trained": final_val},
            "history": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in h.items()}
                        for h in result.history],
        }
        what = f"{len(norms)} LayerNorms -> {cfg.norm}" if decision else "continued the PRepBN schedule"
        if decision and decision["sla"]:
            what += f", {len(decision['sla'])} attention layers -> SLA"
        ctx.report.note(f"reparam: {what}; warmup {warmup} + decay {decay} steps, trained {train_cfg.steps}")
        if left:
            ctx.report.note(f"lam is still {left[0][1]:.3g} after {left[0][2]} of {left[0][3]} schedule steps: "
                            "the model cannot be exported until the schedule finishes (run reparam on it again)")
        return model
