"""The ``qat`` stage: quantization-aware training with Teacher Intervention (Kim et al., EACL 2023).

1. The teacher is the full-precision model as the stage receives it (a copy, given tapped
   attention layers so its tensors can be recorded).
2. The student is that model with QuantLinear weights (int8 / int4 / ternary), int8 inputs to
   every Linear and int8 Q, K, V and attention probabilities (``edgeprep.quant.convert``).
3. Activation scales are calibrated on the calibration split (max|x| per quantizer, the input
   passing through unquantized), then learned (LSQ).
4. Training through the shared loop: ``intervention_steps`` steps with intervention (TI-M / C / O,
   or TI-G's O -> C -> M), then plain KD-QAT for the rest; loss = soft CE on logits + MSE on
   attention scores, hidden states and attention outputs; no ground-truth loss by default.
One optimizer and one warmup + cosine schedule span both steps of the paper.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from edgeprep.context import Context
from edgeprep.errors import BadInputError
from edgeprep.quant.convert import QAT_KIND, quantize_model, tap_model
from edgeprep.quant.cpu_family import REDUCED_RANGE
from edgeprep.quant.fake import LsqQuantizer, forward_in_batches
from edgeprep.quant.intervention import InterventionSchedule, TeacherInterventionModel, ti_loss_hook
from edgeprep.quant.smooth import smooth_model
from edgeprep.recipe import QatConfig, TrainConfig
from edgeprep.reparam.fold import fold_reparam, has_reparam
from edgeprep.train import evaluate_accuracy, train

DEFAULT_INTERVENTION_FRACTION = 0.1  # s = 10% of the steps when intervention_steps is unset
CALIB_BATCH = 64
LAST_GOOD_NAME = "last_good.safetensors"


def intervention_steps(cfg: QatConfig, steps: int) -> int:
    if cfg.intervention == "none":
        return 0
    s = cfg.intervention_steps if cfg.intervention_steps is not None \
        else max(1, round(DEFAULT_INTERVENTION_FRACTION * steps))
    if s > steps:
        raise BadInputError(f"stage qat: intervention_steps {s} exceeds the stage's {steps} steps; "
                            f"lower intervention_steps or raise steps")
    return s


@torch.no_grad()
def calibrate(model: torch.nn.Module, inputs: torch.Tensor, batch: int = CALIB_BATCH) -> int:
    """Set every activation quantizer's range to max|x| over ``inputs``; returns how many it set."""
    quantizers = [m for m in model.modules() if isinstance(m, LsqQuantizer)]
    try:
        for q in quantizers:
            q.observing = True
        forward_in_batches(model, inputs, batch)
    finally:
        for q in quantizers:
            q.observing = False
    return sum(bool(q.initialized) for q in quantizers)


