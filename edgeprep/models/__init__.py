"""Built-in model zoo and the one entry point that turns a recipe's ``model:`` into a module.

The zoo is a plain dict (``ZOO``, defined in ``edgeprep.models.zoo`` and re-exported here);
``load_model`` accepts a zoo name, a ``"package.module:factory"`` string, or a model file
(TorchScript, torch.export ``.pt2``, ``.safetensors`` + factory, ``.pt``), see ``edgeprep.models.loaders``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgeprep.models.zoo import ZOO, ModelHandle, ZooEntry, build_zoo_model
from edgeprep.recipe import ModelConfig


def list_models() -> list[dict[str, Any]]:
    """One row per zoo model and installed built-in model directory for ``edgeprep models``
    (params counted on the meta device: no memory)."""
    rows = []
    for name, entry in ZOO.items():
        with torch.device("meta"):
            module = entry.factory()
        rows.append({"name": name, "params": sum(p.numel() for p in module.parameters()),
                     "input_shape": list(entry.input_shape), "num_classes": entry.num_classes,
                     "data": entry.data, "description": entry.description})
    from edgeprep.models.hf import list_builtin  # imports transformers only when the hf extra is there

    return rows + list_builtin()


def load_model(cfg: ModelConfig, base_dir: Path | None = None, trust_pickle: bool = False) -> ModelHandle:
    """Build or load ``cfg.source`` in eval mode. Relative paths resolve against ``base_dir``.

    ``trust_pickle`` (the CLI's ``--trust-pickle``) or ``cfg.trust_pickle`` allows a full-pickle
    ``.pt`` to load, which runs code from the file; without it such a file raises UnsafePickleError.
    """
    from edgeprep.models.loaders import load_source

    return load_source(cfg, base_dir=base_dir, trust_pickle=trust_pickle or cfg.trust_pickle)


__all__ = ["ZOO", "ZooEntry", "ModelHandle", "build_zoo_model", "list_models", "load_model"]
