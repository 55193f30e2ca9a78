"""Operation and memory accounting for binarized models, in the BiT / BiBERT / BiPFT convention.

Operations: every multiply-accumulate of a Linear, Conv or attention matmul counts 2 FLOPs; a
*binary* multiply-accumulate (both operands 1-bit: a W1A1 Linear, Q_b K_b^T, A_b V_b) counts 1/64
of that (64 XNOR + popcount lanes per 64-bit word). Element-wise work (norms, softmax, GELU,
residual adds, the binarizers' own compare-and-scale) is not counted, as in the FLOP counters the
papers' numbers are usually compared against; BERT-base at 128 tokens is then 22.35 GFLOPs (the
papers' 22.5 G). Memory: float tensors at their dtype's size, binary weights at 1 bit each plus
their scales (the papers' ideal, and what edgeprep's ONNX file holds by default: 1 bit packed per weight,
see ``edgeprep.binary.packing``).
Counted by forward hooks on one example batch, so it follows the model's real shapes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgeprep.binary.binarizers import ElasticBinarizer
from edgeprep.binary.modules import BinaryEmbedding, BinaryLinear
from edgeprep.models.vit import Attention as VitAttention
from edgeprep.quant.attention import _TappedAttention

BINARY_OP_FRACTION = 1 / 64


def _heads(attn: nn.Module) -> tuple[int, int]:
    if hasattr(attn, "num_attention_heads"):
        return attn.num_attention_heads, attn.attention_head_size
    return attn.num_heads, attn.head_dim


def _is_attention(m: nn.Module) -> bool:
    return isinstance(m, (_TappedAttention, VitAttention)) or (
        hasattr(m, "num_attention_heads") and hasattr(m, "attention_head_size") and hasattr(m, "query"))


@torch.no_grad()
def count_ops(model: nn.Module, example: tuple[Any, ...] | dict[str, Any]) -> dict[str, float]:
    """{"fp_macs", "binary_macs", "flops"}: flops = 2 * fp_macs + 2 * binary_macs / 64."""
    totals = {"fp": 0.0, "binary": 0.0}

    def linear_hook(m: nn.Module, args: Any, out: torch.Tensor) -> None:
        rows = args[0].numel() // args[0].shape[-1]
        macs = rows * m.in_features * m.out_features
        totals["binary" if isinstance(m, BinaryLinear) and m.w1a1 else "fp"] += macs

    def conv_hook(m: nn.Module, args: Any, out: torch.Tensor) -> None:
        per_output = (m.in_channels // m.groups) * int(torch.tensor(m.kernel_size).prod())
        totals["fp"] += out.numel() * per_output

    def attention_hook(m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        batch, tokens = x.shape[0], x.shape[1]
        heads, head_dim = _heads(m)
        qk = pv = batch * heads * tokens * tokens * head_dim
        binary_qk = isinstance(getattr(m, "q_quant", None), ElasticBinarizer) and \
            isinstance(getattr(m, "k_quant", None), ElasticBinarizer)
        binary_pv = isinstance(getattr(m, "p_quant", None), ElasticBinarizer) and \
            isinstance(getattr(m, "v_quant", None), ElasticBinarizer)
        totals["binary" if binary_qk else "fp"] += qk
        totals["binary" if binary_pv else "fp"] += pv
        est = getattr(m, "estimators", None)
        if est is not None:  # three rank-r score products and probs x v_p (the projections are Linears)
            totals["fp"] += 3 * batch * tokens * tokens * est.rank + batch * heads * tokens * tokens

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            handles.append(m.register_forward_hook(conv_hook))
        if _is_attention(m):
            handles.append(m.register_forward_hook(attention_hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        model(**example) if isinstance(example, dict) else model(*example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {"fp_macs": totals["fp"], "binary_macs": totals["binary"],
            "flops": 2 * totals["fp"] + 2 * totals["binary"] * BINARY_OP_FRACTION}


def model_bytes(model: nn.Module) -> dict[str, float]:
    """{"float_bytes", "binary_bytes", "total_bytes"}: binary weights at 1 bit + one fp32 scale per
    tensor (per row for embeddings); every other parameter and buffer-free weight at its dtype size."""
    binary_weights = {id(m.weight) for m in model.modules() if isinstance(m, (BinaryLinear, BinaryEmbedding))}
    binary_bytes = 0.0
    for m in model.modules():
        if isinstance(m, BinaryLinear):
            binary_bytes += m.weight.numel() / 8 + 4
        elif isinstance(m, BinaryEmbedding):
            binary_bytes += m.weight.numel() / 8 + 4 * m.weight.shape[0]
    float_bytes = float(sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in binary_weights))
    return {"float_bytes": float_bytes, "binary_bytes": binary_bytes, "total_bytes": float_bytes + binary_bytes}
