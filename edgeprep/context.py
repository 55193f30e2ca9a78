"""Context: everything a stage needs, passed explicitly (no global state)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # keep this module import-light
    import torch

    from edgeprep.data import DataBundle
    from edgeprep.recipe import TrainConfig


@dataclass
class StageReport:
    """What a stage changed and what it skipped (with reasons); lands in report.json."""

    kind: str
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def note(self, message: str) -> None:
        self.notes.append(message)


@dataclass
class Context:
    data: "DataBundle"
    train: "TrainConfig"  # the recipe's training defaults; stages resolve their overrides on it
    example_inputs: tuple["torch.Tensor", ...]  # a batch of >= 2 real inputs
    seed: int = 0
    report: StageReport = field(default_factory=lambda: StageReport(kind="?"))
    teacher: Optional["torch.nn.Module"] = None  # frozen eval-mode copy of the model before the stage
    run_dir: Optional[Path] = None
    stage_dir: Optional[Path] = None  # scratch space for the stage (e.g. last good weights)
    progress: bool = True  # show rich progress bars
    # Structural decisions applied so far (as data: kept indices, replaced module paths).
    # Structural stages append to it; checkpoints store it and loading replays it.
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def require_classification(self, stage: str, why: str, fix: str,
                               also: tuple[str, ...] = ()) -> None:
        """The built-in training stages train on class labels (and the tasks in ``also``, e.g.
        "embedding", whose targets train through the same loop); other tasks get one line with a fix."""
        if self.data.task != "classification" and self.data.task not in also:
            from edgeprep.errors import BadInputError

            raise BadInputError(f"stage {stage} {why}; the data is a {self.data.task!r} task; {fix}")
