"""Teacher Intervention (TI) for QAT: schedule, student/teacher wrapper, and the distillation losses.

``TeacherInterventionModel`` wraps the student for the shared train loop: in training mode each
forward first runs the full-precision teacher (no grad), recording its taps, then the student
with the teacher's tensor substituted at the scheduled point. The loss hook (``ti_loss``) reads
both models' records:
  soft CE on logits + sum of MSE on attention scores + sum of MSE on hidden states (the embedding
  output and every block output) + sum of MSE on attention outputs (the ``out`` tap),
all weighted 1 by default, no ground-truth loss (the caller may add one).

Schedule (``InterventionSchedule``): the first ``intervention_steps`` optimizer steps (step 1 of
the paper) intervene; the rest are plain KD-QAT. ``gradual`` (TI-G) uses TI-O for steps < s/6,
TI-C for steps < s/3 and TI-M for the rest of step 1, so the student first leans on the most
(attention output) and then on less and less of the teacher.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.quant.attention import MODES, Taps
from edgeprep.quant.convert import attach_taps, attention_sites
from edgeprep.train import StepState, logits_of

INTERVENTIONS = ("none", "m", "c", "o", "gradual")
LOSS_TERMS = ("logits", "scores", "hidden", "attn_out")
OUTPUT_LOSSES = ("soft_ce", "cosine")


@dataclass(frozen=True)
class InterventionSchedule:
    intervention: str = "none"
    intervention_steps: int = 0  # s

    def __post_init__(self) -> None:
        if self.intervention not in INTERVENTIONS:
            raise BadInputError(f"intervention {self.intervention!r} is not one of {', '.join(INTERVENTIONS)}")
        if self.intervention_steps < 0:
            raise BadInputError(f"intervention_steps must be >= 0, got {self.intervention_steps}")

    def mode(self, step: int) -> Optional[str]:
        """Intervention point for the 0-based optimizer step ``step``: 'm' | 'c' | 'o' | None."""
        s = self.intervention_steps
        if self.intervention == "none" or step >= s:
            return None
        if self.intervention != "gradual":
            return self.intervention
        if step < s / 6:
            return "o"
        if step < s / 3:
            return "c"
        return "m"


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean over samples of -sum softmax(teacher) * log_softmax(student) (temperature 1)."""
    return -(F.softmax(teacher_logits, dim=-1) * F.log_softmax(student_logits, dim=-1)).sum(-1).mean()


class TeacherInterventionModel(nn.Module):
    """The student as the train loop sees it. The teacher is held outside the module tree (it is
    not trained, not saved and not wrapped by DDP); both must have tapped attention layers."""

    def __init__(self, student: nn.Module, teacher: nn.Module, schedule: InterventionSchedule,
                 output_loss: str = "soft_ce"):
        super().__init__()
        if output_loss not in OUTPUT_LOSSES:
            raise BadInputError(f"output_loss {output_loss!r} is not one of {', '.join(OUTPUT_LOSSES)}")
        # "soft_ce" on classifier logits (the paper); "cosine" on sentence embeddings, whose dims
        # are not classes (a softmax over them would be a near-uniform, meaningless target)
        self.output_loss = output_loss
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule
        self.schedule = schedule
        self.step = 0  # optimizer steps done; advanced by ``on_step``
        self.student_taps, self.teacher_taps = Taps(), Taps(record=True)
        if len(attention_sites(student)) != len(attention_sites(teacher)):
            raise BadInputError("teacher and student have different numbers of attention layers")
        self._handles = attach_taps(student, self.student_taps) + attach_taps(teacher, self.teacher_taps)
        self._hidden: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
        self._handles += self._hook_hidden(student, "student") + self._hook_hidden(teacher, "teacher")
        self.teacher_logits: Optional[torch.Tensor] = None

    def _hook_hidden(self, model: nn.Module, who: str) -> list[Any]:
        """Record the input of the first block (the embeddings) and every block's output (training only)."""
        blocks = [model.get_submodule(s.block) for s in attention_sites(model)]

        def pre(module: nn.Module, args: Any, kwargs: Any) -> None:
            if self.training:
                self._hidden[who].append(args[0] if args else kwargs["hidden_states"])

        def post(module: nn.Module, args: Any, output: Any) -> None:
            if self.training:
                self._hidden[who].append(output[0] if isinstance(output, tuple) else output)
        return [blocks[0].register_forward_pre_hook(pre, with_kwargs=True)] + \
            [b.register_forward_hook(post) for b in blocks]

    def on_step(self, step: int, model: nn.Module) -> None:
        """step callback for the train loop: the next forward belongs to optimizer step ``step + 1``."""
        self.step = step + 1

    def current_mode(self) -> Optional[str]:
        return self.schedule.mode(self.step)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training:  # evaluation: the student alone, as it will be exported
            self.student_taps.record, self.student_taps.mode = False, None
            return self.student(*args, **kwargs)
        for records in (self.student_taps.records, self.teacher_taps.records):
            records.clear()
        self._hidden = {"student": [], "teacher": []}
        with torch.no_grad():
            self.teacher.eval()  # teacher taps record in eval mode (they always record)
            self.teacher_logits = logits_of(self.teacher(*args, **kwargs)).detach()
        mode = self.current_mode()
        self.student_taps.record, self.student_taps.mode = True, mode
        self.student_taps.teacher = self.teacher_taps.records if mode is not None else None
        return self.student(*args, **kwargs)

    def losses(self, student_logits: torch.Tensor,
               weights: Optional[Mapping[str, float]] = None) -> dict[str, torch.Tensor]:
        """The TI / KD-QAT distillation terms of the last training forward (already weighted)."""
        w = {k: 1.0 for k in LOSS_TERMS} | dict(weights or {})
        s_rec, t_rec = self.student_taps.records, self.teacher_taps.records
        zero = student_logits.new_zeros(())
        if self.output_loss == "cosine":
            out_term = (1.0 - F.cosine_similarity(student_logits, self.teacher_logits, dim=-1)).mean()
        else:
            out_term = soft_cross_entropy(student_logits, self.teacher_logits)
        terms = {"logits": out_term}
        terms["scores"] = sum((F.mse_loss(s_rec[k], t_rec[k]) for k in s_rec if k[1] == "scores"), zero)
        terms["attn_out"] = sum((F.mse_loss(s_rec[k], t_rec[k]) for k in s_rec if k[1] == "out"), zero)
        terms["hidden"] = sum((F.mse_loss(s, t) for s, t in zip(self._hidden["student"], self._hidden["teacher"])),
                              zero)
        return {f"ti_{k}": v * w[k] for k, v in terms.items() if w[k]}

    def close(self) -> None:
        """Remove the hooks and taps: the student goes back to being a plain (QAT) model."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for model in (self.student, self.teacher):
            for m in model.modules():
                if hasattr(m, "taps"):
                    m.taps = None


def ti_loss_hook(model: TeacherInterventionModel, weights: Optional[Mapping[str, float]] = None):
    """A train-loop LossHook returning the TI terms for each micro-batch."""

    def hook(state: StepState) -> dict[str, torch.Tensor]:
        return model.losses(state.student_logits, weights)
    return hook


__all__ = ["INTERVENTIONS", "InterventionSchedule", "MODES", "TeacherInterventionModel", "soft_cross_entropy",
           "ti_loss_hook"]
