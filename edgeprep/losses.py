"""The loss terms of the training loop (``edgeprep.train``): what a loss hook sees, the label,
distillation and relation losses, and how one micro-batch's terms are named and weighted."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgeprep.recipe import DistillConfig


@dataclass
class StepState:
    """What a loss hook sees for one micro-batch (this rank's slice under DDP)."""

    step: int  # 0-based optimizer step index
    total_steps: int
    micro_step: int  # 0-based micro-batch index within the optimizer step
    lr: float
    x: torch.Tensor
    y: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: Optional[torch.Tensor]
    model: nn.Module  # the unwrapped student (never the DDP wrapper)
    teacher: Optional[nn.Module]


class LossHook(Protocol):
    def __call__(self, state: StepState) -> Mapping[str, torch.Tensor]:
        """Named extra loss terms (scalar means over the micro-batch, already weighted); summed into the loss."""
        ...


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample KL(softmax(t/T) || softmax(s/T)) * T^2 (Hinton et al.; T^2 keeps gradient scale)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)
    return kl * (temperature * temperature)


def is_embedding_target(y: torch.Tensor) -> bool:
    """Float targets are embeddings to match (task "embedding"); integer ones are class labels."""
    return y.is_floating_point()


def embedding_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 - cos(student, target): 0 when the directions agree (sentence embeddings are
    compared by cosine, so their length carries nothing)."""
    return 1.0 - F.cosine_similarity(student.float(), target.float(), dim=-1)


def relation_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the batch's pairwise cosine matrices (off the diagonal): how far
    the student's neighbourhood structure is from the targets', the thing top-k retrieval reads."""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    n = s.shape[0]
    if n < 2:
        return student.new_zeros(())
    diff = (s @ s.T - t @ t.T) ** 2
    return (diff.sum() - diff.diagonal().sum()) / (n * (n - 1))


# Names the history uses for its own columns; a hook term may not take them.
RESERVED_TERMS = frozenset({"step", "loss", "lr", "grad_norm", "ce", "cos", "rel", "kd"})


def loss_terms(state: StepState, distill: Optional[DistillConfig], hooks: Sequence[LossHook],
               global_batch: int, label_weight: float = 1.0,
               relation_weight: float = 0.0) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Named loss terms of one micro-batch and their weights in the loss.

    Each term is this rank's share of the global-batch mean (sum over the local slice / global
    batch size), so summing the shares over ranks gives exactly the single-process value.
    """
    share = len(state.y) / global_batch
    terms: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    alpha = distill.alpha if distill is not None else 0.0
    embedding = is_embedding_target(state.y)
    # A term with weight 0 is left out: its NaN must not stop a run it cannot affect.
    # Embedding targets: the "label" loss is 1 - cos to the target embedding (logged as "cos"),
    # and KD matches the teacher's embedding by cosine too (a softmax over embedding dims means nothing).
    if alpha < 1.0 and label_weight > 0:
        label_sum = embedding_loss(state.student_logits, state.y).sum() if embedding else \
            F.cross_entropy(state.student_logits, state.y, reduction="sum")
        name = "cos" if embedding else "ce"
        terms[name] = label_sum / global_batch
        weights[name] = (1.0 - alpha) * label_weight
    if embedding and relation_weight > 0:  # a local-batch term: each rank's share of the mean
        terms["rel"], weights["rel"] = relation_loss(state.student_logits, state.y) * share, relation_weight
    if distill is not None and alpha > 0.0:
        kd = embedding_loss(state.student_logits, state.teacher_logits) if embedding else \
            kd_loss(state.student_logits, state.teacher_logits, distill.temperature)
        terms["kd"], weights["kd"] = kd.sum() / global_batch, alpha
    for hook in hooks:
        for name, value in hook(state).items():
            if name in terms or name in RESERVED_TERMS:
                raise ValueError(f"loss hook term {name!r} clashes with an existing term or history column")
            terms[name], weights[name] = value * share, 1.0  # hooks return local means
    return terms, weights
