"""int8 word embeddings: one scale per row (per token), fake-quantized in training, int8 in the artifact.

A sentence encoder's word-embedding table is most of its bytes (all-MiniLM-L6-v2: 30522 x 384
fp32 = 46.9 MB of a 58 MB int8 artifact) and none of its MACs: a lookup reads one row per token.
Storing it as int8 codes with a float scale per row cuts it 4x; per row, because rows differ in
range (rare tokens have small vectors) and a lookup only ever needs its own row's scale.

- training / eval: ``F.embedding(ids, fake_quant(weight, per-row scale))``, straight-through
  gradients, so QAT trains against exactly the numbers the artifact will hold;
- export (``edgeprep.quant.export.exporting``): codes int8 [V, D] and scales float [V] as buffers,
  written as Gather(codes) -> Cast -> Mul(Gather(scales)): ORT gathers 1 byte per element and the
  multiply touches only the looked-up rows. The values equal the fake-quantized rows exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeprep.quant.fake import fake_quant, int_range, weight_scale

EMBEDDING_BITS = 8


class QuantEmbedding(nn.Embedding):
    """nn.Embedding with per-row int8 weights (symmetric, max|row| -> 127, round half to even)."""

    exporting = False

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "QuantEmbedding":
        if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
            raise ValueError("int8 embeddings support plain lookups only (no max_norm, scale_grad_by_freq, sparse)")
        new = cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx)
        new.to(device=emb.weight.device, dtype=emb.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(emb.weight)
        return new.train(emb.training)

    def _scale(self) -> torch.Tensor:
        return weight_scale(self.weight, EMBEDDING_BITS, axis=0)  # [V, 1]

    def quantized_weight(self) -> torch.Tensor:
        qmin, qmax = int_range(EMBEDDING_BITS)
        return fake_quant(self.weight, self._scale(), qmin, qmax)

    @torch.no_grad()
    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8 [V, D], scales float [V]) with ``codes * scales[:, None] == quantized_weight()``."""
        qmin, qmax = int_range(EMBEDDING_BITS)
        scale = self._scale()
        codes = torch.clamp(torch.round(self.weight.detach() / scale), qmin, qmax)
        return codes.to(torch.int8), scale.flatten().to(torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.exporting:
            # buffers registered by edgeprep.quant.export.exporting(): Gather on int8 + per-row scale
            rows = F.embedding(ids, self.qembedding).to(torch.float32)
            return rows * F.embedding(ids, self.qembedding_scale.unsqueeze(1))
        return F.embedding(ids, self.quantized_weight(), self.padding_idx)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weights=int8 per row"
