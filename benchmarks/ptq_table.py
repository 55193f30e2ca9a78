"""vit-bench on ONNX Runtime: fp32 vs ORT dynamic PTQ vs ORT static QDQ PTQ ("what users do today").

Trains vit-bench briefly on the 32x32 digits (fixed seed, the project's training loop), exports fp32
ONNX, derives ORT's two PTQ artifacts, and measures each one on ORT: test accuracy from ORT's
outputs, parity with PyTorch, p50 latency (batch 1, 1 thread), the precision census and bytes.
Writes a Markdown table to stdout and to benchmarks/results/ptq_table.md.

    .venv/bin/python benchmarks/ptq_table.py [--steps 300] [--iters 300] [--rounds 3]

Latency is measured in interleaved rounds (fp32, dynamic, static, fp32, ...) and the median of the
round p50s is reported, so a burst of load from another process does not land on one artifact only.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from common import publish  # a sibling script: benchmarks/ is on sys.path

from edgeprep.data import load_data
from edgeprep.exporters import get_exporter, get_runtime
from edgeprep.exporters.onnx import OnnxOptions
from edgeprep.measure.parity import parity
from edgeprep.models import ZOO
from edgeprep.recipe import DataConfig, TrainConfig
from edgeprep.train import evaluate_accuracy, train

RESULTS = Path(__file__).resolve().parent / "results" / "ptq_table.md"
LABELS = {"onnx": "fp32 ONNX", "onnx-ptq-dynamic": "ORT dynamic PTQ (int8 weights)",
          "onnx-ptq-static": "ORT static PTQ (QDQ, U8S8, MinMax)"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_batched(loaded, x: np.ndarray, batch: int = 128) -> np.ndarray:
    return np.concatenate([loaded.run([x[i:i + batch]])[0] for i in range(0, len(x), batch)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps (AdamW, batch 64)")
    ap.add_argument("--iters", type=int, default=300, help="timed calls per artifact per round")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved profiling rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    data = load_data(DataConfig(source="digits32"))
    model = ZOO["vit-bench"].factory()
    t0 = time.perf_counter()
    train(model, data.train, TrainConfig(steps=args.steps, batch_size=64, lr=1e-3, warmup_steps=30),
          seed=args.seed, progress=False, description="vit-bench")
    train_s = time.perf_counter() - t0
    model.eval()
    torch_acc = evaluate_accuracy(model, data.test)
    x_test, y_test = data.test.x.numpy(), data.test.y.numpy()
    with torch.no_grad():
        ref = model(data.test.x).numpy()

    exporter = get_exporter("onnx")
    opts = OnnxOptions(optimize="extended", ptq=["dynamic", "static"])
    rt = get_runtime("onnxruntime")
    with tempfile.TemporaryDirectory(prefix="edgeprep-ptq-bench-") as tmp:
        art = exporter.export(model, (data.train.x[:2],), Path(tmp) / "onnx", opts)
        artifacts = [art, *exporter.derived(art, [data.calib.numpy()], Path(tmp), opts)]
        loaded = {a.name: rt.load(a, threads=1) for a in artifacts}
        rows = {}
        for a in artifacts:
            out = run_batched(loaded[a.name], x_test)
            rows[a.name] = {"acc": float(np.mean(out.argmax(-1) == y_test)), "parity": parity([ref], [out]),
                            "census": loaded[a.name].precision_census(), "bytes": a.size_bytes, "p50s": [],
                            "p90s": []}
        x1 = np.ascontiguousarray(x_test[:1])
        for _ in range(args.rounds):
            for a in artifacts:
                stats = loaded[a.name].profile([x1], warmup=args.warmup, iters=args.iters)
                rows[a.name]["p50s"].append(stats.p50_ms)
                rows[a.name]["p90s"].append(stats.p90_ms)

    fp32_p50 = statistics.median(rows["onnx"]["p50s"])
    lines = [
        "# vit-bench on ONNX Runtime: fp32 vs ORT post-training quantization",
        "",
        f"Command: `.venv/bin/python benchmarks/ptq_table.py --steps {args.steps} --iters {args.iters} "
        f"--rounds {args.rounds}`  ",
        f"Machine: {cpu_name()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}  ",
        f"Model: vit-bench trained {args.steps} steps (AdamW, batch 64, seed {args.seed}, {train_s:.0f} s); "
        f"PyTorch fp32 test accuracy {torch_acc:.4f} on {len(y_test)} test images (digits32)  ",
        f"Calibration (static PTQ): {len(data.calib)} training images. ORT graph optimization: extended.  ",
        f"Latency: batch 1, 1 intra-op thread, median of {args.rounds} interleaved rounds of "
        f"{args.iters} timed calls ({args.warmup} warmup) each; 1-minute load average at the end: "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs.",
        "",
        "| artifact | ORT test acc | top-1 agree | SQNR dB | p50 ms | p90 ms | speedup | low-prec. op fraction "
        "| heavy ops in ORT's optimized graph | bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in artifacts:
        r = rows[a.name]
        p50, p90 = statistics.median(r["p50s"]), statistics.median(r["p90s"])
        c = r["census"]
        heavy = ", ".join(f"{op} {n}" for op, n in c["ops"].items()
                          if op not in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"))
        lines.append(f"| {LABELS.get(a.name, a.name)} | {r['acc']:.4f} | {r['parity']['top1_agreement']:.4f} "
                     f"| {r['parity']['sqnr_db']:.1f} | {p50:.3f} | {p90:.3f} | {fp32_p50 / p50:.2f}x "
                     f"| {c['low_precision_op_fraction']:.3f} | {heavy} | {r['bytes']:,} |")
    lines += ["", "Round p50s (ms): " + "; ".join(
        f"{a.name}: {', '.join(f'{v:.3f}' for v in rows[a.name]['p50s'])}" for a in artifacts), ""]
    text = "\n".join(lines)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
