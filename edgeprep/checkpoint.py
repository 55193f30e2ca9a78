"""Checkpoints without pickles.

A checkpoint directory holds
  checkpoint.json   {"schema", "model": <ModelConfig, paths absolute>, "decisions": [...], "meta": {...}}
  model.safetensors the state dict
Loading rebuilds the source model (``load_model``), replays each structural decision (pruning
kept indices, module swaps) through the registered stages' replayers (``edgeprep.registry``) so the module has the saved structure,
then loads the weights strictly. Nothing is unpickled, so a checkpoint cannot run code on load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.fsutil import atomic_dir, sha256_file, write_json_atomic
from edgeprep.jsonfile import JsonFileError, read_json
from edgeprep.models import load_model
from edgeprep.models.loaders import (
    absolute_model_config,
    load_state_dict_strict,
    read_safetensors,
    set_eval,
    source_path,
)
from edgeprep.recipe import ModelConfig
from edgeprep.registry import replayers

SCHEMA = "edgeprep.checkpoint/1"
CONFIG_FILE = "checkpoint.json"
WEIGHTS_FILE = "model.safetensors"

# decision["kind"] -> function(model, decision) -> model with that decision applied (structure only;
# the weights come from model.safetensors afterwards): each stage kind's StageSpec.replayers.


@dataclass
class Checkpoint:
    model: nn.Module
    model_cfg: ModelConfig
    decisions: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(ckpt_dir: Path, model: nn.Module, model_cfg: ModelConfig, decisions: list[dict],
                    meta: dict, base_dir: Path | None = None) -> None:
    """Write a checkpoint atomically: an interrupted save leaves the previous one (or none), never half.

    ``base_dir`` is the recipe's folder: relative model paths are made absolute against it (default:
    the working directory), and it is remembered so a factory module next to the recipe imports.
    """
    ckpt_dir = Path(ckpt_dir)
    cfg = absolute_model_config(model_cfg, base_dir)
    for i, decision in enumerate(decisions):
        if not isinstance(decision, dict) or not isinstance(decision.get("kind"), str):
            raise ValueError(f"decision {i} must be a dict with a string 'kind', got {decision!r}")
    src = source_path(cfg.source, base_dir)
    doc = {
        "schema": SCHEMA,
        "model": cfg.model_dump(mode="json"),
        "decisions": decisions,
        "meta": meta,
        # Provenance used on load: a source file that changed since would rebuild another model.
        "source_sha256": sha256_file(src) if src is not None and src.is_file() else None,
        "base_dir": str(Path(base_dir).resolve()) if base_dir is not None else None,
    }
    # Round-trip through JSON now so a non-serialisable decision fails before anything is written.
    text = json.dumps(doc, default=_json_default)
    with atomic_dir(ckpt_dir) as tmp:
        _save_weights(model, tmp / WEIGHTS_FILE)
        write_json_atomic(tmp / CONFIG_FILE, json.loads(text))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):  # kept indices recorded as tensors
        return obj.tolist()
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy arrays
        return obj.tolist()
    if isinstance(obj, (Path, tuple, set)):
        return str(obj) if isinstance(obj, Path) else list(obj)
    raise TypeError(f"not JSON serialisable in a checkpoint: {type(obj).__name__}")


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    # Cloning gives each entry its own contiguous storage: tied weights (one tensor under two
    # names) and views are what safetensors refuses to save. Loading strictly restores both names.
    state = {name: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
             for name, t in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    from edgeprep.fsutil import plain_file_mode

    plain_file_mode(path)  # safetensors writes 0600 whatever the umask


def load_checkpoint(ckpt_dir: Path, trust_pickle: bool = False) -> Checkpoint:
    """Rebuild the source model, replay the decisions, load the weights strictly; model in eval mode.

    A checkpoint never grants trust by itself: ``trust_pickle`` must come from the caller (the CLI
    flag or the recipe being run), whatever the stored model config says.
    """
    ckpt_dir = Path(ckpt_dir)
    doc = read_checkpoint_json(ckpt_dir)
    weights = ckpt_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise BadInputError(f"{ckpt_dir}: checkpoint has no {WEIGHTS_FILE}; the checkpoint is incomplete, "
                            "re-run the stage that wrote it")
    cfg = doc["model"]
    base_dir = Path(doc["base_dir"]) if doc.get("base_dir") else None
    src = source_path(cfg.source, base_dir)
    expected_sha = doc.get("source_sha256")
    if expected_sha and src is not None and src.is_file() and sha256_file(src) != expected_sha:
        raise BadInputError(f"{ckpt_dir}: the source model file {src} changed since this checkpoint was written "
                            "(sha256 differs); restore that file or re-run from the start")

    handle = load_model(cfg.model_copy(update={"trust_pickle": False}), base_dir=base_dir,
                        trust_pickle=trust_pickle)
    model = handle.module
    for i, decision in enumerate(doc["decisions"]):
        model = replay_decision(model, decision, where=f"{ckpt_dir / CONFIG_FILE}: decisions.{i}")
    load_state_dict_strict(model, read_safetensors(weights), str(weights))
    set_eval(model)
    return Checkpoint(model=model, model_cfg=cfg, decisions=doc["decisions"], meta=doc["meta"])


def replay_decision(model: nn.Module, decision: dict, where: str = "decision") -> nn.Module:
    kind = decision.get("kind") if isinstance(decision, dict) else None
    known = replayers()
    replay = known.get(kind) if isinstance(kind, str) else None
    if replay is None:
        raise BadInputError(f"{where}: unknown decision kind {kind!r}; known kinds: {', '.join(sorted(known))} "
                            "(is the stage that wrote it part of this edgeprep version?)")
    out = replay(model, decision)
    if not isinstance(out, nn.Module):
        raise TypeError(f"replayer for {kind!r} returned {type(out).__name__}, not an nn.Module")
    return out


def read_checkpoint_json(ckpt_dir: Path) -> dict[str, Any]:
    """checkpoint.json parsed and validated: {"model": ModelConfig, "decisions", "meta", ...}."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        what = "not a directory" if ckpt_dir.exists() else "not found"
        raise BadInputError(f"{ckpt_dir}: checkpoint directory {what}; pass a stage directory "
                            "such as runs/<name>/stages/<i>-<kind>")
    path = ckpt_dir / CONFIG_FILE
    if not path.is_file():
        raise BadInputError(f"{ckpt_dir}: no {CONFIG_FILE}; this is not an edgeprep checkpoint directory")
    try:
        doc = read_json(path)
    except JsonFileError as exc:
        raise BadInputError(f"{path}: {exc}; the checkpoint is corrupted") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise BadInputError(f"{path}: schema is {found!r}, expected {SCHEMA!r}; "
                            "it was written by another tool or edgeprep version")
    if not isinstance(doc.get("decisions", []), list) or not isinstance(doc.get("meta", {}), dict):
        raise BadInputError(f"{path}: 'decisions' must be a list and 'meta' an object; the checkpoint is corrupted")
    try:
        doc["model"] = ModelConfig.model_validate(doc.get("model"))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise BadInputError(f"{path}: invalid 'model'{' at ' + loc if loc else ''}: {first['msg']}") from None
    doc.setdefault("decisions", [])
    doc.setdefault("meta", {})
    return doc
