"""Adapt-Pruner on vit-bench: accuracy of pruning variants over seeds, and ORT latency of the result.

For each seed: train the unpruned vit-bench (the project's training loop), then prune 50% of its
parameters with each variant below, every variant getting the same training budget (distillation
from the unpruned model):

  adaptive   incremental, adaptive allocation (A = 0.02), Taylor importance      (the method)
  uniform    incremental, uniform allocation, Taylor importance                  (A = 0)
  random     incremental, ERK allocation, random importance                      (random pruning)
  one-shot   one-shot, adaptive allocation, Taylor importance                    (same budget, one cut)

Then, for the first seed, the unpruned and the `adaptive` model are exported to ONNX and profiled on
ONNX Runtime in interleaved rounds (batch 1, 1 thread) in the same process: the latency ratio.

Per-run results are appended to a JSON file in --work as they finish, so an interrupted run resumes
(--resume); the Markdown table goes to stdout and benchmarks/results/prune_table.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from ptq_table import cpu_name  # a sibling script: benchmarks/ is on sys.path when run as a script

from edgeprep.checkpoint import load_checkpoint, save_checkpoint
from edgeprep.context import Context, StageReport
from edgeprep.data import load_data
from edgeprep.exporters import get_exporter, get_runtime
from edgeprep.exporters.onnx import OnnxOptions
from edgeprep.fsutil import write_json_atomic, write_text_atomic
from edgeprep.measure.cost import count_macs, count_params
from edgeprep.measure.parity import parity
from edgeprep.models import ZOO
from edgeprep.pipeline import frozen_copy
from edgeprep.recipe import DataConfig, ModelConfig, PruneConfig, TrainConfig
from edgeprep.stages.prune import PruneStage
from edgeprep.train import evaluate_accuracy, train

RESULTS = Path(__file__).resolve().parent / "results" / "prune_table.md"
VARIANTS = {
    "adaptive": dict(schedule="incremental", allocation="adaptive", importance="taylor"),
    "uniform": dict(schedule="incremental", allocation="uniform", importance="taylor"),
    "random": dict(schedule="incremental", allocation="erk", importance="random"),
    "one-shot": dict(schedule="one-shot", allocation="adaptive", importance="taylor"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--base-steps", type=int, default=300, help="training steps of the unpruned model")
    ap.add_argument("--prune-steps", type=int, default=300, help="training budget of each pruning run")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--iters", type=int, default=300, help="timed calls per artifact per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved profiling rounds")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeprep-prune-bench"))
    ap.add_argument("--resume", action="store_true", help="reuse finished runs recorded in --work")
    ap.add_argument("--latency-only", action="store_true",
                    help="only re-measure latency on the seed's saved unpruned/adaptive checkpoints in --work")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    runs_file = args.work / "runs.json"
    runs: dict = json.loads(runs_file.read_text()) if args.resume and runs_file.is_file() else {}
    data = load_data(DataConfig(source="digits32"))
    base_cfg = TrainConfig(steps=args.base_steps, batch_size=64, lr=args.lr, warmup_steps=30)
    latency: dict = {}
    t_start = time.perf_counter()
    if args.latency_only:
        base, pruned = (load_checkpoint(args.work / f"ckpt-{n}").model.eval() for n in ("unpruned", "adaptive"))
        runs["latency"] = measure_latency(base, pruned, data, args)
        write_json_atomic(runs_file, runs)
        args.seeds = [int(s) for s in runs if s != "latency"] or args.seeds
    for seed in ([] if args.latency_only else args.seeds):
        if args.resume and all(n in runs.get(str(seed), {}) for n in args.variants):
            continue  # everything for this seed is recorded: nothing to train again
        torch.manual_seed(seed)
        base = ZOO["vit-bench"].factory()
        t0 = time.perf_counter()
        train(base, data.train, base_cfg, seed=seed, progress=False, description=f"vit-bench seed {seed}")
        base.eval()
        base_acc = evaluate_accuracy(base, data.test)
        runs.setdefault(str(seed), {})["base"] = {"acc": base_acc, "params": count_params(base),
                                                  "seconds": round(time.perf_counter() - t0, 1)}
        print(f"seed {seed}: unpruned test acc {base_acc:.4f}", flush=True)
        for name in args.variants:
            if name in runs[str(seed)] and args.resume:
                continue
            model = copy.deepcopy(base)
            cfg = PruneConfig(pruning_ratio=args.ratio, **VARIANTS[name],
                              train={"steps": args.prune_steps, "lr": args.lr, "warmup_steps": 30})
            ctx = Context(data=data, train=base_cfg, example_inputs=(data.test.x[:2],), seed=seed,
                          report=StageReport(kind="prune"), teacher=frozen_copy(base), progress=False)
            t0 = time.perf_counter()
            model = PruneStage(cfg).apply(model, ctx).eval()
            info = ctx.report.metrics["pruning"]
            runs[str(seed)][name] = {
                "acc": evaluate_accuracy(model, data.test), "seconds": round(time.perf_counter() - t0, 1),
                "params_removed": info["removed"]["params"], "macs_removed": info["removed"]["macs"],
                "block_sparsity": info["history"][-1]["block_sparsity"],
                "kept": [(layer["module"], layer["kept"]) for layer in info["layers"]]}
            write_json_atomic(runs_file, runs)
            print(f"seed {seed} {name}: acc {runs[str(seed)][name]['acc']:.4f}, params -"
                  f"{info['removed']['params']:.1%} ({runs[str(seed)][name]['seconds']} s)", flush=True)
            if seed == args.seeds[0] and name == "adaptive":
                cfg_model = ModelConfig(source="vit-bench")
                save_checkpoint(args.work / "ckpt-unpruned", base, cfg_model, [], {})
                save_checkpoint(args.work / "ckpt-adaptive", model, cfg_model, list(ctx.decisions), {})
                latency = measure_latency(base, model, data, args)
                runs["latency"] = latency
                write_json_atomic(runs_file, runs)
    latency = runs.get("latency", {}) if args.latency_only else (latency or runs.get("latency", {}))
    text = render(runs, args, latency, time.perf_counter() - t_start)
    print(text)
    write_text_atomic(args.out, text)
    return 0


def measure_latency(base: torch.nn.Module, pruned: torch.nn.Module, data, args) -> dict:
    exporter, rt = get_exporter("onnx"), get_runtime("onnxruntime")
    opts = OnnxOptions(optimize="extended")
    out: dict = {}
    x1 = np.ascontiguousarray(data.test.x[:1].numpy())
    loaded = {}
    for name, model in (("unpruned", base), ("pruned", pruned)):
        art = exporter.export(model, (data.train.x[:2],), args.work / f"onnx-{name}", opts)
        loaded[name] = rt.load(art, threads=1)
        with torch.no_grad():
            ref = model(data.test.x).numpy()
        ort_out = np.concatenate([loaded[name].run([data.test.x[i:i + 128].numpy()])[0]
                                  for i in range(0, len(data.test.x), 128)])
        out[name] = {"bytes": art.size_bytes, "p50s": [],
                     "max_abs": float(np.abs(ort_out - ref).max()),
                     "ort_acc": float(np.mean(ort_out.argmax(-1) == data.test.y.numpy())),
                     "sqnr_db": parity([ref], [ort_out])["sqnr_db"],
                     "params": count_params(model), "macs": count_macs(model, (data.test.x[:1],))}
    for _ in range(args.rounds):
        for name in ("unpruned", "pruned"):
            out[name]["p50s"].append(loaded[name].profile([x1], warmup=30, iters=args.iters).p50_ms)
    for name in out:
        out[name]["p50"] = statistics.median(out[name]["p50s"])
    out["ratio"] = out["pruned"]["p50"] / out["unpruned"]["p50"]
    out["load_avg"] = os.getloadavg()[0]
    return out


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} ± {sd:.4f}"


def render(runs: dict, args, latency: dict, seconds: float) -> str:
    seeds = [s for s in map(str, args.seeds) if s in runs]
    # Training + pruning time of every recorded run (a --resume render re-times nothing).
    seconds = sum(v.get("seconds", 0.0) for s in seeds for v in runs[s].values())
    lines = [
        "# Adapt-Pruner on vit-bench: 50% of parameters removed",
        "",
        f"Command: `.venv/bin/python benchmarks/prune_table.py --seeds {' '.join(seeds)} --ratio {args.ratio} "
        f"--base-steps {args.base_steps} --prune-steps {args.prune_steps} --rounds {args.rounds}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {cpu_name()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
        f"runs took {seconds / 60:.1f} min in all (the first run shared the CPUs with other work).  ",
        f"Unpruned: vit-bench trained {args.base_steps} steps (AdamW, batch 64, lr {args.lr}). Each pruning run: "
        f"the same {args.prune_steps} training steps in total (distillation T=2, alpha=0.5 from the unpruned "
        "model; incremental = 10 stages of 5% with 30 steps after each), allocation steps of D = 0.02, "
        "calibration batches of 64 training images. Test set: 270 digits32 images (1 image = 0.37 pt).",
        "",
        "| variant | test top-1 (mean ± sd over seeds) | drop vs unpruned (pt) | params removed | MACs removed | per-seed top-1 |",
        "|---|---|---|---|---|---|",
    ]
    base = [runs[s]["base"]["acc"] for s in seeds]
    lines.append(f"| unpruned | {_mean_sd(base)} | 0 | 0 | 0 | {', '.join(f'{a:.4f}' for a in base)} |")
    for name in args.variants:
        accs = [runs[s][name]["acc"] for s in seeds if name in runs[s]]
        if not accs:
            continue
        drops = [100 * (runs[s]["base"]["acc"] - runs[s][name]["acc"]) for s in seeds if name in runs[s]]
        pr = [runs[s][name]["params_removed"] for s in seeds if name in runs[s]]
        mr = [runs[s][name]["macs_removed"] for s in seeds if name in runs[s]]
        sd = statistics.stdev(drops) if len(drops) > 1 else 0.0
        lines.append(f"| {name} | {_mean_sd(accs)} | {statistics.mean(drops):.2f} ± {sd:.2f} | "
                     f"{statistics.mean(pr):.2%} | {statistics.mean(mr):.2%} | {', '.join(f'{a:.4f}' for a in accs)} |")
    first = seeds[0] if seeds else None
    if first and "adaptive" in runs[first]:
        lines += ["", f"Per-block sparsity (share of each block's prunable params removed), seed {first}: "
                  + "; ".join(f"{n}: {', '.join(f'{x:.2f}' for x in runs[first][n]['block_sparsity'])}"
                              for n in args.variants if n in runs[first])]
    if latency:
        u, p = latency["unpruned"], latency["pruned"]
        lines += [
            "",
            f"## ONNX Runtime latency (seed {first}, batch 1, 1 thread, median of {args.rounds} interleaved rounds "
            f"of {args.iters} calls; 1-minute load average {latency['load_avg']:.2f})",
            "",
            "| model | params | MACs | ORT test top-1 | ORT vs PyTorch max abs | p50 ms | round p50s (ms) | bytes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, r in (("unpruned", u), ("pruned (adaptive)", p)):
            lines.append(f"| {label} | {r['params']:,} | {r['macs']:,} | {r['ort_acc']:.4f} | {r['max_abs']:.2e} | "
                         f"{r['p50']:.3f} | {', '.join(f'{v:.3f}' for v in r['p50s'])} | {r['bytes']:,} |")
        lines += ["", f"Latency ratio pruned / unpruned: **{latency['ratio']:.3f}x** (target <= 0.65x)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
