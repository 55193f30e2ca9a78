"""Attention modules for QAT: int8 Q, K, V and probabilities, and taps for Teacher Intervention.

A *tap* is a named point inside attention where a tensor passes (``scores`` before softmax,
``probs`` after it, ``context`` = probs x V, ``out`` after the output projection, before the
residual and norm). ``Taps`` records what passes (the losses read it) and, under intervention,
hands back the teacher's same-layer tensor instead (TI-M: probs, TI-C: context, TI-O: out).
Teacher and student get the same modules (the teacher with no quantizers), so their taps have the
same keys ``(layer, point)``.

Under intervention the inputs of Q and K are detached, and V's too for TI-C / TI-O (as in the
paper): the replaced tensor cuts those paths from the output, and only the attention-score loss
trains Q and K, without pushing that loss into earlier layers.

Two families: our ViT's ``Attention`` (one qkv Linear) and Hugging Face BERT-style self-attention
(separate query / key / value Linears; the ``out`` tap sits on ``attention.output.dense`` as a
forward hook, because BertSelfOutput adds the residual and the LayerNorm right after it). The
Hugging Face ViT / DeiT self-attention is the same module with another call signature
(``hidden_states, head_mask``: no attention mask, every patch attends).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from edgeprep.binary.binarizers import ElasticBinarizer
from edgeprep.quant.fake import LsqQuantizer

MODES = ("m", "c", "o")  # TI-M (probs), TI-C (context), TI-O (attention output)
POINT_OF_MODE = {"m": "probs", "c": "context", "o": "out"}


@dataclass
class Taps:
    """Shared by all attention modules of one model; a plain object, never part of the state dict."""

    record: bool = False
    records: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    mode: Optional[str] = None  # one of MODES while intervening
    teacher: Optional[dict[tuple[int, str], torch.Tensor]] = None  # the teacher's records

    def __call__(self, layer: int, point: str, x: torch.Tensor, training: bool) -> torch.Tensor:
        if self.record:
            self.records[(layer, point)] = x
        if training and self.mode is not None and POINT_OF_MODE[self.mode] == point:
            if self.teacher is None or (layer, point) not in self.teacher:
                raise RuntimeError(f"intervention {self.mode!r}: no teacher tensor for layer {layer} {point}")
            return self.teacher[(layer, point)]
        return x

    def detach_v(self) -> bool:
        return self.mode in ("c", "o")


def _maybe(quantizer: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return quantizer(x) if quantizer is not None else x


class _TappedAttention(nn.Module):
    """Common parts: the four activation quantizers and the tap plumbing."""

    def __init__(self, layer: int, quantize: bool | str):
        super().__init__()
        self.layer = layer
        if quantize == "binary":  # BiPFT: signed elastic Q, K, V; unsigned {0, alpha} probabilities
            self.q_quant, self.k_quant, self.v_quant = (ElasticBinarizer(signed=True) for _ in range(3))
            self.p_quant = ElasticBinarizer(signed=False)
        else:
            make = (lambda: LsqQuantizer(8)) if quantize else (lambda: None)
            self.q_quant, self.k_quant, self.v_quant, self.p_quant = make(), make(), make(), make()
        self.estimators: Optional[nn.Module] = None  # binarize: ResidualEstimators of the binarization residual
        self.taps: Optional[Taps] = None

    def tap(self, point: str, x: torch.Tensor) -> torch.Tensor:
        """Record ``x`` if the taps record; under intervention (training only) return the teacher's."""
        return x if self.taps is None else self.taps(self.layer, point, x, self.training)

    def intervening(self) -> Optional[Taps]:
        return self.taps if self.training and self.taps is not None and self.taps.mode is not None else None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               mask: Optional[torch.Tensor] = None, after_probs: Optional[nn.Module] = None,
               head_mask: Optional[torch.Tensor] = None,
               x_est: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """softmax(Q K^T * scale + mask) V on [B, heads, T, d] tensors -> (context [B, heads, T, d], probs).

        With estimators, ``x_est`` (the un-binarized attention input) feeds them: their score terms
        join Q K^T before the scale, their value term joins the context through the probabilities.
        """
        q, k, v = _maybe(self.q_quant, q), _maybe(self.k_quant, k), _maybe(self.v_quant, v)
        raw = q @ k.transpose(-2, -1)
        if self.estimators is not None:
            raw = raw + self.estimators.scores(x_est)
        scores = self.tap("scores", raw * scale)
        if mask is not None:
            scores = scores + mask
        probs = _maybe(self.p_quant, scores.softmax(dim=-1))
        probs = self.tap("probs", probs)
        if after_probs is not None:  # BERT's attention dropout, or the ViT's attn_probs hook point
            probs = after_probs(probs)
        if head_mask is not None:
            probs = probs * head_mask
        context = probs @ v
        if self.estimators is not None:
            context = context + probs @ self.estimators.value(x_est)
        return context, probs


