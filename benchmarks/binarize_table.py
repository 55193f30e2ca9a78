"""BiPFT binarization on vit-bench: W1A1 with and without the low-rank residual estimators, vs fp32.

For each seed: train vit-bench (the project's loop, 300 steps, as the other tables), then the
binarize stage twice from it with the same budget: W1A1 with rank-1 estimators and W1A1 without
(``estimator_rank: 0``); validation accuracy every --eval-every steps, final test accuracy in
PyTorch, then each binarized model (and the fp32 one) exported to ONNX (binary weights packed 1 bit
each, the default ``binary_storage: packed1``) and run on ONNX Runtime: test accuracy, top-1 agreement and SQNR vs
PyTorch, and bytes (binary weights vs the same weights in fp32; whole file vs the fp32 file).

Per-seed results go to a JSON file in --work as they finish (--resume continues); the Markdown
table to stdout and benchmarks/results/binarize_table.md.

    .venv/bin/python benchmarks/binarize_table.py [--seeds 0 1 2] [--steps 300]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import mean_sd  # sibling scripts: benchmarks/ is on sys.path
from ptq_table import cpu_name, run_batched

from edgeprep.context import Context, StageReport
from edgeprep.data import load_data
from edgeprep.exporters import get_exporter, get_runtime
from edgeprep.exporters.onnx import OnnxOptions
from edgeprep.fsutil import write_json_atomic, write_text_atomic
from edgeprep.measure.parity import parity
from edgeprep.models import ZOO
from edgeprep.pipeline import frozen_copy
from edgeprep.recipe import BinarizeConfig, DataConfig, TrainConfig
from edgeprep.stages.binarize import BinarizeStage
from edgeprep.train import evaluate_accuracy, train

RESULTS = Path(__file__).resolve().parent / "results" / "binarize_table.md"
BASE_TRAIN = TrainConfig(steps=300, batch_size=64, lr=1e-3, warmup_steps=30)  # as the other tables
BINARIZE_LR = 1e-3
LABEL_LOSS = 1.0
VARIANTS = {"w1a1+est": 1, "w1a1": 0}  # name -> estimator rank


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300, help="binarize stage steps (each variant)")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeprep-binarize-bench"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    runs_file = args.work / "binarize_runs.json"
    runs: dict[str, Any] = json.loads(runs_file.read_text()) if args.resume and runs_file.is_file() else {}
    t_start = time.perf_counter()
    data = load_data(DataConfig(source="digits32"))
    for seed in args.seeds:
        if str(seed) not in runs:
            runs[str(seed)] = run_seed(seed, data, args)
            write_json_atomic(runs_file, runs)
    text = render(runs, args, time.perf_counter() - t_start)
    print(text)
    write_text_atomic(args.out, text)
    return 0


def run_seed(seed: int, data, args) -> dict[str, Any]:
    torch.manual_seed(seed)
    base = ZOO["vit-bench"].factory()
    train(base, data.train, BASE_TRAIN, seed=seed, progress=False, description="vit-bench")
    base.eval()
    out: dict[str, Any] = {"fp32_test": evaluate_accuracy(base, data.test)}
    out["fp32_ort"] = on_ort(base, "fp32", seed, data, args)
    for name, rank in VARIANTS.items():
        student = copy.deepcopy(base)
        ctx = Context(data=data, train=BASE_TRAIN, example_inputs=(data.train.x[:2],), seed=seed,
                      report=StageReport(kind="binarize"), teacher=frozen_copy(base), progress=False)
        cfg = BinarizeConfig(activations="binary", estimator_rank=rank, steps=args.steps, label_loss=LABEL_LOSS,
                             train={"lr": BINARIZE_LR, "warmup_steps": 20, "eval_every": args.eval_every})
        t0 = time.perf_counter()
        BinarizeStage(cfg).apply(student, ctx)
        info = ctx.report.metrics["binarize"]
        out[name] = {"seconds": time.perf_counter() - t0, "test": evaluate_accuracy(student.eval(), data.test),
                     "val": info["val_accuracy"],
                     "params": sum(p.numel() for p in student.parameters()),
                     "curve": [(h["step"], h["val_accuracy"]) for h in info["history"] if "val_accuracy" in h],
                     "ort": on_ort(student, name, seed, data, args)}
    return out


def on_ort(model: torch.nn.Module, name: str, seed: int, data, args) -> dict[str, Any]:
    """Export to ONNX (as `edgeprep run` does), run the test split on ORT, compare with PyTorch."""
    art = get_exporter("onnx").export(model, (data.train.x[:2],), args.work / f"seed{seed}" / f"onnx-{name}",
                                      OnnxOptions())
    with torch.no_grad():
        ref = model.eval()(data.test.x).numpy()
    got = run_batched(get_runtime("onnxruntime").load(art, threads=1), data.test.x.numpy())
    p = parity([ref], [got])
    binary = (art.info.get("quantized_graph") or {}).get("binary", {})
    return {"test": float(np.mean(got.argmax(-1) == data.test.y.numpy())), "agreement": p["top1_agreement"],
            "sqnr_db": p["sqnr_db"], "file_bytes": art.size_bytes,
            "binary_weights": binary.get("binary_weights", 0),
            "binary_weight_bytes": binary.get("binary_weight_bytes_on_disk", 0)}


def render(runs: dict, args, seconds: float) -> str:
    seeds = sorted(runs, key=int)
    r = [runs[s] for s in seeds]
    lines = [
        "# BiPFT binarization on vit-bench: W1A1 with and without residual estimators (PyTorch)",
        "",
        f"Command: `.venv/bin/python benchmarks/binarize_table.py --seeds {' '.join(seeds)} --steps {args.steps} "
        f"--eval-every {args.eval_every}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {cpu_name()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}. "
        + ("Re-rendered from the saved per-seed results (--resume); the binarize stage's seconds per run are in "
           "the table.  " if args.resume else f"Wall time of this invocation: {seconds / 60:.1f} min.  "),
        f"Base: vit-bench trained {BASE_TRAIN.steps} steps per seed (AdamW lr {BASE_TRAIN.lr}). Each variant: the "
        f"binarize stage from it, {args.steps} steps, lr {BINARIZE_LR}, 20 warmup, cosine; binary weights (BWN) and "
        "binary activations in every Linear but the head, binary Q/K/V and attention probabilities; loss = soft CE "
        f"on the fp32 model's logits + MSE on block outputs + {LABEL_LOSS:g} x ground-truth CE. Test split: 270 "
        "images (1 image = 0.37 pt).",
        "",
        "| seed | fp32 test | W1A1 + rank-1 estimators: val after calibration -> after training / test | W1A1 "
        "without estimators: val after calibration -> after training / test | estimators gain (pt) | stage "
        "seconds (with / without) |",
        "|---|---|---|---|---|---|",
    ]
    for s, run in zip(seeds, r):
        a, b = run["w1a1+est"], run["w1a1"]
        lines.append(f"| {s} | {run['fp32_test']:.4f} | {a['val']['calibrated']:.4f} -> {a['val']['trained']:.4f} / "
                     f"{a['test']:.4f} | {b['val']['calibrated']:.4f} -> {b['val']['trained']:.4f} / {b['test']:.4f} "
                     f"| {(a['test'] - b['test']) * 100:+.2f} | {a['seconds']:.0f} / {b['seconds']:.0f} |")
    gains = [run["w1a1+est"]["test"] - run["w1a1"]["test"] for run in r]
    lines += ["", f"Mean over seeds: fp32 {mean_sd([x['fp32_test'] for x in r])} %, W1A1 + estimators "
              f"{mean_sd([x['w1a1+est']['test'] for x in r])} %, W1A1 {mean_sd([x['w1a1']['test'] for x in r])} %; "
              f"estimators gain {mean_sd(gains)} pt (the paper reports +1.6 GLUE points on BERT).  ",
              "Parameters with estimators: " + ", ".join(str(x["w1a1+est"]["params"]) for x in r[:1])
              + f" (without: {r[0]['w1a1']['params']}).", ""]
    if all("ort" in x["w1a1"] for x in r):
        lines += ["## On ONNX Runtime: the exported artifacts", "",
                  "| seed | model | ORT test | top-1 agreement / SQNR (dB) vs PyTorch | binary weights: bytes "
                  "(fp32 bytes / ratio) | file bytes (fp32 file / ratio) |", "|---|---|---|---|---|---|"]
        for s, run in zip(seeds, r):
            fp32_file = run["fp32_ort"]["file_bytes"]
            for name in ("fp32", *VARIANTS):
                o = run["fp32_ort"] if name == "fp32" else run[name]["ort"]
                bw = (f"{o['binary_weight_bytes']} ({4 * o['binary_weights']} / "
                      f"{4 * o['binary_weights'] / o['binary_weight_bytes']:.1f}x)" if o["binary_weights"] else "-")
                lines.append(f"| {s} | {name.upper()} | {o['test']:.4f} | {o['agreement']:.4f} / {o['sqnr_db']:.1f} "
                             f"| {bw} | {o['file_bytes']} ({fp32_file} / {fp32_file / o['file_bytes']:.2f}x) |")
        lines += ["", "Binary weights are stored packed, 1 bit each (uint8, 8 per byte; ONNX has no 1-bit type), "
                  "with one fp32 scale per tensor and an unpack chain of standard ops that ORT constant-folds at "
                  "load, so at run time they are resident as fp32. The file also holds the full-precision parts "
                  "(patch embedding, norms, position embeddings, head, estimators, activation scales and biases).",
                  ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
