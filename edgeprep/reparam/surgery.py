"""Model surgery for the reparam stage: LayerNorm -> PRepBN (or RepBN / BN), attention -> SLA.

What a norm folds into is decided here, where the model's structure is known, and recorded in the
decision (``norms: {norm FQN: [consumer Linear FQNs]}``) so folding later needs no guessing:
- pre-LN ViT blocks (``norm1`` -> ``attn.qkv``, ``norm2`` -> ``mlp.fc1``) and a ViT's final
  ``norm`` -> ``head``: the norm's output feeds only those Linears, so it folds into them;
- transformers' pre-LN ViT / DeiT layers the same way (``layernorm_before`` -> the query, key and
  value Linears, ``layernorm_after`` -> ``intermediate.dense``);
- every other LayerNorm (e.g. post-LN BERT, whose norms also feed the residual stream): no
  consumer; it folds to a per-channel affine (Mul + Add), never a normalization.
Folding checks itself numerically (``fold.fold_reparam``), so a wrong plan cannot go unnoticed.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.models.vit import Attention as VitAttention
from edgeprep.models.vit import ViT
from edgeprep.pruning.bert import is_bert_layer, self_attention_name
from edgeprep.pruning.groups import is_vit_block
from edgeprep.reparam.norms import PRepBN, set_token_mask
from edgeprep.reparam.sla import SimplifiedLinearAttention

REPARAM_KIND = "reparam"
NORMS = ("prepbn", "repbn", "bn")  # progressive LN->RepBN | RepBN at once | plain BN at once (ablations)
SLA_KERNEL = 5


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _pre_ln_vit_block(m: nn.Module) -> bool:
    return is_vit_block(m) and hasattr(m, "norm1") and hasattr(m, "norm2")


def norm_plan(model: nn.Module) -> dict[str, list[str]]:
    """{LayerNorm FQN: Linear FQNs its output feeds alone (empty: keep as an affine)} for every
    LayerNorm over one (the last) dim."""
    plan: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            plan[name] = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if _pre_ln_vit_block(m):
            for norm, consumer in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")):
                if prefix + norm in plan:
                    plan[prefix + norm] = [prefix + consumer]
        if is_bert_layer(m) and isinstance(getattr(m, "layernorm_before", None), nn.LayerNorm) \
                and isinstance(getattr(m, "layernorm_after", None), nn.LayerNorm):  # HF pre-LN ViT / DeiT
            sa = f"{prefix}attention.{self_attention_name(m)}"
            plan[prefix + "layernorm_before"] = [f"{sa}.{p}" for p in ("query", "key", "value")]
            plan[prefix + "layernorm_after"] = [prefix + "intermediate.dense"]
        if isinstance(m, ViT) and prefix + "norm" in plan:  # head(norm(x)[:, 0]): selection commutes
            plan[prefix + "norm"] = [prefix + "head"]
    return plan


def _sla_sites(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{attention FQN: SLA constructor arguments} for every ViT attention layer."""
    if not isinstance(model, ViT):
        raise BadInputError(f"attention: sla supports edgeprep's ViT models; {type(model).__name__} is not one "
                            "(use attention: keep; PRepBN alone works on BERT-style models)")
    tokens = int(model.pos_embed.shape[1])
    grid = list(model.grid_size)
    sites = {}
    for name, m in model.named_modules():
        if isinstance(m, VitAttention):
            sites[name] = {"dim": m.qkv.in_features, "num_heads": m.num_heads, "head_dim": m.head_dim,
                           "tokens": tokens, "grid": grid, "prefix_tokens": tokens - grid[0] * grid[1],
                           "kernel_size": SLA_KERNEL, "bias": m.qkv.bias is not None}
    return sites


def reparam_model(model: nn.Module, norm: str = "prepbn", attention: str = "keep", warmup_steps: int = 0,
                  decay_steps: int = 0, norms: Optional[dict[str, list[str]]] = None,
                  sla: Optional[dict[str, dict[str, Any]]] = None, copy_weights: bool = True) -> dict[str, Any]:
    """Swap modules in place; returns the decision that replays it (``norms`` / ``sla`` given: replay)."""
    if norm not in NORMS:
        raise BadInputError(f"norm {norm!r} is not one of {', '.join(NORMS)}")
    if attention not in ("keep", "sla"):
        raise BadInputError(f"attention {attention!r} is not one of keep, sla")
    if any(isinstance(m, PRepBN) for m in model.modules()):
        raise BadInputError("the model already has PRepBN norms (an earlier reparam stage); use one reparam stage")
    sites = (_sla_sites(model) if attention == "sla" else {}) if sla is None else sla
    plan = norm_plan(model) if norms is None else norms
    if not plan:
        raise BadInputError(f"{type(model).__name__} has no LayerNorm over the channel dim to re-parameterize")
    for name in plan:
        ln = model.get_submodule(name)
        if not isinstance(ln, nn.LayerNorm):
            raise BadInputError(f"{name} is a {type(ln).__name__}, not the LayerNorm the decision names")
        channels = ln.normalized_shape[0]
        if norm == "prepbn":
            new = PRepBN(ln, channels, warmup_steps, decay_steps)
        else:  # lam = 0 from the first step: no LayerNorm kept
            new = PRepBN(None, channels, 0, 0, alpha=1.0 if norm == "repbn" else 0.0, learn_alpha=norm == "repbn")
        new.consumers = list(plan[name])
        set_module(model, name, new.to(ln.weight.device if ln.weight is not None else "cpu").train(ln.training))
    for name, cfg in sites.items():
        old = model.get_submodule(name)
        if copy_weights:
            new = SimplifiedLinearAttention.from_attention(old, cfg["tokens"], cfg["grid"], cfg["prefix_tokens"],
                                                           cfg["kernel_size"])
        else:
            new = SimplifiedLinearAttention(**cfg)
        set_module(model, name, new.train(old.training))
    attach_token_mask_hook(model)
    return {"kind": REPARAM_KIND, "norm": norm, "attention": attention, "warmup_steps": warmup_steps,
            "decay_steps": decay_steps, "norms": plan, "sla": sites}


def replay_reparam(model: nn.Module, decision: dict) -> nn.Module:
    """Checkpoint replayer (registered in edgeprep.builtin): the same swaps (weights and schedule counters come from the checkpoint)."""
    reparam_model(model, decision["norm"], decision["attention"], decision["warmup_steps"],
                  decision["decay_steps"], norms=decision["norms"], sla=decision["sla"], copy_weights=False)
    return model


def attach_token_mask_hook(model: nn.Module) -> None:
    """HF BERT-style models: batch statistics skip padding (the attention mask's zeros).

    A pre-hook on the outermost Hugging Face module reads ``attention_mask`` (keyword, or
    BertModel's second positional argument) and hands it to every MaskedBatchNorm for that call.
    """
    # the HF model itself, or the one inside a wrapper (edgeprep's PackedTokens -> SentenceEncoder ->
    # BertModel, which receives attention_mask as a keyword)
    model = next((m for m in model.modules() if hasattr(getattr(m, "config", None), "num_attention_heads")), None)
    if model is None or getattr(model, "_edgeprep_mask_hook", None) is not None:
        return

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        set_token_mask(module, mask if isinstance(mask, torch.Tensor) else None)

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        set_token_mask(module, None)

    model._edgeprep_mask_hook = (model.register_forward_pre_hook(before, with_kwargs=True),
                                 model.register_forward_hook(after, with_kwargs=True))
