"""Model surgery for the binarize stage: Linears -> BinaryLinear, attention -> binary Q/K/V and
probabilities (+ residual estimators), word embeddings -> BinaryEmbedding.

Kept in full precision (BiPFT's choice, and where binarizing costs most accuracy for least gain):
norms, position / token-type embeddings, the patch-embedding conv, and the classifier head (the
Linear producing the model's output: the last ``nn.Linear`` registered; ``keep_head: false``
binarizes it too). The decision lists every swapped module, so a checkpoint replays it exactly.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from edgeprep.binary.modules import ACTIVATIONS, BinaryEmbedding, BinaryLinear, ResidualEstimators
from edgeprep.errors import BadInputError
from edgeprep.pruning.groups import matches
from edgeprep.quant.attention import _TappedAttention
from edgeprep.quant.convert import _set, _swap_attention, attention_sites

BINARIZE_KIND = "binarize"
WORD_EMBEDDING_NAMES = ("word_embeddings",)  # HF BERT-style; other tables (positions, types) stay float


def _targeted(name: str, targets: Sequence[str], ignore: Sequence[str]) -> bool:
    if targets and not any(matches(name, t) for t in targets):
        return False
    return not any(matches(name, p) for p in ignore)


def head_name(model: nn.Module) -> Optional[str]:
    """The classifier head: the last nn.Linear registered (``head`` in our ViT, ``classifier`` in HF)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def binarize_model(model: nn.Module, activations: str = "binary", estimator_rank: int = 1, *,
                   keep_head: bool = True, targets: Sequence[str] = (), ignore: Sequence[str] = (),
                   linears: Optional[Sequence[str]] = None, attentions: Optional[Sequence[str]] = None,
                   embeddings: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Swap modules in place; returns the decision that replays it (``linears`` etc. given: replay)."""
    if activations not in ACTIVATIONS:
        raise BadInputError(f"activations {activations!r} is not one of {', '.join(ACTIVATIONS)}")
    if estimator_rank < 0:
        raise BadInputError(f"estimator_rank must be >= 0, got {estimator_rank}")
    if any(isinstance(m, (BinaryLinear, _TappedAttention)) for m in model.modules()):
        raise BadInputError("the model is already quantized or binarized (an earlier qat / binarize stage)")
    head = head_name(model) if keep_head else None
    if linears is None:
        linears = [n for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n != head and _targeted(n, targets, ignore)]
    if embeddings is None:
        embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)
                      and n.rsplit(".", 1)[-1] in WORD_EMBEDDING_NAMES and _targeted(n, targets, ignore)]
    sites = {s.attention: s for s in attention_sites(model)}
    if attentions is None:
        attentions = [n for n in sites if _targeted(n, targets, ignore)]
    if not linears:
        raise BadInputError(f"binarize: no nn.Linear in {type(model).__name__} to binarize "
                            f"(targets {list(targets)}, ignore {list(ignore)})")
    quantize: bool | str = {"binary": "binary", "int8": True, "none": False}[activations]
    for name in attentions:
        if name not in sites:
            raise BadInputError(f"binarize: {name!r} is not an attention layer of {type(model).__name__}")
        src = model.get_submodule(name)
        hidden = _attention_width(src)
        _swap_attention(model, sites[name], quantize=quantize)
        if estimator_rank:
            new = model.get_submodule(name)
            new.estimators = ResidualEstimators(hidden, estimator_rank).to(next(src.parameters()).device)
    for name in linears:  # after the attention swap: its qkv / query... are the same Linear objects
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise BadInputError(f"binarize: {name!r} is a {type(module).__name__}, not an nn.Linear")
        _set(model, name, BinaryLinear.from_linear(module, activations))
    for name in embeddings:
        _set(model, name, BinaryEmbedding.from_embedding(model.get_submodule(name)))
    return {"kind": BINARIZE_KIND, "activations": activations, "estimator_rank": estimator_rank,
            "linears": list(linears), "attentions": list(attentions), "embeddings": list(embeddings),
            "head": head}


def _attention_width(attn: nn.Module) -> int:
    """The hidden size the attention reads (the estimators' input width)."""
    for name in ("qkv", "query"):
        lin = getattr(attn, name, None)
        if isinstance(lin, nn.Linear):
            return lin.in_features
    raise BadInputError(f"binarize: cannot find the input projection of {type(attn).__name__}")


def replay_binarize(model: nn.Module, decision: dict) -> nn.Module:
    """Checkpoint replayer (registered in edgeprep.builtin): the same swaps (binarizer scales and estimators load afterwards)."""
    binarize_model(model, decision["activations"], decision["estimator_rank"], linears=decision["linears"],
                   attentions=decision["attentions"], embeddings=decision["embeddings"])
    return model
