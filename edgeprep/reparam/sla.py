"""Simplified Linear Attention (SLAB, Guo et al., ICML 2024), built from an existing attention layer.

    Q = ReLU(X Wq),  K = ReLU(X Wk + P),  V = X Wv
    O_i = sum_j (Q_i . K_j) V_j / (Q_i . sum_j K_j + 1e-6)  +  DWConv(V)_i

``P`` is a learnable per-token term added to K (zeros at start). The sum is computed in fp32 in
the cheaper order: ``Q (K^T V)`` costs ~2 N d^2 multiply-adds per head, ``(Q K^T) V`` ~2 N^2 d, so
K^T V goes first when the token count N exceeds the head dim d: the cost is then linear in N.

DWConv: a depthwise conv on V, one set of ``head_dim`` filters shared by all heads. On an image's
token grid it is 2-D (5x5 by default, the paper's); tokens outside the grid (a ViT's class token)
get no conv term. For token sequences without a grid it is a 1-D depthwise conv over positions
(kernel 5), our choice: the same local-mixing role on the only neighbourhood a sequence has.
The conv starts at zero, so right after conversion the layer is pure linear attention on the
original Q/K/V/output weights and training decides how much local mixing to add.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6
Order = Literal["auto", "kv_first", "qk_first"]


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: Order = "auto") -> torch.Tensor:
    """sum_j (q_i . k_j) v_j / (q_i . sum_j k_j + EPS) over [..., N, d] tensors, in fp32."""
    dtype = v.dtype
    q, k, v = q.float(), k.float(), v.float()
    tokens, head_dim = k.shape[-2], k.shape[-1]
    kv_first = order == "kv_first" or (order == "auto" and tokens > head_dim)
    denom = q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)  # [..., N, 1]
    if kv_first:
        num = q @ (k.transpose(-2, -1) @ v)  # [..., d, d] first: O(N d^2)
    else:
        num = (q @ k.transpose(-2, -1)) @ v  # [..., N, N] first: O(N^2 d)
    return (num / (denom + EPS)).to(dtype)


class SimplifiedLinearAttention(nn.Module):
    """Drop-in for our ViT ``Attention`` (same ``qkv`` / ``proj`` names, so norm folding and
    pruning see the same Linears)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, tokens: int,
                 grid: Optional[tuple[int, int]] = None, prefix_tokens: int = 0, kernel_size: int = 5,
                 order: Order = "auto", bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim  # may differ from dim // heads after head pruning
        self.grid = tuple(grid) if grid is not None else None
        self.prefix_tokens = prefix_tokens
        self.order: Order = order
        if self.grid is not None and self.grid[0] * self.grid[1] + prefix_tokens != tokens:
            raise ValueError(f"grid {self.grid} plus {prefix_tokens} prefix tokens != {tokens} tokens")
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=bias)
        self.pos = nn.Parameter(torch.zeros(1, tokens, inner))  # P: added to X Wk before the ReLU
        conv = nn.Conv2d if self.grid is not None else nn.Conv1d
        self.dwc = conv(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        nn.init.zeros_(self.dwc.weight)
        nn.init.zeros_(self.dwc.bias)
        self.proj = nn.Linear(inner, dim, bias=bias)

    def config(self) -> dict:
        """Constructor arguments (a checkpoint decision rebuilds the layer from them)."""
        return {"dim": self.qkv.in_features, "num_heads": self.num_heads, "head_dim": self.head_dim,
                "tokens": self.pos.shape[1], "grid": list(self.grid) if self.grid else None,
                "prefix_tokens": self.prefix_tokens, "kernel_size": self.dwc.kernel_size[0],
                "bias": self.qkv.bias is not None}

    @classmethod
    def from_attention(cls, attn: nn.Module, tokens: int, grid: Optional[tuple[int, int]],
                       prefix_tokens: int, kernel_size: int = 5) -> "SimplifiedLinearAttention":
        """Copy Q/K/V and output weights from a ViT ``Attention`` (``qkv`` + ``proj`` Linears)."""
        inner = attn.num_heads * attn.head_dim
        if attn.qkv.out_features != 3 * inner or attn.proj.in_features != inner:
            raise ValueError(f"qkv / proj shapes do not match {attn.num_heads} heads x {attn.head_dim}")
        new = cls(attn.qkv.in_features, attn.num_heads, attn.head_dim, tokens, grid, prefix_tokens,
                  kernel_size, bias=attn.qkv.bias is not None)
        new.qkv.load_state_dict(attn.qkv.state_dict())
        new.proj.load_state_dict(attn.proj.state_dict())
        return new.to(attn.qkv.weight.device, attn.qkv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        inner = heads * head_dim
        q, k, v_tokens = self.qkv(x).split(inner, dim=-1)
        q = F.relu(q)
        k = F.relu(k + self.pos)
        q, k, v = (t.reshape(batch, tokens, heads, head_dim).transpose(1, 2) for t in (q, k, v_tokens))
        out = linear_attention(q, k, v, self.order).transpose(1, 2).reshape(batch, tokens, inner)
        return self.proj(out + self._local(v_tokens))

    def _local(self, v: torch.Tensor) -> torch.Tensor:
        """Depthwise conv of V ([B, N, heads * head_dim], token-major) over the token grid (or the
        sequence). The heads share one set of ``head_dim`` filters: the conv runs on all channels at
        once with the filters tiled per head (channel h * head_dim + j uses filter j), which keeps V
        in its token-major layout instead of folding heads into the batch."""
        batch, tokens, channels = v.shape
        p = self.prefix_tokens
        weight = self.dwc.weight.repeat(self.num_heads, *([1] * (self.dwc.weight.dim() - 1)))
        bias = self.dwc.bias.repeat(self.num_heads)
        body = v[:, p:].transpose(1, 2)  # [B, C, N - p]
        pad = self.dwc.padding
        if self.grid is not None:
            conv = F.conv2d(body.reshape(batch, channels, *self.grid), weight, bias, padding=pad,
                            groups=channels).flatten(2)
        else:
            conv = F.conv1d(body, weight, bias, padding=pad, groups=channels)
        return F.pad(conv.transpose(1, 2), (0, 0, p, 0))  # prefix tokens (class token): no conv term
