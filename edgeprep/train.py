"""The one training / distillation loop every training stage uses.

``train()`` fine-tunes a classifier with cross-entropy, optionally distils logits from a teacher
(KD with temperature), and lets later stages add named loss terms through ``loss_hooks`` (feature
distillation, QAT teacher intervention, ...). AdamW, linear warmup then cosine decay, gradient
accumulation and clipping, progress on stderr (``edgeprep.progress``: a bar on a terminal,
periodic lines in logs), bit-exact determinism for a given seed, NaN/inf detection that restores
the last good weights, and DDP (gloo, CPU) under ``torchrun``. The loss terms live in
``edgeprep.losses``.

Batch order: indices are drawn from a stream of seeded permutations and cut into *global*
micro-batches of ``batch_size``. The stream is the same for any ``grad_accum_steps`` and any world
size: under DDP each rank takes its contiguous slice of the same global micro-batch, so 2 processes
see exactly the samples one process would.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from edgeprep.errors import BadInputError, TrainingDivergedError
from edgeprep.fsutil import write_bytes_atomic
from edgeprep.losses import LossHook, StepState, embedding_loss, is_embedding_target, kd_loss, loss_terms, relation_loss  # noqa: F401  (re-exported: stages, hooks and tests import them from here)
from edgeprep.progress import training_progress
from edgeprep.recipe import DistillConfig, TrainConfig

# Models whose state fits in this many bytes get an in-memory copy after every good step (the copy
# costs less than a forward pass); bigger ones only every `checkpoint_every` (or this many) steps.
SMALL_STATE_BYTES = 64 * 2**20
LARGE_STATE_SNAPSHOT_EVERY_STEPS = 50

# Parameters that must not be pulled towards zero by weight decay even though they are not 1-D:
# ViT class/distillation tokens and position embeddings (their scale carries meaning).
_NO_DECAY_NAME = re.compile(r"(^|\.)(cls_token|class_token|dist_token|pos_embed\w*|pos_emb\w*|"
                            r"position_embedding\w*)(\.|$)")


# ----------------------------------------------------------------------------- distributed
def _env_world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() else 1


def world_info() -> tuple[int, int]:
    """(rank, world_size); also correct under torchrun before the process group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if _env_world_size() > 1:
        return int(os.environ.get("RANK", "0")), _env_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Only rank 0 writes files and shows progress."""
    return world_info()[0] == 0


def init_distributed() -> bool:
    """Join torchrun's process group (gloo: CPU) if needed; True when training runs on > 1 process."""
    if not dist.is_available():
        return False
    if not dist.is_initialized():
        if _env_world_size() <= 1:
            return False
        dist.init_process_group(backend="gloo")  # env:// rendezvous from torchrun's variables
    return dist.get_world_size() > 1


# ----------------------------------------------------------------------------- public types
@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    # One entry per optimizer step: step (1-based count), loss, lr, grad_norm, each term ("ce",
    # "kd", hook names) and, when an eval ran at that step, the eval_fn's metrics.
    history: list[dict[str, float]] = field(default_factory=list)
    world_size: int = 1


# ----------------------------------------------------------------------------- building blocks
def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of the 0-based optimizer step ``step``.

    Warmup: ``peak * (step + 1) / warmup`` for ``step < warmup`` (the first step already learns
    and step ``warmup - 1`` reaches the peak). Then cosine:
    ``peak * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))``: the peak at
    ``step == warmup`` and 0 at ``step == total`` (one past the last step, so the last step still
    moves the weights).
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, an object with ``.logits`` (HF), or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise BadInputError(f"the model returned {type(output).__name__}; training needs logits "
                        "(a tensor, a tuple starting with one, or an object with .logits)")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norm weights (all 1-D params) and cls/pos embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or _NO_DECAY_NAME.search(name) else decay).append(p)
    if not decay and not no_decay:
        raise BadInputError("the model has no trainable parameters (all have requires_grad=False)")
    groups = [{"params": ps, "weight_decay": wd}
              for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if ps]
    return torch.optim.AdamW(groups, lr=cfg.lr)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, split: Any, batch_size: int = 256) -> float:
    """The task metric on ``split`` (x, y) in eval mode: top-1 accuracy for class labels, mean
    cosine to the targets for embeddings. Restores the model's train/eval mode."""
    n = len(split.y)
    if n == 0:
        raise BadInputError("cannot measure accuracy on an empty split")
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, n, batch_size):
            logits = logits_of(model(split.x[start:start + batch_size]))
            y = split.y[start:start + batch_size]
            if is_embedding_target(y):
                total += float((1.0 - embedding_loss(logits, y)).sum())
            else:
                total += int((logits.argmax(-1) == y).sum())
    finally:
        model.train(was_training)
    return total / n


