"""The ``binarize`` stage: BiPFT (Xing et al., AAAI 2024) on the stage's input model.

1. The teacher is the full-precision model as the stage receives it (tapped, as for qat).
2. Surgery (``edgeprep.binary.convert``): binary (BWN) weights in every Linear but the head,
   Linear inputs / Q / K / V / attention probabilities binarized (or int8, or float), word
   embeddings binarized per row, rank-r residual estimators in every attention layer.
3. Binarizer scales start from a calibration pass (2 mean|x|, 4 mean|p| on the first batch).
4. Training through the shared loop with the qat stage's distillation: soft CE on logits + MSE on
   hidden states by default (BiPFT's), Teacher Intervention optional, no ground-truth loss unless
   ``label_loss`` > 0. A reparam stage's PRepBN norms fold first, as for qat.
"""
from __future__ import annotations

import torch

from edgeprep.binary.convert import binarize_model
from edgeprep.binary.cost import count_ops, model_bytes
from edgeprep.context import Context
from edgeprep.recipe import BinarizeConfig, TrainConfig
from edgeprep.reparam.fold import fold_reparam, has_reparam
from edgeprep.stages.qat import (
    CALIB_BATCH,
    calibrate,
    distil_with_intervention,
    history_with_modes,
    intervention_steps,
    tapped_teacher,
)
from edgeprep.train import evaluate_accuracy

ACT_BITS = {"binary": 1, "int8": 8, "none": 32}


class BinarizeStage:
    def __init__(self, config: BinarizeConfig):
        self.config = config

    def apply(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        cfg = self.config
        ctx.require_classification("binarize", "distils classification logits",
                                   "use the Python API (edgeprep.binary.convert) with your own loss")
        train_cfg: TrainConfig = cfg.train_config(ctx.train)
        s = intervention_steps(cfg, train_cfg.steps)
        teacher = tapped_teacher(model, ctx)
        example = tuple(x[:1] for x in ctx.example_inputs)  # batch 1, the papers' accounting
        fp_cost = {**count_ops(model, example), **model_bytes(model)}
        val = ctx.data.val
        fp_val = evaluate_accuracy(model, val) if len(val.y) else None
        if has_reparam(model):
            ctx.decisions.append(fold_reparam(model, check_inputs=(ctx.data.calib[:CALIB_BATCH],)))
        decision = binarize_model(model, cfg.activations, cfg.estimator_rank, keep_head=cfg.keep_head,
                                  targets=cfg.targets, ignore=cfg.ignore)
        ctx.decisions.append(decision)
        calibrate(model, ctx.data.calib)  # also sets every elastic binarizer's scale from its first batch
        calib_val = evaluate_accuracy(model, val) if len(val.y) else None
        result, schedule = distil_with_intervention(
            model, teacher, ctx, train_cfg, cfg.intervention, s, cfg.loss_weights.model_dump(), cfg.label_loss,
            description=f"binarize W1A{ACT_BITS[cfg.activations]}")
        model.eval()
        final_val = evaluate_accuracy(model, val) if len(val.y) else None
        cost = {**count_ops(model, example), **model_bytes(model)}
        ctx.report.metrics["binarize"] = {
            "weights": cfg.weights, "activations": cfg.activations, "estimator_rank": cfg.estimator_rank,
            "keep_head": cfg.keep_head, "head": decision["head"], "intervention": cfg.intervention,
            "intervention_steps": s, "steps": train_cfg.steps, "label_loss": cfg.label_loss,
            "loss_weights": cfg.loss_weights.model_dump(), "binary_linears": len(decision["linears"]),
            "attention_layers": len(decision["attentions"]), "binary_embeddings": len(decision["embeddings"]),
            "val_accuracy": {"fp32": fp_val, "calibrated": calib_val, "trained": final_val},
            # per sample; binary multiply-accumulates count 1/64 of a FLOP, binary weights 1 bit
            "cost": {"fp32": fp_cost, "binarized": cost,
                     "flops_ratio": fp_cost["flops"] / cost["flops"],
                     "bytes_ratio": fp_cost["total_bytes"] / cost["total_bytes"]},
            "history": history_with_modes(result, schedule),
        }
        ctx.report.note(f"binarized {len(decision['linears'])} Linears (weights binary, activations "
                        f"{cfg.activations}), {len(decision['attentions'])} attention layers with rank-"
                        f"{cfg.estimator_rank} estimators; "
                        + (f"head {decision['head']} kept float" if decision["head"] else "head binarized")
                        + f"; {train_cfg.steps} steps of distillation")
        return model
