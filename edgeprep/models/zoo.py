"""The built-in model zoo: ``ZOO`` (name -> ``ZooEntry``), ``ModelHandle`` (a loaded model and what
the pipeline needs to know about it) and ``build_zoo_model``.

They live here, not in the package ``__init__``, because ``edgeprep.models.loaders`` needs them while
the package's ``load_model`` imports the loaders: were they in ``__init__``, the package and its
loaders would import each other (a cycle). ``edgeprep.models`` re-exports every name.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.models.cnn import ResNetSmall
from edgeprep.models.vit import ViT


@dataclass(frozen=True)
class ZooEntry:
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # per sample, for the default kwargs
    num_classes: int
    data: str  # default data source ("digits", "digits32")
    description: str


ZOO: dict[str, ZooEntry] = {
    # 16 tokens of 2x2 patches, ~0.1 M params. depth 3, heads 4 (head_dim 16) and the sin-cos start
    # of the position embedding make 300 AdamW steps (batch 64, lr 3e-3, warmup 20 + cosine) reach
    # 93.7-95.6% test accuracy over 6 seeds; depth 2 / heads 2 with a random start gave 86-91%.
    "vit-tiny-digits": ZooEntry(
        factory=functools.partial(ViT, image_size=8, patch_size=2, in_chans=1, num_classes=10,
                                  dim=64, depth=3, heads=4, mlp_ratio=2.0),
        input_shape=(1, 8, 8), num_classes=10, data="digits",
        description="ViT on 8x8 digits: patch 2 (16 tokens), dim 64, depth 3, 4 heads, MLP x2; the quickstart model"),
    "vit-bench": ZooEntry(
        factory=functools.partial(ViT, image_size=32, patch_size=4, in_chans=1, num_classes=10,
                                  dim=192, depth=6, heads=3, mlp_ratio=4.0),
        input_shape=(1, 32, 32), num_classes=10, data="digits32",
        description="ViT on 32x32 digits: patch 4 (64 tokens), dim 192, depth 6, 3 heads, MLP x4; latency benchmark"),
    "cnn-bench": ZooEntry(
        factory=functools.partial(ResNetSmall, in_chans=1, num_classes=10, widths=(32, 64, 128),
                                  strides=(1, 2, 2), blocks_per_stage=2),
        input_shape=(1, 32, 32), num_classes=10, data="digits32",
        description="ResNet-style CNN with BatchNorm on 32x32 digits: widths 32/64/128, 2 blocks each; channel pruning"),
}


@dataclass
class ModelHandle:
    module: nn.Module
    name: str
    input_shape: tuple[int, ...] | None  # per sample; None when neither the source nor the recipe says
    num_classes: int | None
    data: str | None  # the zoo model's default data source
    tokenizer: Any = None  # a text model's tokenizer (the text data source tokenizes with it)


def build_zoo_model(name: str, kwargs: dict[str, Any] | None = None) -> ModelHandle:
    """Build zoo model ``name``; ``kwargs`` override its constructor arguments.

    ``seed`` (default 0) fixes the initialisation so the same recipe gives the same weights; the
    global RNG state is restored afterwards so loading a model never shifts anyone else's stream.
    """
    entry = ZOO.get(name)
    if entry is None:
        raise BadInputError(f"unknown zoo model {name!r}; valid models: {', '.join(sorted(ZOO))}")
    kwargs = dict(kwargs or {})
    seed = kwargs.pop("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise BadInputError(f"model {name!r}: model.kwargs.seed must be an integer, got {seed!r}")
    valid = [p for p in inspect.signature(entry.factory).parameters]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise BadInputError(f"model {name!r}: unknown model.kwargs {', '.join(unknown)}; "
                            f"valid: {', '.join(valid + ['seed'])}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            module = entry.factory(**kwargs)
        except (TypeError, ValueError) as exc:
            raise BadInputError(f"model {name!r}: model.kwargs {kwargs} are invalid: {exc}") from None
    input_shape = getattr(module, "input_shape", None)
    if input_shape is None:  # size-agnostic (the CNN): the default spatial size, the requested channels
        input_shape = (int(kwargs.get("in_chans", entry.input_shape[0])), *entry.input_shape[1:])
    return ModelHandle(module=module.eval(), name=name, input_shape=tuple(input_shape),
                       num_classes=int(kwargs.get("num_classes", entry.num_classes)), data=entry.data)