def save_state_safetensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save

    # Separate contiguous copies: safetensors refuses shared or strided storage (tied weights).
    tensors = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    write_bytes_atomic(Path(path), save(tensors))


class _BatchOrder:
    """Seeded stream of permutations of range(n), cut into consecutive chunks of any size."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.buffer = torch.empty(0, dtype=torch.long)

    def take(self, k: int) -> torch.Tensor:
        while self.buffer.numel() < k:
            self.buffer = torch.cat([self.buffer, torch.randperm(self.n, generator=self.gen)])
        out, self.buffer = self.buffer[:k], self.buffer[k:]
        return out


class _LastGood:
    """In-memory copy of the last weights whose forward and backward were finite."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, path: Optional[Path], write: bool):
        self.model, self.path, self.write = model, path, write
        state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        big = state_bytes > SMALL_STATE_BYTES
        self.every = (cfg.checkpoint_every or LARGE_STATE_SNAPSHOT_EVERY_STEPS) if big else 1
        self.save_every = cfg.checkpoint_every  # 0: only written when training diverges
        self.take(steps_done=0)

    def take(self, steps_done: int) -> None:
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.steps_done = steps_done

    def maybe_take(self, steps_done: int) -> None:
        if steps_done % self.every == 0:
            self.take(steps_done)
        if self.path and self.write and self.save_every and steps_done % self.save_every == 0:
            save_state_safetensors(self.state, self.path)

    def restore(self) -> str:
        self.model.load_state_dict(self.state)
        if self.path and self.write:
            save_state_safetensors(self.state, self.path)
            return f", saved to {self.path}"
        return ""