def tapped_teacher(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    """A frozen copy of the stage's teacher (or of ``model``) with tapped attention layers."""
    teacher = copy.deepcopy(ctx.teacher if ctx.teacher is not None else model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    tap_model(teacher)
    return teacher


def distil_with_intervention(model: torch.nn.Module, teacher: torch.nn.Module, ctx: Context,
                             train_cfg: TrainConfig, intervention: str, s: int, loss_weights: dict[str, float],
                             label_loss: float, description: str):
    """Train ``model`` from ``teacher`` (both with tapped attention) through the shared loop:
    intervention for ``s`` steps, then plain distillation; returns (TrainResult, schedule).
    The qat and binarize stages share it."""
    val = ctx.data.val
    schedule = InterventionSchedule(intervention, s)
    output_loss = "cosine" if ctx.data.task == "embedding" else "soft_ce"
    wrapper = TeacherInterventionModel(model, teacher, schedule, output_loss=output_loss)
    eval_fn = (lambda m: {"val_accuracy": evaluate_accuracy(m, val)}) if len(val.y) and train_cfg.eval_every \
        else None
    try:
        result = train(wrapper, ctx.data.train, train_cfg, seed=ctx.seed,
                       loss_hooks=[ti_loss_hook(wrapper, loss_weights)], step_callbacks=[wrapper.on_step],
                       eval_fn=eval_fn, progress=ctx.progress, description=description,
                       last_good_path=ctx.stage_dir / LAST_GOOD_NAME if ctx.stage_dir else None,
                       label_weight=label_loss)
    finally:
        wrapper.close()
    return result, schedule


def history_with_modes(result: Any, schedule: InterventionSchedule) -> list[dict[str, Any]]:
    """Each optimizer step with the intervention point it ran under ("none": plain distillation)."""
    return [{**_slim(h), "intervention": schedule.mode(h["step"] - 1) or "none"} for h in result.history]


class QatStage:
    def __init__(self, config: QatConfig):
        self.config = config

    def apply(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        cfg = self.config
        ctx.require_classification("qat", "distils classification logits",
                                   "use the Python API (edgeprep.quant.intervention) with your own loss",
                                   also=("embedding",))
        if any(d.get("kind") == "reparam" and d.get("sla") for d in ctx.decisions):
            raise BadInputError("stage qat: the model has Simplified Linear Attention (reparam attention: sla); "
                                "qat taps softmax attention and does not support it yet; reparam with attention: keep")
        if any(d.get("kind") == QAT_KIND for d in ctx.decisions):
            raise BadInputError("stage qat: the model is already quantized by an earlier qat stage; use one qat stage")
        train_cfg: TrainConfig = cfg.train_config(ctx.train)
        s = intervention_steps(cfg, train_cfg.steps)
        teacher = tapped_teacher(model, ctx)
        val = ctx.data.val
        fp_val = evaluate_accuracy(model, val) if len(val.y) else None

        # A reparam stage's PRepBN norms fold first: the weights QAT quantizes are the folded ones
        # (folding after quantization would rescale integer weights off their grid).
        if has_reparam(model):
            ctx.decisions.append(fold_reparam(model, check_inputs=(ctx.data.calib[:CALIB_BATCH],)))
        reduced = REDUCED_RANGE[cfg.target_cpu] and cfg.weights == "int8" and cfg.activations == "int8"
        decision = quantize_model(model, cfg.weights, cfg.activations, targets=cfg.targets, ignore=cfg.ignore,
                                  embeddings=cfg.embeddings, reduced_range=reduced)
        ctx.decisions.append(decision)
        if cfg.smoothing is not None:  # before calibration: the quantizers' ranges are those of x / s
            decision["smoothing"] = smooth_model(model, ctx.data.calib, cfg.smoothing)
        calibrated = calibrate(model, ctx.data.calib)
        calib_val = evaluate_accuracy(model, val) if len(val.y) else None

        result, schedule = distil_with_intervention(
            model, teacher, ctx, train_cfg, cfg.intervention, s, cfg.loss_weights.model_dump(), cfg.label_loss,
            description=f"qat {cfg.weights}")
        model.eval()
        final_val = evaluate_accuracy(model, val) if len(val.y) else None
        ctx.report.metrics["qat"] = {
            "weights": cfg.weights, "activations": cfg.activations, "intervention": cfg.intervention,
            "intervention_steps": s, "steps": train_cfg.steps, "label_loss": cfg.label_loss,
            "smoothing": cfg.smoothing, "int8_embeddings": decision.get("embeddings", []),
            "target_cpu": cfg.target_cpu, "reduced_range": reduced,
            "loss_weights": cfg.loss_weights.model_dump(),
            "quantized_linears": len(decision["linears"]), "attention_layers": len(decision["attentions"]),
            "activation_quantizers": calibrated,
            "val_accuracy": {"fp32": fp_val, "calibrated": calib_val, "trained": final_val},
            "history": history_with_modes(result, schedule),
        }
        ctx.report.note(f"QAT {cfg.weights} weights / {cfg.activations} activations on {len(decision['linears'])} "
                        f"Linears, {calibrated} activation quantizers; intervention {cfg.intervention} for {s} of "
                        f"{train_cfg.steps} steps"
                        + (f"; int8 weights on the [-63, 63] grid (target_cpu {cfg.target_cpu}: exact on every "
                           "CPU family's int8 kernels)" if reduced else "")
                        + (f"; SmoothQuant alpha {cfg.smoothing} on {len(decision['smoothing']['linears'])} inputs"
                           if cfg.smoothing is not None else "")
                        + (f"; per-row int8 embeddings: {', '.join(decision['embeddings'])}"
                           if decision.get("embeddings") else ""))
        return model


def _slim(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in entry.items()}
