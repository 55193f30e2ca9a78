"""A small Vision Transformer for classification, written for the compression tools that follow.

Choices that later stages rely on:
- attention uses one ``qkv`` Linear and an explicit ``softmax(q @ k^T * scale) @ v`` (no fused
  SDPA), and passes the probabilities through ``attn_probs`` (an ``nn.Identity``), so a forward
  hook on it sees every head's attention map;
- ``num_heads`` / ``head_dim`` are plain attributes that head pruning may rewrite, and the forward
  reads them (never a constructor-time constant) so a pruned module still runs;
- names follow timm (``patch_embed.proj``, ``blocks.i.attn.qkv``, ``mlp.fc1``, ``head``) so FQN
  targets in recipes read the same as for timm models.
"""
from __future__ import annotations

import torch
from torch import nn


def sincos_2d(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """[rows * cols, dim] 2-D sine-cosine position codes (MAE / "simple ViT" style)."""
    if dim % 4:
        raise ValueError(f"dim {dim} must be a multiple of 4 for 2-D sin-cos position embeddings")
    rows, cols = torch.meshgrid(torch.arange(grid_size[0], dtype=torch.float32),
                                torch.arange(grid_size[1], dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    r = rows.flatten()[:, None] * omega[None]
    c = cols.flatten()[:, None] * omega[None]
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one Conv2d (kernel = stride = patch size)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, tokens, dim]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_probs = nn.Identity()  # hook point: [B, heads, tokens, tokens] probabilities
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, tokens, head_dim]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_probs(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image_size: int | tuple[int, int] = 8, patch_size: int = 2, in_chans: int = 1,
                 num_classes: int = 10, dim: int = 64, depth: int = 3, heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if height % patch_size or width % patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by patch_size {patch_size}")
        self.input_shape = (in_chans, height, width)  # per sample; load_model reports it
        self.num_classes = num_classes
        self.grid_size = (height // patch_size, width // patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # ViT/timm initialisation: small truncated-normal weights train stably with AdamW at lr 3e-3.
        # Learned position embedding, started from fixed 2-D sin-cos values: the locality prior lets
        # a tiny ViT generalise from ~1k images (digits) where a random start overfits.
        with torch.no_grad():
            self.pos_embed[0, 1:] = sincos_2d(self.grid_size, self.pos_embed.shape[-1])
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
