"""Running one stage: the registered kind's stage class (``edgeprep.registry``), after checking the
order rules against what the model already went through. ``edgeprep run`` and the single-stage
commands both come through ``run_stage``."""
from __future__ import annotations

from typing import Any, Protocol

import torch

from edgeprep.context import Context
from edgeprep.registry import check_history, stage_spec


class Stage(Protocol):
    def __init__(self, config: Any) -> None: ...

    def apply(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module: ...


def get_stage(config: Any) -> Stage:
    """Instantiate the stage for ``config.kind``; an unknown kind lists the valid ones."""
    return stage_spec(getattr(config, "kind", None)).stage(config)


def run_stage(config: Any, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    """``config``'s stage applied to ``model`` (eval mode on return)."""
    stage = get_stage(config)
    check_history(config.kind, ctx.decisions)
    return stage.apply(model, ctx).eval()