# ----------------------------------------------------------------------------- the loop
def train(model: nn.Module, split: Any, cfg: TrainConfig, *, seed: int = 0,
          teacher: Optional[nn.Module] = None, distill: Optional[DistillConfig] = None,
          loss_hooks: Sequence[LossHook] = (),
          step_callbacks: Sequence[Callable[[int, nn.Module], None]] = (),
          eval_fn: Optional[Callable[[nn.Module], Mapping[str, float]]] = None,
          progress: bool = True, description: str = "train",
          last_good_path: Optional[Path] = None,
          lr_fn: Optional[Callable[[int], float]] = None, label_weight: float = 1.0) -> TrainResult:
    """Train ``model`` in place on ``split`` (x float [N, ...], y int64 [N]) and return what happened.

    ``distill`` mixes ``alpha * KD + (1 - alpha) * CE`` against ``teacher`` (run in eval mode under
    no_grad). ``step_callbacks`` run after each optimizer step with (0-based step, model);
    ``eval_fn`` runs every ``cfg.eval_every`` steps (eval mode, no_grad) and lands in the history.
    ``lr_fn(step)`` replaces the warmup + cosine schedule (a stage spanning several calls uses it).
    ``label_weight`` scales the ground-truth cross-entropy (0 leaves it out: pure distillation
    through ``loss_hooks``, as QAT with Teacher Intervention trains).
    ``progress`` shows step and loss on stderr, labelled ``description`` (rank 0 only; a bar on a
    terminal, a line every ``EDGEPREP_PROGRESS_INTERVAL_S`` otherwise: ``edgeprep.progress``).
    Raises TrainingDivergedError, with the last good weights restored into ``model`` (and written
    to ``last_good_path`` by rank 0), when a loss term or the gradient norm is not finite.
    """
    if distill is not None and teacher is None:
        raise BadInputError(f"{description}: distillation needs a teacher model; none was given")
    n = len(split.y)
    if n == 0:
        raise BadInputError(f"{description}: the training split is empty")
    distributed = init_distributed()
    rank, world = world_info() if distributed else (0, 1)
    if cfg.batch_size < world:
        raise BadInputError(f"{description}: batch_size {cfg.batch_size} is smaller than the "
                            f"{world} processes; each process needs at least one sample")
    was_training = model.training
    model.train()
    optimizer = make_optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    net: nn.Module = model
    if teacher is not None:
        teacher.eval()  # dropout off, BatchNorm running stats frozen; run under no_grad below
    if distributed:
        # DDP's constructor broadcasts rank 0's parameters and buffers, so every rank starts equal.
        net = nn.parallel.DistributedDataParallel(model)
        if teacher is not None:
            with torch.no_grad():
                for t in teacher.state_dict().values():
                    dist.broadcast(t, src=0)
    last_good = _LastGood(model, cfg, last_good_path, write=rank == 0)
    order = _BatchOrder(n, seed)
    device = trainable[0].device
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    try:
        # Seeds dropout & co. without leaking into the caller's global RNG state.
        with torch.random.fork_rng(devices=[]), \
                training_progress(description, cfg.steps, enabled=progress and rank == 0) as show_progress:
            torch.manual_seed(seed + rank)
            for step in range(cfg.steps):
                lr = lr_fn(step) if lr_fn is not None else lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                logged: dict[str, float] = {}
                for micro_step in range(cfg.grad_accum_steps):
                    global_idx = order.take(cfg.batch_size)
                    local_idx = global_idx[rank * cfg.batch_size // world:(rank + 1) * cfg.batch_size // world]
                    x, y = split.x[local_idx], split.y[local_idx].to(device)
                    x = (split.trim(x) if getattr(split, "trim", None) is not None else x).to(device)
                    # Gradients are all-reduced only on the last micro-batch of an optimizer step.
                    last_micro = micro_step == cfg.grad_accum_steps - 1
                    sync = contextlib.nullcontext() if not distributed or last_micro else net.no_sync()
                    with sync:
                        out = logits_of(net(x))
                        teacher_out = None
                        if teacher is not None:
                            with torch.no_grad():
                                teacher_out = logits_of(teacher(x))
                        state = StepState(step, cfg.steps, micro_step, lr, x, y, out, teacher_out, model, teacher)
                        terms, weights = loss_terms(state, distill, loss_hooks, cfg.batch_size, label_weight,
                                                    cfg.relation_weight)
                        loss = sum(weights[k] * v for k, v in terms.items())
                        values = torch.stack([v.detach() for v in terms.values()] + [loss.detach()])
                        if distributed:  # global means for logging; also makes the NaN check agree on all ranks
                            dist.all_reduce(values)
                        names = [*terms, "loss"]
                        for name, value in zip(names, values.tolist()):
                            if not math.isfinite(value):
                                _diverge(description, step, cfg, lr, f"loss term '{name}' is {value}", last_good)
                            logged[name] = logged.get(name, 0.0) + value / cfg.grad_accum_steps
                        # DDP averages gradients over ranks; `world` turns that average back into the sum of shares.
                        (loss * (world / cfg.grad_accum_steps)).backward()
                grads = [p.grad for p in trainable if p.grad is not None]
                if cfg.grad_clip_norm:  # 0 / None: clipping off
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip_norm))
                else:
                    grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
                if not math.isfinite(grad_norm):
                    _diverge(description, step, cfg, lr, f"the gradient norm is {grad_norm}", last_good)
                # The weights this step started from gave a finite loss and gradient: keep them.
                if step > 0:
                    last_good.maybe_take(steps_done=step)
                optimizer.step()
                for callback in step_callbacks:
                    callback(step, model)
                entry = {"step": step + 1, "loss": logged["loss"], "lr": lr, "grad_norm": grad_norm}
                entry.update((k, v) for k, v in logged.items() if k != "loss")
                if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                    entry.update(_evaluate(model, eval_fn))
                history.append(entry)
                show_progress(step + 1, entry["loss"])
    finally:
        model.train(was_training)
    return TrainResult(steps=cfg.steps, seconds=time.perf_counter() - start,
                       final_loss=history[-1]["loss"], history=history, world_size=world)


def _evaluate(model: nn.Module, eval_fn: Callable[[nn.Module], Mapping[str, float]]) -> dict[str, float]:
    model.eval()
    try:
        with torch.no_grad():
            return {k: float(v) for k, v in eval_fn(model).items()}
    finally:
        model.train()


def _diverge(description: str, step: int, cfg: TrainConfig, lr: float, what: str, last_good: _LastGood) -> None:
    saved = last_good.restore()
    fix = f"lower lr (e.g. lr: {cfg.lr / 10:.3g})"
    # Clipping bounds the gradient, but Adam's step is ~lr whatever the gradient: once clipping is
    # on, a longer warmup is the other lever.
    fix += " or enable grad clipping (grad_clip_norm: 1.0)" if not cfg.grad_clip_norm \
        else f" or warm up longer (warmup_steps: {max(2 * cfg.warmup_steps, 10)})"
    done = last_good.steps_done
    raise TrainingDivergedError(
        f"{description} diverged at step {step + 1}/{cfg.steps}: {what} (lr {lr:.3g}); restored the last "
        f"good weights (after {done} step{'s' if done != 1 else ''}){saved}; fix: {fix}")
