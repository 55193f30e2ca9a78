"""Fold finished PRepBN norms away, in PyTorch, before any export.

In eval mode with lam = 0 a PRepBN is ``a * x + b`` per channel (``RepBN.affine``). Then:
- before a Linear:  W(a*x + b) + c  =  (W diag(a)) x + (W b + c);
- after a Conv / Linear (y = a * (W x + c) + b): W' = diag(a) W, c' = a * c + b. The ``a * c`` term
  holds ``alpha * c`` (a includes alpha); the reference code leaves it out after its patch-embed
  conv, an error of up to ~1 on real weights;
- with no Linear to take it (the norm also feeds a residual stream): a ChannelAffine, Mul + Add.
No LayerNorm or BatchNorm survives, so the exported graph has neither. Folding is refused while
any lam > 0: the LayerNorm is still part of the function.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.reparam.norms import ChannelAffine, PRepBN
from edgeprep.reparam.sla import SimplifiedLinearAttention, SLAInference
from edgeprep.reparam.surgery import set_module

FOLD_KIND = "reparam_fold"
FOLD_CHECK_MAX_ABS = 1e-4  # folded vs unfolded eval model on real inputs (fp32 rounding is ~1e-6)


class ReparamNotFinishedError(BadInputError):
    """A PRepBN still mixes in its LayerNorm (lam > 0): nothing to fold yet."""


@torch.no_grad()
def fold_into_linear_input(linear: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
    """linear(a * x + b) == linear'(x)."""
    w = linear.weight.double()  # fold in float64: each folded weight is rounded once, at the end
    bias = w @ b.double()
    if linear.bias is not None:
        bias = bias + linear.bias.double()
        linear.bias.copy_(bias.to(linear.bias.dtype))
    else:
        linear.bias = nn.Parameter(bias.to(linear.weight.dtype))
    linear.weight.copy_((w * a.double()[None, :]).to(linear.weight.dtype))


@torch.no_grad()
def fold_into_output(layer: nn.Conv2d | nn.Conv1d | nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
    """a * layer(x) + b == layer'(x), per output channel (bias included: a * c + b)."""
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    w = layer.weight.double()
    layer.weight.copy_((w * a.double().reshape(shape)).to(layer.weight.dtype))
    c = layer.bias.double() if layer.bias is not None else torch.zeros_like(a, dtype=torch.float64)
    new_bias = a.double() * c + b.double()
    if layer.bias is not None:
        layer.bias.copy_(new_bias.to(layer.bias.dtype))
    else:
        layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))


def has_reparam(model: nn.Module) -> bool:
    return any(isinstance(m, PRepBN) for m in model.modules())


def unfinished(model: nn.Module) -> list[tuple[str, float, int, int]]:
    """(FQN, lam, steps done, steps the schedule needs) of every PRepBN with lam > 0."""
    return [(n, m.lam, int(m.steps_done), m.warmup_steps + m.decay_steps)
            for n, m in model.named_modules() if isinstance(m, PRepBN) and m.lam > 0]


@torch.no_grad()
def fold_reparam(model: nn.Module, check_inputs: Optional[tuple[torch.Tensor, ...]] = None) -> Optional[dict[str, Any]]:
    """Fold every PRepBN of ``model`` in place; returns the decision that replays the structure
    (None when there is nothing to fold). ``check_inputs``: compare with the unfolded eval model
    on them and raise if they differ by more than FOLD_CHECK_MAX_ABS (a plan that was wrong)."""
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, PRepBN)]
    if not norms:
        return None
    pending = unfinished(model)
    if pending:
        name, lam, done, need = pending[0]
        raise ReparamNotFinishedError(
            f"cannot fold {len(pending)} PRepBN norm(s): {name} still mixes LayerNorm (lam {lam:.3g} after "
            f"{done} of the {need} warmup + decay steps); train {need - done} more steps (edgeprep reparam "
            f"CKPT --steps {need - done}) or lower warmup_steps / decay_steps")
    was_training = model.training
    model.eval()
    reference = model(*check_inputs) if check_inputs is not None else None
    folded: dict[str, list[str]] = {}
    affine: list[str] = []
    for name, norm in norms:
        a, b = norm.repbn.affine(torch.float64)
        consumers = norm.consumers
        if consumers:
            for c in consumers:
                fold_into_linear_input(model.get_submodule(c), a, b)
            set_module(model, name, nn.Identity())
            folded[name] = list(consumers)
        else:
            set_module(model, name, ChannelAffine(a.to(norm.repbn.bn.weight.dtype), b.to(norm.repbn.bn.weight.dtype)))
            affine.append(name)
    if reference is not None:
        err = float((model(*check_inputs) - reference).abs().max())
        if not err <= FOLD_CHECK_MAX_ABS:
            raise RuntimeError(f"folding changed the model's output by {err:.3g} (> {FOLD_CHECK_MAX_ABS}); "
                               "the fold plan is wrong for this architecture")
    model.train(was_training)
    return {"kind": FOLD_KIND, "folded": folded, "affine": {n: int(model.get_submodule(n).scale.numel())
                                                            for n in affine}}


def replay_fold(model: nn.Module, decision: dict) -> nn.Module:
    """Checkpoint replayer (registered in edgeprep.builtin): norms -> Identity / ChannelAffine (the weights load afterwards)."""
    for name in decision["folded"]:
        set_module(model, name, nn.Identity())
    for name, channels in decision["affine"].items():
        set_module(model, name, ChannelAffine(torch.ones(channels), torch.zeros(channels)))
    return model


def has_sla(model: nn.Module) -> bool:
    return any(isinstance(m, SimplifiedLinearAttention) for m in model.modules())


@torch.no_grad()
def sla_to_inference(model: nn.Module) -> list[str]:
    """Swap every SimplifiedLinearAttention for its channel-first export form (SLAInference, the
    same function); returns the swapped FQNs."""
    names = [n for n, m in model.named_modules() if isinstance(m, SimplifiedLinearAttention)]
    for name in names:
        set_module(model, name, SLAInference(model.get_submodule(name)))
    return names


@torch.no_grad()
def export_form(model: nn.Module, example: Optional[tuple[torch.Tensor, ...]] = None) -> nn.Module:
    """The model an exporter should see: a copy with PRepBN norms folded and SLA layers in their
    export form when it has either, else the model itself. ``example``: inputs the copy is checked
    on against the original model (fold and swap together)."""
    if not (has_reparam(model) or has_sla(model)):
        return model
    was_training = model.training
    model.eval()
    reference = model(*example) if example is not None else None
    model.train(was_training)
    out = copy.deepcopy(model).eval()
    if has_reparam(out):
        fold_reparam(out)
    sla_to_inference(out)
    if reference is not None:
        err = float((out(*example) - reference).abs().max())
        if not err <= FOLD_CHECK_MAX_ABS:
            raise RuntimeError(f"the export form differs from the model by {err:.3g} (> {FOLD_CHECK_MAX_ABS}); "
                               "the fold plan is wrong for this architecture")
    return out
