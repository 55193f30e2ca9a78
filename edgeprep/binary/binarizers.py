"""BiPFT's binarizers (Xing et al., AAAI 2024) with their straight-through estimators.

- weights (BWN): ``W_b = sign(W - mean W) * mean|W|`` per tensor (per row for embeddings);
  identity straight-through gradient;
- Linear inputs, Q, K, V (elastic, signed): ``x_b = alpha * sign(x + b)``, ``b`` a learnable
  per-channel bias (a separate ``LearnableBias`` in front), ``alpha`` a learnable scale started at
  ``2 * mean|x|``; gradient passes only where ``|x / alpha| <= 1``; ``d alpha = sum(sign(x) g) /
  sqrt(numel)`` (LSQ's step-size gradient for one bit);
- attention probabilities (unsigned): ``p_b = alpha * clamp(round(p / alpha), 0, 1)``, ``alpha``
  started at ``4 * mean|p|``; gradient passes where ``0 <= p / alpha <= 1``; ``d alpha`` as LSQ:
  ``round(q) - q`` inside, 1 above, 0 below, times ``1 / sqrt(numel)``.

``sign`` here is +1 for ``x >= 0`` (``torch.sign`` gives 0 at 0, a third value that a bit-packed
weight or a 1-bit activation cannot hold); the exported graph uses the same rule.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where x >= 0, -1 elsewhere (never 0)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def bwn_parts(w: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs in {-1, +1}, scale): per tensor (a 0-d scale) or per row ([rows, 1])."""
    if per_row:
        centred = w - w.mean(dim=1, keepdim=True)
        scale = w.abs().mean(dim=1, keepdim=True)
    else:
        centred = w - w.mean()
        scale = w.abs().mean()
    return binary_sign(centred), scale


class _BwnSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, per_row: bool) -> torch.Tensor:
        signs, scale = bwn_parts(w, per_row)
        return signs * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None  # identity straight-through


def binarize_weight(w: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    return _BwnSTE.apply(w, per_row)


class _ElasticSigned(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, alpha)
        return binary_sign(x) * alpha

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, alpha = ctx.saved_tensors
        inside = ((x / alpha).abs() <= 1).to(grad.dtype)
        grad_alpha = (binary_sign(x) * grad).sum() / math.sqrt(x.numel())
        return grad * inside, grad_alpha.reshape(alpha.shape)


class _ElasticUnsigned(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(p, alpha)
        return torch.clamp(torch.round(p / alpha), 0, 1) * alpha

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, alpha = ctx.saved_tensors
        q = p / alpha
        below, above = q < 0, q > 1
        inside = ~(below | above)
        step = torch.where(inside, torch.round(q) - q, above.to(q.dtype))
        grad_alpha = (step * grad).sum() / math.sqrt(p.numel())
        return grad * inside.to(grad.dtype), grad_alpha.reshape(alpha.shape)


class ElasticBinarizer(nn.Module):
    """A learned-scale 1-bit activation: signed (``alpha * sign(x)``) or unsigned
    (``alpha * {0, 1}``). The scale starts from the first batch it sees in training or
    calibration (2 * mean|x| signed, 4 * mean|x| unsigned), as the paper initialises it."""

    def __init__(self, signed: bool = True):
        super().__init__()
        self.signed = signed
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        self.alpha.copy_(((2.0 if self.signed else 4.0) * x.abs().mean()).clamp_min(1e-5))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            # Inference (and export): the same numbers as plain ops, no autograd.Function in the graph,
            # and no read of the ``initialized`` buffer (torch.export cannot branch on a tensor). An
            # eval-mode forward before any training / calibration forward uses alpha's start value 1.
            alpha = self.alpha.detach().clamp_min(1e-5)
            if self.signed:
                return torch.where(x >= 0, alpha, -alpha)
            return torch.clamp(torch.round(x / alpha), 0, 1) * alpha
        if not bool(self.initialized):
            self.init_from(x)
        alpha = self.alpha.clamp_min(1e-5)
        return (_ElasticSigned if self.signed else _ElasticUnsigned).apply(x, alpha)

    def extra_repr(self) -> str:
        return f"signed={self.signed}, alpha={float(self.alpha):.4g}"


class LearnableBias(nn.Module):
    """x + b, b per channel (last dim), zeros at start: moves the sign threshold of a binarizer."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias
