"""Export one model to one artifact directory: model file(s) + manifest.json + reference.npz.

Shared by `edgeprep run` and `edgeprep export`, so an artifact made either way is the same thing.
The manifest also records what the artifact is expected to meet on its runtime (``expect``), so
`edgeprep validate DIR` has a pass/fail rule with no recipe at hand.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from edgeprep.fsutil import atomic_dir
from edgeprep.manifest import load_artifact, write_manifest
from edgeprep.measure.metrics import torch_outputs
from edgeprep.types import Artifact

FP32_MIN_SQNR_DB = 40.0  # an fp32 export must match PyTorch to float rounding (measured ~130 dB)


def expectations(role: str, min_sqnr_db: Optional[float], max_metric_drop: Optional[float]) -> dict[str, Any]:
    """What `validate` checks for an artifact of this role: the recipe's gates for edgeprep's
    result, fp32 parity for the baseline, nothing for the runtime's own PTQ peers (reported only)."""
    if role == "baseline":
        return {"min_sqnr_db": FP32_MIN_SQNR_DB}
    if role == "edgeprep":
        return {k: v for k, v in (("min_sqnr_db", min_sqnr_db), ("max_metric_drop", max_metric_drop))
                if v is not None}
    return {}


def export_artifact(exporter: Any, model: torch.nn.Module, example: tuple[torch.Tensor, ...], out_dir: Path,
                    cfg: Any, *, name: str, role: str, task: str, ref_x: np.ndarray,
                    labels: Optional[np.ndarray], expect: dict[str, Any]) -> Artifact:
    """Export atomically: the directory appears complete (manifest last) or not at all.

    A model with PRepBN norms is exported folded (no LayerNorm / BatchNorm left); the reference
    outputs come from the unfolded model, so parity also checks the fold.
    """
    from edgeprep.models.hf import export_view, runtime_inputs
    from edgeprep.reparam.fold import export_form

    ref_out = torch_outputs(model, torch.from_numpy(ref_x))
    export_model = export_form(model, example)  # refuses (exit 2) while a PRepBN still mixes in LayerNorm
    # a packed token model exports as its two-input inner module (input_ids, attention_mask)
    export_model, export_example = export_view(export_model, example)
    with atomic_dir(Path(out_dir)) as tmp:
        art = exporter.export(export_model, export_example, tmp, cfg)
        # the ORT optimization level the runtime loads it with (ORT-run targets' option only)
        optimize = {"optimize": cfg.optimize} if getattr(cfg, "optimize", None) else {}
        art = dataclasses.replace(art, name=name, role=role, info={**dict(art.info), **optimize})
        write_manifest(art, task=task, ref_inputs=runtime_inputs(model, ref_x), ref_outputs=[ref_out],
                       labels=labels, extra={"expect": expect})
    return load_artifact(Path(out_dir))
