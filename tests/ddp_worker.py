"""Worker for the DDP test: ``torchrun --nproc-per-node 2 tests/ddp_worker.py OUT``.

Each rank builds its student and teacher from a *different* seed (so the test also proves that
train() broadcasts rank 0's weights), trains through ``edgeprep.train.train`` and writes its final
weights to OUT/rank{r}.safetensors. ``build()`` is also imported by the test to run the same
training in a single process.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from edgeprep.recipe import DistillConfig, TrainConfig
from edgeprep.train import StepState, save_state_safetensors, train, world_info

NUM_CLASSES = 10
CFG = TrainConfig(steps=20, batch_size=32, lr=3e-3, warmup_steps=4, grad_accum_steps=2, grad_clip_norm=1.0)
DISTILL = DistillConfig(temperature=2.0, alpha=0.5)


def _model(init_seed: int) -> tuple[nn.Module, str]:
    torch.manual_seed(init_seed)
    try:  # the built-in zoo model; a small MLP stands in while the zoo is not there
        from edgeprep.models import ZOO

        return ZOO["vit-tiny-digits"].factory(), "vit-tiny-digits"
    except (ImportError, KeyError):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.LayerNorm(48), nn.GELU(),
                             nn.Linear(48, NUM_CLASSES)), "mlp"


def build(init_seed: int):
    """(student, teacher, split, model name): synthetic 8x8 'digits', same data on every rank."""
    from edgeprep.data import Split

    g = torch.Generator().manual_seed(1234)
    centers = torch.randn(NUM_CLASSES, 1, 8, 8, generator=g)
    y = torch.randint(0, NUM_CLASSES, (256,), generator=g)
    x = centers[y] + 0.5 * torch.randn(256, 1, 8, 8, generator=g)
    student, name = _model(init_seed)
    teacher, _ = _model(init_seed + 100)
    return student, teacher, Split(x=x, y=y), name


def logit_l2_hook(state: StepState) -> Mapping[str, torch.Tensor]:
    # An extra named term, so the DDP path of hook terms is exercised too.
    return {"logit_l2": 1e-3 * state.student_logits.pow(2).mean()}


def run(init_seed: int):
    student, teacher, split, name = build(init_seed)
    result = train(student, split, CFG, seed=7, teacher=teacher, distill=DISTILL,
                   loss_hooks=[logit_l2_hook], progress=False, description="ddp-test")
    return student, result, name


if __name__ == "__main__":
    out = Path(sys.argv[1])
    rank, world = world_info()
    student, result, name = run(init_seed=rank)  # rank 1 starts from other weights on purpose
    save_state_safetensors(student.state_dict(), out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.txt").write_text(f"{name} world={result.world_size} loss={result.final_loss}\n")
    torch.distributed.destroy_process_group()
