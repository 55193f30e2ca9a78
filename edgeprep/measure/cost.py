"""Model cost: parameter count and multiply-accumulates, counted (not estimated).

MACs come from torch.utils.flop_counter.FlopCounterMode, which counts the FLOPs of every matmul,
convolution and attention kernel the forward pass really dispatches; MACs = FLOPs / 2. Ops it has
no formula for (elementwise, norms, softmax) count zero, as in the usual MAC convention.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (each shared tensor once: ``parameters()`` de-duplicates)."""
    return int(sum(p.numel() for p in model.parameters()))


def _first_sample(x: Any) -> Any:
    # MACs are reported per sample, so the forward runs on batch 1.
    return x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x


def count_macs(model: torch.nn.Module, example_inputs: Sequence[Any]) -> int:
    """MACs of one forward pass at batch 1 (the first sample of each example input)."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = tuple(_first_sample(x) for x in example_inputs)
    was_training = model.training
    model.eval()  # train-mode BatchNorm would update its running statistics
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
        with torch.no_grad(), counter:
            model(*inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops() // 2)


def _extra_flop_formulas() -> dict:
    """Formulas torch's counter lacks. The CPU flash-attention kernel (what F.scaled_dot_product_attention,
    e.g. transformers' default "sdpa" attention, runs on CPU) otherwise counts 0, and a MACs budget
    would miss every attention matmul of such a model."""
    from torch.utils.flop_counter import sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)
    return {op: cpu_flash}
