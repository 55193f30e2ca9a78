"""PRepBN and SLA on vit-bench: the collapse test (LN vs direct BN swap vs RepBN vs PRepBN) and
the converted PRepBN(+SLA) model vs the LN / softmax model on ONNX Runtime.

For each seed:
  from scratch  vit-bench with its LayerNorms as they are (LN), swapped at once for plain BatchNorm
                (BN, the "direct swap"), for RepBN (BN + alpha x), or for PRepBN (LN decaying into
                RepBN: 10% warmup, 50% decay); same init, data order, steps and lr for all, labels
                only. Validation accuracy every --eval-every steps (curves), final test accuracy,
                and whether training collapsed (diverged, or ended below --collapse-below).
  converted     the trained LN model through the reparam stage (PRepBN, then PRepBN + SLA),
                --convert-steps steps distilled from it; exported to ONNX (folded: no LayerNorm,
                BatchNorm or Softmax) and measured on ORT next to the LN model's export: test
                accuracy, parity, p50 latency (batch 1, 1 thread, interleaved rounds).

Per-seed results go to a JSON file in --work as they finish (--resume continues); the Markdown
table to stdout and benchmarks/results/reparam_table.md, the curves to
benchmarks/results/reparam_curves.png.

    .venv/bin/python benchmarks/reparam_table.py [--seeds 0 1 2] [--steps 300] [--convert-steps 200]
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from common import mean_sd, save_curve_panels  # sibling scripts: benchmarks/ is on sys.path
from ptq_table import cpu_name, run_batched

from edgeprep.context import Context, StageReport
from edgeprep.data import load_data
from edgeprep.errors import TrainingDivergedError
from edgeprep.exporters import get_exporter, get_runtime
from edgeprep.exporters.onnx import OnnxOptions
from edgeprep.fsutil import write_json_atomic, write_text_atomic
from edgeprep.measure.parity import parity
from edgeprep.models import ZOO
from edgeprep.pipeline import frozen_copy
from edgeprep.recipe import DataConfig, ReparamConfig, TrainConfig
from edgeprep.reparam.fold import export_form
from edgeprep.reparam.norms import advance_all
from edgeprep.reparam.surgery import reparam_model
from edgeprep.stages.reparam import ReparamStage
from edgeprep.train import evaluate_accuracy, train

RESULTS = Path(__file__).resolve().parent / "results" / "reparam_table.md"
CURVES = RESULTS.with_name("reparam_curves.png")
BASE_TRAIN = TrainConfig(steps=300, batch_size=64, lr=1e-3, warmup_steps=30)  # as ptq/prune/qat tables
CONVERT_LR = 5e-4
SCRATCH = ("ln", "bn", "repbn", "prepbn")
CONVERTED = {"prepbn": "keep", "prepbn+sla": "sla"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=BASE_TRAIN.steps, help="from-scratch training steps")
    ap.add_argument("--convert-steps", type=int, default=200, help="reparam stage steps on the trained model")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--collapse-below", type=float, default=0.5,
                    help="final validation accuracy below this counts as collapsed (chance is 0.1)")
    ap.add_argument("--iters", type=int, default=300, help="timed calls per artifact per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeprep-reparam-bench"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--latency-only", action="store_true",
                    help="with --resume: re-profile the saved ONNX artifacts of every seed (a quieter machine)")
    ap.add_argument("--optimize", default="all",
                    help="ORT graph optimization level (ORT's default; at 'extended' SLA's depthwise conv "
                         "misses ORT's NCHWc kernels)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    runs_file = args.work / "reparam_runs.json"
    runs: dict[str, Any] = json.loads(runs_file.read_text()) if args.resume and runs_file.is_file() else {}
    t_start = time.perf_counter()
    data = load_data(DataConfig(source="digits32"))
    for seed in args.seeds:
        if str(seed) in runs or args.latency_only:
            continue
        runs[str(seed)] = run_seed(seed, data, args)
        write_json_atomic(runs_file, runs)
    if args.latency_only:
        from edgeprep.validate import artifact_from_path  # the bare model.onnx

        rt = get_runtime("onnxruntime")
        for seed, run in runs.items():
            work = args.work / f"seed{seed}"
            if (work / "models.pt").is_file():  # re-export with the current export form, then profile
                models = torch.load(work / "models.pt", weights_only=False)
                run["ort"] = measure_ort(models["ln"], {n: models[n] for n in CONVERTED}, data, args, int(seed))
                continue
            loaded = {name: rt.load(artifact_from_path(work / f"onnx-{name}" / "model.onnx"), threads=1)
                      for name in ("ln", *CONVERTED)}
            profile_rounds(loaded, run["ort"], np.ascontiguousarray(data.test.x[:1].numpy()), args)
        write_json_atomic(runs_file, runs)
    text = render(runs, args, time.perf_counter() - t_start)
    print(text)
    write_text_atomic(args.out, text)
    plot_curves(runs, CURVES)
    return 0


def from_scratch(norm: str, seed: int, data, args) -> tuple[torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(seed)
    model = ZOO["vit-bench"].factory()  # the same init for every variant of a seed
    if norm != "ln":
        reparam_model(model, norm, "keep", *ReparamConfig(norm=norm).schedule(args.steps))
    cfg = BASE_TRAIN.model_copy(update={"steps": args.steps, "eval_every": args.eval_every})
    t0 = time.perf_counter()
    out: dict[str, Any] = {"diverged_at": None}
    try:
        result = train(model, data.train, cfg, seed=seed, progress=False, description=f"scratch {norm}",
                       step_callbacks=[lambda step, m: advance_all(m)],
                       eval_fn=lambda m: {"val_accuracy": evaluate_accuracy(m, data.val)})
        history = result.history
    except TrainingDivergedError as exc:  # a collapse: recorded, the curve ends there
        out["diverged_at"] = str(exc).split(" diverged at step ", 1)[1].split(":", 1)[0]
        history = []
    model.eval()
    curve = [(h["step"], h["val_accuracy"]) for h in history if "val_accuracy" in h]
    out.update(seconds=time.perf_counter() - t0, curve=curve, test=evaluate_accuracy(model, data.test),
               final_loss=history[-1]["loss"] if history else None)
    final_val = curve[-1][1] if curve else 0.0
    out["collapsed"] = out["diverged_at"] is not None or final_val < args.collapse_below
    return model, out


def convert(base: torch.nn.Module, attention: str, seed: int, data, args) -> tuple[torch.nn.Module, dict]:
    student = copy.deepcopy(base)
    ctx = Context(data=data, train=BASE_TRAIN, example_inputs=(data.train.x[:2],), seed=seed,
                  report=StageReport(kind="reparam"), teacher=frozen_copy(base), progress=False)
    cfg = ReparamConfig(attention=attention, steps=args.convert_steps,
                        train={"lr": CONVERT_LR, "warmup_steps": 10, "eval_every": args.eval_every})
    t0 = time.perf_counter()
    ReparamStage(cfg).apply(student, ctx)
    info = ctx.report.metrics["reparam"]
    return student.eval(), {"seconds": time.perf_counter() - t0, "val": info["val_accuracy"],
                            "curve": [(h["step"], h["val_accuracy"]) for h in info["history"] if "val_accuracy" in h],
                            "test": evaluate_accuracy(student, data.test)}


def run_seed(seed: int, data, args) -> dict[str, Any]:
    out: dict[str, Any] = {"scratch": {}, "converted": {}}
    models = {}
    for norm in SCRATCH:
        models[norm], out["scratch"][norm] = from_scratch(norm, seed, data, args)
    base = models["ln"]  # the LN model trained from scratch is the conversion's starting point
    converted = {}
    for name, attention in CONVERTED.items():
        converted[name], out["converted"][name] = convert(base, attention, seed, data, args)
    out["ort"] = measure_ort(base, converted, data, args, seed)
    return out


def measure_ort(base, converted: dict, data, args, seed: int) -> dict[str, Any]:
    exporter, rt = get_exporter("onnx"), get_runtime("onnxruntime")
    work = args.work / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"ln": base, **converted}, work / "models.pt")  # benchmark scratch: lets --latency-only re-export
    example = (data.train.x[:2],)
    x_test, y_test = data.test.x.numpy(), data.test.y.numpy()
    rows, loaded = {}, {}
    for name, model in {"ln": base, **converted}.items():
        folded = export_form(model, example)  # what every exporter sees (edgeprep.artifacts)
        with torch.no_grad():
            fold_err = float((folded(data.test.x) - model(data.test.x)).abs().max())
            ref = model(data.test.x).numpy()
        art = exporter.export(folded, example, work / f"onnx-{name}", OnnxOptions(optimize=args.optimize))
        ops = collections.Counter(n.op_type for n in onnx.load(str(art.path)).graph.node)
        loaded[name] = rt.load(art, threads=1)
        got = run_batched(loaded[name], x_test)
        p = parity([ref], [got])
        rows[name] = {"ort_test": float(np.mean(got.argmax(-1) == y_test)), "sqnr_db": p["sqnr_db"],
                      "agreement": p["top1_agreement"], "fold_max_abs": fold_err,
                      "output_max_abs": float(np.abs(ref).max()), "bytes": art.size_bytes,
                      "norm_ops": sum(ops[k] for k in ("LayerNormalization", "BatchNormalization")),
                      "softmax_ops": ops["Softmax"], "nodes": sum(ops.values()), "p50s": []}
    profile_rounds(loaded, rows, np.ascontiguousarray(x_test[:1]), args)
    rows["form"] = {"sla": "SLAInference", "optimize": args.optimize}
    return rows


def profile_rounds(loaded: dict, rows: dict, x1: np.ndarray, args) -> None:
    """p50 per artifact in interleaved rounds (LN, PRepBN, PRepBN+SLA, LN, ...); the median of the rounds."""
    for name in loaded:
        rows[name]["p50s"] = []
    for _ in range(args.rounds):
        for name in loaded:
            rows[name]["p50s"].append(loaded[name].profile([x1], warmup=30, iters=args.iters).p50_ms)
    for name in loaded:
        rows[name]["p50"] = statistics.median(rows[name]["p50s"])
    rows["load_avg"] = os.getloadavg()[0]


def render(runs: dict, args, seconds: float) -> str:
    seeds = sorted(runs, key=int)
    r = [runs[s] for s in seeds]
    lines = [
        "# PRepBN and SLA on vit-bench (ONNX Runtime)",
        "",
        f"Command: `.venv/bin/python benchmarks/reparam_table.py --seeds {' '.join(seeds)} --steps {args.steps} "
        f"--convert-steps {args.convert_steps} --eval-every {args.eval_every} --iters {args.iters} "
        f"--rounds {args.rounds}`" + (" (latency re-measured with `--resume --latency-only`)" if args.latency_only
                                      else "") + "  ",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {cpu_name()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}. "
        f"Wall time of this invocation: {seconds / 60:.1f} min.  ",
        f"From scratch: vit-bench, {args.steps} steps, AdamW lr {BASE_TRAIN.lr}, {BASE_TRAIN.warmup_steps} warmup, "
        "cosine, batch 64, labels only; PRepBN lam: 10% warmup, 50% linear decay. Converted: the LN model "
        f"through the reparam stage, {args.convert_steps} steps, lr {CONVERT_LR}, KD (T 2, alpha 0.5) + "
        "block-output MSE to the LN model. Test split: 270 images (1 image = 0.37 pt).",
        "",
        "## Collapse test: same init, data order and steps for every norm (from scratch)",
        "",
        "| seed | " + " | ".join(f"{n.upper()} test" for n in SCRATCH) + " | collapsed |",
        "|---|" + "---|" * (len(SCRATCH) + 1),
    ]
    for s, run in zip(seeds, r):
        sc = run["scratch"]
        collapsed = [n for n in SCRATCH if sc[n]["collapsed"]]
        lines.append(f"| {s} | " + " | ".join(f"{sc[n]['test']:.4f}" for n in SCRATCH)
                     + f" | {', '.join(collapsed) or 'none'} |")
    lines.append("| mean ± sd (%) | " + " | ".join(mean_sd([run["scratch"][n]["test"] for run in r])
                                                    for n in SCRATCH) + " | |")
    lines += [
        "",
        "Collapsed = training diverged (NaN / inf) or final validation accuracy below "
        f"{args.collapse_below}. Validation curves: `benchmarks/results/{CURVES.name}`.",
        "",
        "## Converted from the trained LN model, exported folded, on ONNX Runtime",
        "",
        "| seed | model | PyTorch test | ORT test | ORT vs PyTorch SQNR (dB) / top-1 agree | fold max abs "
        "(output max) | LN+BN / Softmax nodes | p50 (ms) | p50 / LN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s, run in zip(seeds, r):
        o = run["ort"]
        for name in ("ln", *CONVERTED):
            torch_test = run["scratch"]["ln"]["test"] if name == "ln" else run["converted"][name]["test"]
            row = o[name]
            mark = "" if "form" in o else " (a)"
            lines.append(f"| {s}{mark} | {name.upper()} | {torch_test:.4f} | {row['ort_test']:.4f} | "
                         f"{row['sqnr_db']:.1f} / {row['agreement']:.4f} | {row['fold_max_abs']:.1e} "
                         f"({row['output_max_abs']:.1f}) | {row['norm_ops']} / {row['softmax_ops']} | "
                         f"{row['p50']:.3f} | {row['p50'] / o['ln']['p50']:.3f}x |")
    current = [run for run in r if "form" in run["ort"]] or r
    lines += ["", "Mean over seeds: " + "; ".join(
        f"{name.upper()} test {mean_sd([run['converted'][name]['test'] for run in r])} %, p50 / LN "
        f"{statistics.mean(run['ort'][name]['p50'] / run['ort']['ln']['p50'] for run in current):.3f}x"
        for name in CONVERTED) + f" (LN test {mean_sd([run['scratch']['ln']['test'] for run in r])} %); "
        f"p50 ratios over the {len(current)} seed(s) measured with the current export form.  ",
        "(a): ONNX exported before SLA had its export form (SLAInference) and at ORT level 'extended'; its "
        "latency is kept as measured then (the run saved no model to re-export) and left out of the mean.  "
        if len(current) < len(r) else "",
        f"Latency: batch 1, 1 thread, median of {args.rounds} per-round p50s ({args.iters} calls each), rounds "
        "interleaved in one process. 1-minute load average after profiling: "
        + ", ".join(f"{run['ort']['load_avg']:.2f}" for run in r) + ".", ""]
    return "\n".join(lines)


def plot_curves(runs: dict, path: Path) -> None:
    save_curve_panels(path, [(f"vit-bench from scratch, seed {s}",
                              [(name.upper(), "-", runs[s]["scratch"][name]["curve"]) for name in SCRATCH])
                             for s in sorted(runs, key=int)])


if __name__ == "__main__":
    sys.exit(main())
