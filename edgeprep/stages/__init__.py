"""Stage registry: recipe ``kind`` -> stage class. One technique per module."""
from __future__ import annotations

from typing import Any, Protocol

import torch

from edgeprep.context import Context
from edgeprep.errors import BadInputError
from edgeprep.stages.binarize import BinarizeStage
from edgeprep.stages.finetune import FinetuneStage
from edgeprep.stages.prune import PruneStage
from edgeprep.stages.qat import QatStage
from edgeprep.stages.reparam import ReparamStage


class Stage(Protocol):
    def __init__(self, config: Any) -> None: ...

    def apply(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module: ...


STAGES: dict[str, type] = {"finetune": FinetuneStage, "prune": PruneStage, "reparam": ReparamStage, "qat": QatStage,
                         "binarize": BinarizeStage}


def get_stage(config: Any) -> Stage:
    """Instantiate the stage for ``config.kind``; an unknown kind lists the valid ones."""
    kind = getattr(config, "kind", None)
    if kind not in STAGES:
        raise BadInputError(f"unknown stage kind {kind!r}; valid kinds: {', '.join(sorted(STAGES))}")
    return STAGES[kind](config)
