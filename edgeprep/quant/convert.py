"""Turn a float model into its QAT form (and a teacher into a tapped one), as replayable data.

``quantize_model`` swaps every targeted nn.Linear for a QuantLinear and every attention module it
recognises for a tapped one with int8 Q/K/V/probability quantizers, and returns a decision
``{"kind": "qat", ...}`` listing exactly which modules it swapped; the checkpoint loader replays
that decision (``replay_qat``) before loading the weights, so a QAT checkpoint rebuilds without
pickles. ``tap_model`` gives a teacher the same attention modules without quantizers, so both
models' taps line up for Teacher Intervention.

Attention families (found by structure): our ViT's ``Attention`` and Hugging Face BERT-style
layers (see ``edgeprep.pruning.bert.is_bert_layer``). Conv layers stay float (in a ViT only the
patch embedding, one op of ~40).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.models.vit import Attention as VitAttention
from edgeprep.pruning.bert import is_bert_layer, self_attention_name
from edgeprep.pruning.groups import matches
from edgeprep.quant.attention import (
    QatBertSelfAttention,
    QatHFViTSelfAttention,
    QatViTAttention,
    Taps,
    _TappedAttention,
    bert_out_tap,
)
from edgeprep.quant.embedding import QuantEmbedding
from edgeprep.quant.linear import ACTIVATION_MODES, WEIGHT_MODES, QuantLinear
from edgeprep.quant.smooth import replay_smoothing

QAT_KIND = "qat"


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer: where its module is, the block whose output is a hidden state, and
    (BERT) the Linear whose output is the ``out`` tap."""

    layer: int
    attention: str
    block: str
    family: str  # "vit" (edgeprep's) | "bert" | "hf_vit" (transformers' ViT / DeiT layers)
    out_linear: Optional[str] = None


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    sites: list[AttentionSite] = []
    for name, module in model.named_modules():
        if isinstance(module, (VitAttention, QatViTAttention)):
            block = name.rsplit(".", 1)[0] if "." in name else ""
            sites.append(AttentionSite(len(sites), name, block, "vit"))
        elif is_bert_layer(module):
            prefix = f"{name}." if name else ""
            child = self_attention_name(module)
            sites.append(AttentionSite(len(sites), f"{prefix}attention.{child}", name,
                                       "bert" if child == "self" else "hf_vit", f"{prefix}attention.output.dense"))
    return sites


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _swap_attention(model: nn.Module, site: AttentionSite, quantize: bool) -> None:
    src = model.get_submodule(site.attention)
    if isinstance(src, _TappedAttention):
        return
    cls = {"vit": QatViTAttention, "bert": QatBertSelfAttention, "hf_vit": QatHFViTSelfAttention}[site.family]
    try:
        new = cls(src, site.layer, quantize)
    except ValueError as exc:
        raise BadInputError(f"{site.attention}: {exc}") from None
    new.train(src.training)
    _set(model, site.attention, new)


def _targeted(name: str, targets: Sequence[str], ignore: Sequence[str]) -> bool:
    if targets and not any(matches(name, t) for t in targets):
        return False
    return not any(matches(name, p) for p in ignore)


