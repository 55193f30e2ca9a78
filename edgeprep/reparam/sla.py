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

import copy
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


class SLAInference(nn.Module):
    """The export form of a trained ``SimplifiedLinearAttention``: the same function (tests check it
    to fp32 rounding), laid out channel-first so a runtime makes no layout copies at all:

    - Q, K, V are computed as ``W @ x^T`` ([B, inner, N]); the transpose of x is absorbed by the
      MatMul (ORT: FusedMatMul with transB), and no Split copy is made;
    - K's bias and positional term are one [inner, N] constant added before the ReLU;
    - heads are views ([B, H, d, N]); the output comes out channel-first, the layout the depthwise
      conv on V wants, so V needs no transpose for the conv and the conv output none to be added;
    - sum_j K_j is a MatMul with a ones column (a ReduceSum over tokens is a slow strided reduction);
    - the output projection takes the channel-first output transposed (absorbed again, transA).
    The softmax layer it replaces makes four head transposes; ORT's profile of this one has none.
    """

    def __init__(self, sla: SimplifiedLinearAttention):
        super().__init__()
        heads, head_dim = sla.num_heads, sla.head_dim
        inner = heads * head_dim
        tokens = sla.pos.shape[1]
        self.num_heads, self.head_dim, self.grid = heads, head_dim, sla.grid
        self.prefix_tokens, self.order = sla.prefix_tokens, sla.order
        w = sla.qkv.weight.detach()
        b = sla.qkv.bias.detach() if sla.qkv.bias is not None else w.new_zeros(3 * inner)
        self.w_q, self.w_k, self.w_v = (nn.Parameter(w[i * inner:(i + 1) * inner].clone()) for i in range(3))
        self.b_q = nn.Parameter(b[:inner, None].clone())  # [inner, 1]: broadcast over tokens
        self.b_k = nn.Parameter((b[inner:2 * inner, None] + sla.pos.detach()[0].T).clone())  # [inner, N]
        self.b_v = nn.Parameter(b[2 * inner:, None].clone())
        # channel h * head_dim + j uses the shared filter j
        conv = nn.Conv2d if self.grid is not None else nn.Conv1d
        ks = sla.dwc.kernel_size[0]
        self.dwc = conv(inner, inner, ks, padding=ks // 2, groups=inner)
        with torch.no_grad():
            self.dwc.weight.copy_(sla.dwc.weight.detach().repeat(heads, *([1] * (sla.dwc.weight.dim() - 1))))
            self.dwc.bias.copy_(sla.dwc.bias.detach().repeat(heads))
        self.proj = copy.deepcopy(sla.proj)
        self.register_buffer("ones", w.new_ones(tokens, 1), persistent=False)
        self.to(w.device, w.dtype)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Channel-first Q, K (bias and positional term added, before the ReLUs) and V: [B, inner, N]."""
        x_t = x.transpose(1, 2)  # [B, dim, N]; the MatMuls read it transposed, no copy
        return self.w_q @ x_t + self.b_q, self.w_k @ x_t + self.b_k, self.w_v @ x_t + self.b_v

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Token mixing from the channel-first projections: SLA + DWConv(V), channel-first [B, inner, N]."""
        batch, inner, tokens = v.shape
        heads, head_dim = self.num_heads, self.head_dim
        q = F.relu(q).float().reshape(batch, heads, head_dim, tokens)
        k = F.relu(k).float()
        k_sum = (k @ self.ones.float()).reshape(batch, heads, 1, head_dim)
        k, v_h = k.reshape(batch, heads, head_dim, tokens), v.float().reshape(batch, heads, head_dim, tokens)
        denom = k_sum @ q  # [B, H, 1, N]
        kv_first = self.order == "kv_first" or (self.order == "auto" and tokens > head_dim)
        # O^T = V^T (K Q^T) = (V^T K) Q^T: the [d, d] product first is O(N d^2)
        num = (v_h @ k.transpose(-2, -1)) @ q if kv_first else v_h @ (k.transpose(-2, -1) @ q)
        out = (num / (denom + EPS)).to(v.dtype).reshape(batch, inner, tokens)
        return out + self._local(v)

    def _local(self, v: torch.Tensor) -> torch.Tensor:
        """DWConv of channel-first V [B, inner, N]; prefix tokens get no conv term."""
        p = self.prefix_tokens
        body = v[:, :, p:] if p else v
        if self.grid is not None:
            conv = self.dwc(body.reshape(*body.shape[:2], *self.grid)).flatten(2)
        else:
            conv = self.dwc(body)
        return F.pad(conv, (p, 0)) if p else conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mix(*self.project(x))  # [B, inner, N]
        return out.transpose(1, 2) @ self.proj.weight.T + self.proj.bias if self.proj.bias is not None \
            else out.transpose(1, 2) @ self.proj.weight.T
