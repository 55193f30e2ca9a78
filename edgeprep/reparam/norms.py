"""RepBN and PRepBN (SLAB, Guo et al., ICML 2024): LayerNorm replaced by a BatchNorm that folds away.

- ``RepBN(x) = BN(x) + alpha * x``: BatchNorm over channels with every token a batch row, plus a
  learnable scalar skip ``alpha`` (1 at start). In eval mode it is a per-channel affine
  ``a * x + b`` (``RepBN.affine()``) that folds into the neighbouring Linear / Conv.
- ``PRepBN(x) = lam * LN(x) + (1 - lam) * RepBN(x)``: ``lam`` is 1 for ``warmup_steps`` optimizer
  steps, falls linearly to 0 over ``decay_steps``, then stays 0.

Differences from the reference code, on purpose:
- ``lam`` follows *optimizer steps* (``advance()`` is called once per step by the stage), not
  forward calls: gradient accumulation, evaluation passes and DDP do not move the schedule. The
  step count is a buffer, so it is in the state dict: a saved model resumes where it stopped.
- eval mode uses the same mixture as training (the reference returns RepBN alone in eval), so an
  evaluation during the decay measures the model that is really being trained.
- token masks: when a model sets ``token_mask`` (HF BERT: the attention mask), the batch
  statistics skip padding tokens, which would otherwise pull the mean and variance towards the
  embedding of [PAD] (the paper's LLaMA variant excludes them too).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class MaskedBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the last dim of [..., C] inputs; train-mode statistics over the rows that
    ``token_mask`` (bool, the input's leading shape) keeps, or over all rows when it is None.

    Same parameters and buffers as ``nn.BatchNorm1d`` (weight, bias, running_mean, running_var,
    num_batches_tracked), so the folding code and state dicts read like plain BatchNorm.
    """

    token_mask: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if not self.training:
            return F.batch_norm(flat, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps).reshape(x.shape)
        rows = flat if self.token_mask is None else flat[self.token_mask.reshape(-1).to(torch.bool)]
        if rows.shape[0] < 2:
            raise ValueError(f"BatchNorm needs at least 2 tokens per batch in training, got {rows.shape[0]}")
        mean = rows.mean(0)
        var = rows.var(0, unbiased=False)
        with torch.no_grad():  # running statistics as nn.BatchNorm1d keeps them (unbiased variance)
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            n = rows.shape[0]
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), momentum)
        out = (flat - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.reshape(x.shape)


class RepBN(nn.Module):
    """BN(x) + alpha * x over the channel (last) dim; ``learn_alpha=False, alpha=0`` is plain BN."""

    def __init__(self, channels: int, alpha: float = 1.0, learn_alpha: bool = True, eps: float = 1e-5):
        super().__init__()
        self.bn = MaskedBatchNorm(channels, eps=eps)
        if learn_alpha:
            self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        else:
            self.register_buffer("alpha", torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) + self.alpha * x

    @torch.no_grad()
    def affine(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with eval-mode RepBN(x) == a * x + b, per channel, computed in ``dtype`` (folding
        uses float64 so the folded weights carry a single rounding)."""
        bn = self.bn
        inv_std = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
        gamma = bn.weight.to(dtype) if bn.affine else torch.ones_like(inv_std)
        beta = bn.bias.to(dtype) if bn.affine else torch.zeros_like(inv_std)
        a = gamma * inv_std + self.alpha.to(dtype)
        b = beta - gamma * bn.running_mean.to(dtype) * inv_std
        return a, b


def lam_at(steps_done: int, warmup_steps: int, decay_steps: int) -> float:
    """The LayerNorm share after ``steps_done`` optimizer steps: 1, then linear to 0, then 0."""
    if steps_done < warmup_steps:
        return 1.0
    if decay_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - (steps_done - warmup_steps) / decay_steps)


class PRepBN(nn.Module):
    """lam * LN(x) + (1 - lam) * RepBN(x), lam following optimizer steps (see the module docstring).

    ``ln`` is the model's original LayerNorm (weights kept), so at lam = 1 the model is unchanged.
    """

    def __init__(self, ln: nn.LayerNorm | None, channels: int, warmup_steps: int, decay_steps: int,
                 alpha: float = 1.0, learn_alpha: bool = True):
        super().__init__()
        if warmup_steps < 0 or decay_steps < 0:
            raise ValueError(f"warmup_steps {warmup_steps} and decay_steps {decay_steps} must be >= 0")
        self.ln = ln
        self.repbn = RepBN(channels, alpha=alpha, learn_alpha=learn_alpha, eps=ln.eps if ln is not None else 1e-5)
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = int(decay_steps)
        # Optimizer steps taken under this schedule; a buffer so it is saved and restored.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))
        # FQNs (from the model's root) of the Linears this norm's output feeds alone; folding
        # scales their input columns. Empty: the norm folds to a ChannelAffine. Set by the surgery.
        self.consumers: list[str] = []

    @property
    def lam(self) -> float:
        if self.ln is None:
            return 0.0
        return lam_at(int(self.steps_done), self.warmup_steps, self.decay_steps)

    def advance(self, steps: int = 1) -> None:
        self.steps_done.add_(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.lam
        # BN always runs (in training its running statistics keep up during warmup, ready for when lam falls).
        out = self.repbn(x)
        if lam > 0.0:  # at lam = 1 the BN term is 0 * out: its params stay in the graph, as DDP wants
            return lam * self.ln(x) + (1.0 - lam) * out
        return out

    def extra_repr(self) -> str:
        return f"warmup_steps={self.warmup_steps}, decay_steps={self.decay_steps}, lam={self.lam:.4g}"


class ChannelAffine(nn.Module):
    """a * x + b over the last dim: what a folded norm leaves when no Linear consumes it alone
    (e.g. a post-LN BERT norm, whose output also feeds the residual stream). Mul + Add in ONNX."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.scale = nn.Parameter(scale.detach().clone())
        self.shift = nn.Parameter(shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def advance_all(model: nn.Module, steps: int = 1) -> None:
    """Move every PRepBN schedule of ``model`` by ``steps`` optimizer steps (a train() step callback)."""
    for m in model.modules():
        if isinstance(m, PRepBN):
            m.advance(steps)


def set_token_mask(model: nn.Module, mask: Optional[torch.Tensor]) -> None:
    for m in model.modules():
        if isinstance(m, MaskedBatchNorm):
            m.token_mask = mask