def quantize_model(model: nn.Module, weights: str, activations: str, *, targets: Sequence[str] = (),
                   ignore: Sequence[str] = (), linears: Optional[Sequence[str]] = None,
                   attentions: Optional[Sequence[str]] = None,
                   embeddings: str | Sequence[str] = "float", reduced_range: bool = False) -> dict[str, Any]:
    """Swap modules in place; returns the decision that replays it.

    ``linears`` / ``attentions`` (from a decision) name the modules exactly; otherwise every Linear
    and attention layer under ``targets`` and not under ``ignore`` is swapped. ``embeddings``:
    "float" (none), "int8" (every nn.Embedding under targets / not under ignore gets per-row int8
    weights, ``edgeprep.quant.embedding``), or the exact names (from a decision).
    ``reduced_range``: int8 weights on the [-63, 63] grid (exact on every CPU family's int8
    kernels, ``edgeprep.quant.cpu_family``); only with int8 weights and activations.
    """
    if weights not in WEIGHT_MODES:
        raise BadInputError(f"weights {weights!r} is not one of {', '.join(WEIGHT_MODES)}")
    if activations not in ACTIVATION_MODES:
        raise BadInputError(f"activations {activations!r} is not one of {', '.join(ACTIVATION_MODES)}")
    quant_acts = activations == "int8"
    sites = attention_sites(model)
    if attentions is None:  # swapped even with float activations: intervention needs the taps
        attentions = [s.attention for s in sites if _targeted(s.attention, targets, ignore)]
    by_name = {s.attention: s for s in sites}
    for name in attentions:
        if name not in by_name:
            raise BadInputError(f"qat: {name!r} is not an attention layer of {type(model).__name__}")
        _swap_attention(model, by_name[name], quantize=quant_acts)
    if linears is None:
        linears = [n for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear) and _targeted(n, targets, ignore)]
    if not linears:
        raise BadInputError(f"qat: no nn.Linear in {type(model).__name__} matches targets {list(targets)} "
                            f"/ ignore {list(ignore)}")
    if embeddings == "float":
        embeddings = []
    elif embeddings == "int8":
        embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)
                      and not isinstance(m, QuantEmbedding) and _targeted(n, targets, ignore)]
        if not embeddings:
            raise BadInputError(f"qat: embeddings: int8, but {type(model).__name__} has no nn.Embedding under targets "
                                f"{list(targets)} / ignore {list(ignore)}; set embeddings: float")
    elif isinstance(embeddings, str):
        raise BadInputError(f"embeddings {embeddings!r} is not one of float, int8")
    for name in embeddings:
        module = model.get_submodule(name) if _has(model, name) else None
        if not isinstance(module, nn.Embedding):
            raise BadInputError(f"qat: {name!r} is not an nn.Embedding of {type(model).__name__}")
        if not isinstance(module, QuantEmbedding):
            try:
                _set(model, name, QuantEmbedding.from_embedding(module))
            except ValueError as exc:
                raise BadInputError(f"qat: {name}: {exc}; set embeddings: float") from None
    for name in linears:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise BadInputError(f"qat: no module {name!r} in {type(model).__name__}") from None
        if not isinstance(module, nn.Linear):
            raise BadInputError(f"qat: {name!r} is a {type(module).__name__}, not an nn.Linear")
        if not isinstance(module, QuantLinear):
            _set(model, name, QuantLinear.from_linear(module, weights=weights, activations=activations,
                                                      reduced_range=reduced_range))
    decision = {"kind": QAT_KIND, "weights": weights, "activations": activations,
                "linears": list(linears), "attentions": list(attentions)}
    if embeddings:  # only when used: older checkpoints' decisions stay byte-identical
        decision["embeddings"] = list(embeddings)
    if reduced_range:  # likewise; a decision without it replays the full [-127, 127] grid
        decision["reduced_range"] = True
    return decision


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def replay_qat(model: nn.Module, decision: dict) -> nn.Module:
    """Checkpoint replayer (registered in edgeprep.builtin): the same swaps, before the checkpoint's weights load."""
    quantize_model(model, decision["weights"], decision["activations"],
                   linears=decision["linears"], attentions=decision["attentions"],
                   embeddings=decision.get("embeddings", []), reduced_range=bool(decision.get("reduced_range")))
    if decision.get("smoothing"):
        replay_smoothing(model, decision["smoothing"]["linears"])
    return model


def tap_model(model: nn.Module) -> None:
    """Give every attention layer the tapped module (no quantizers): a teacher for intervention."""
    for site in attention_sites(model):
        _swap_attention(model, site, quantize=False)


def attach_taps(model: nn.Module, taps: Taps) -> list[Any]:
    """Point every tapped attention of ``model`` at ``taps``; returns hook handles to remove later.

    Models must have been through ``quantize_model`` or ``tap_model`` (attention layers swapped).
    """
    handles = []
    for site in attention_sites(model):
        attention = model.get_submodule(site.attention)
        if not isinstance(attention, _TappedAttention):
            raise BadInputError(f"{site.attention} has no taps (quantize_model or tap_model it first)")
        attention.taps = taps
        if site.out_linear:
            handles.append(model.get_submodule(site.out_linear).register_forward_hook(bert_out_tap(attention)))
    return handles