class QatViTAttention(_TappedAttention):
    """edgeprep.models.vit.Attention with quantizers and taps; keeps its qkv / proj / attn_probs."""

    def __init__(self, src: nn.Module, layer: int, quantize: bool | str):
        super().__init__(layer, quantize)
        self.num_heads, self.head_dim, self.scale = src.num_heads, src.head_dim, src.scale
        self.qkv, self.attn_probs, self.proj = src.qkv, src.attn_probs, src.proj

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, tokens, _ = qkv.shape
        return qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        taps = self.intervening()
        if taps is not None:  # one qkv Linear: run it on the detached input for Q, K (and V if it is cut too)
            q, k, v = self._split(self.qkv(x.detach()))
            if not taps.detach_v():
                _, _, v = self._split(self.qkv(x))
        else:
            q, k, v = self._split(self.qkv(x))
        context, _ = self.attend(q, k, v, self.scale, after_probs=self.attn_probs,
                                 x_est=x.detach() if taps is not None else x)
        context = context.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        context = self.tap("context", context)
        return self.tap("out", self.proj(context))


class QatBertSelfAttention(_TappedAttention):
    """A Hugging Face BertSelfAttention (eager or SDPA class) for encoders: no cache, no cross-attention,
    absolute positions. Returns (context, probs) as transformers' layer expects."""

    def __init__(self, src: nn.Module, layer: int, quantize: bool | str):
        super().__init__(layer, quantize)
        kind = getattr(src, "position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"QAT attention supports absolute position embeddings only, not {kind!r}")
        self.num_attention_heads = src.num_attention_heads
        self.attention_head_size = src.attention_head_size
        self.all_head_size = src.all_head_size
        self.query, self.key, self.value = src.query, src.key, src.value
        # BERT keeps its attention-probability dropout as a module; ViT / DeiT only as a probability
        self.dropout = src.dropout if isinstance(getattr(src, "dropout", None), nn.Module) \
            else nn.Dropout(float(getattr(src, "dropout_prob", 0.0)))
        self.is_decoder = getattr(src, "is_decoder", False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        return x.view(batch, -1, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                head_mask: Optional[torch.Tensor] = None, encoder_hidden_states: Optional[torch.Tensor] = None,
                *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is not None or kwargs.get("past_key_values") is not None \
                or kwargs.get("past_key_value") is not None:
            raise ValueError("QAT attention supports encoder self-attention only (no cross-attention, no cache)")
        taps = self.intervening()
        x_qk = hidden_states.detach() if taps is not None else hidden_states
        x_v = hidden_states.detach() if taps is not None and taps.detach_v() else hidden_states
        q, k, v = self._heads(self.query(x_qk)), self._heads(self.key(x_qk)), self._heads(self.value(x_v))
        if attention_mask is not None and attention_mask.dtype == torch.bool:  # SDPA-style boolean mask
            attention_mask = torch.zeros_like(attention_mask, dtype=q.dtype).masked_fill(
                ~attention_mask, torch.finfo(q.dtype).min)
        context, probs = self.attend(q, k, v, 1.0 / math.sqrt(self.attention_head_size), attention_mask,
                                     self.dropout, head_mask, x_est=x_qk)
        batch, tokens = context.shape[0], context.shape[2]
        context = context.permute(0, 2, 1, 3).reshape(batch, tokens, self.all_head_size)
        return self.tap("context", context), probs


class QatHFViTSelfAttention(QatBertSelfAttention):
    """A Hugging Face ViTSelfAttention / DeiTSelfAttention: called as (hidden_states, head_mask)."""

    def forward(self, hidden_states: torch.Tensor, head_mask: Optional[torch.Tensor] = None,
                *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(hidden_states, None, head_mask)


def bert_out_tap(attention: _TappedAttention):
    """Forward hook for ``attention.output.dense``: the ``out`` tap of a BERT-style layer."""

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return attention.tap("out", output)
    return hook
