"""Modules the binarize stage puts into a model (BiPFT): binary Linear, binary embedding, and the
low-rank estimators of the binarization residual that attention adds back.

A ``BinaryLinear`` multiplies BWN weights (``sign(W - mean W) * mean|W|``, one scale per tensor)
with its input binarized as ``alpha * sign(x + b)`` (``activations: binary``, W1A1), fake-quantized
to int8 (W1A8) or left in float (W1A32). A ``BinaryEmbedding`` binarizes each row of its table
(one scale per row). ``ResidualEstimators`` are rank-r full-precision projections of the
*un-binarized* attention input, shared by the heads:

    S = [Q_b K_b^T + q_m(X) k_p(X)^T + q_p(X) k_m(X)^T + q_p(X) k_p(X)^T] / sqrt(d_h)
    C = A_b V_b + A_b v_p(X)

``q_p k_p^T`` estimates the residual-residual product, ``q_m k_p^T`` and ``q_p k_m^T`` the
binary-residual cross terms. ``v_p`` maps to one value per token, added to every channel of the
context through the binary probabilities (as the reference implementation does: a rank-1 term
broadcast over the head dim, whatever the score rank).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from edgeprep.binary.binarizers import ElasticBinarizer, LearnableBias, binarize_weight, bwn_parts
from edgeprep.errors import BadInputError
from edgeprep.quant.fake import LsqQuantizer

ACTIVATIONS = ("binary", "int8", "none")


class BinaryLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, activations: str = "binary"):
        if activations not in ACTIVATIONS:
            raise BadInputError(f"activations {activations!r} is not one of {', '.join(ACTIVATIONS)}")
        super().__init__(in_features, out_features, bias)
        self.activations = activations
        self.move: Optional[LearnableBias] = LearnableBias(in_features) if activations == "binary" else None
        self.act: Optional[nn.Module] = (ElasticBinarizer(signed=True) if activations == "binary"
                                         else LsqQuantizer(8) if activations == "int8" else None)
        self.exporting = False  # edgeprep.quant.export: DQ(binary codes) -> MatMul (-> INT2 MatMulNBits)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: str) -> "BinaryLinear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, activations)
        new.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        return new.train(linear.training)

    @property
    def w1a1(self) -> bool:
        return self.activations == "binary"

    @property
    def weight_bits(self) -> int:
        """Bits per weight of the n-bit pass (INT2, the smallest ONNX integer type holding -1 and
        +1); edgeprep.binary.packing then repacks them to 1 bit unless binary_storage is "int2"."""
        return 2

    @torch.no_grad()
    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8 [out, in] in {-1, +1}, scales float [out]): codes * scales[:, None] is the
        binarized weight the forward uses (one BWN scale per tensor, repeated per row)."""
        signs, scale = bwn_parts(self.weight.detach())
        return signs.to(torch.int8), scale.expand(self.out_features).clone().float().clamp_min(1e-12)

    def binary_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.move is not None:
            x = self.move(x)
        return self.act(x) if self.act is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exporting:
            return self._export_forward(x)
        return F.linear(self.binary_input(x), binarize_weight(self.weight), self.bias)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        from edgeprep.quant.linear import STORAGE_RANGE, _decomposed_ops

        qd = _decomposed_ops()
        # Buffers registered by edgeprep.quant.export.exporting(): codes int8 [in, out], scales [out].
        zeros = torch.zeros_like(self.qweight_scale, dtype=torch.int64)
        w = qd.dequantize_per_channel(self.qweight, self.qweight_scale, zeros, 1, *STORAGE_RANGE, torch.int8)
        y = torch.matmul(self.binary_input(x), w)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weights=binary, activations={self.activations}"


class BinaryEmbedding(nn.Embedding):
    """Rows binarized one by one (one scale per token's vector), as BiPFT does for word embeddings."""

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "BinaryEmbedding":
        new = cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx)
        new.to(device=emb.weight.device, dtype=emb.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(emb.weight)
        return new.train(emb.training)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, binarize_weight(self.weight, per_row=True), self.padding_idx)


class ResidualEstimators(nn.Module):
    """q_p, k_p, q_m, k_m: hidden -> rank; v_p: hidden -> 1; all full precision, shared by the heads.

    Zero-initialised output weights would make the estimators start silent; the paper starts them
    at random (their gradients then find the residual), and so do we (nn.Linear's default init).
    """

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"estimator rank must be >= 1, got {rank}")
        self.rank = rank
        self.q_p, self.k_p = nn.Linear(hidden, rank), nn.Linear(hidden, rank)
        self.q_m, self.k_m = nn.Linear(hidden, rank), nn.Linear(hidden, rank)
        self.v_p = nn.Linear(hidden, 1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, N, N]: the estimated residual terms of Q K^T (before the 1/sqrt(d) scale)."""
        qp, kp, qm, km = self.q_p(x), self.k_p(x), self.q_m(x), self.k_m(x)
        return (qm @ kp.transpose(-2, -1) + qp @ km.transpose(-2, -1) + qp @ kp.transpose(-2, -1)).unsqueeze(1)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, N, 1]: v_p(X), multiplied by the probabilities and broadcast over the head dim."""
        return self.v_p(x).unsqueeze(1)
