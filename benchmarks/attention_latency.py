"""Attention latency on ONNX Runtime vs token count: softmax attention vs Simplified Linear Attention.

One attention layer of vit-bench's width (dim 192, 3 heads of 64) on an N-token square grid,
N in {64, 256, 1024, 4096}, each exported to ONNX by edgeprep's exporter (SLA with its 5x5
depthwise conv on V) and profiled on ORT at batch 1, 1 thread, in interleaved rounds. The layer
includes its Q/K/V and output projections (what a block really runs), so the ratio at small N is
dominated by them; the softmax attention's N^2 part shows as N grows.

    .venv/bin/python benchmarks/attention_latency.py [--tokens 64 256 1024 4096] [--rounds 5]
"""
from __future__ import annotations

import argparse
import math
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

from edgeprep.exporters import get_exporter, get_runtime
from edgeprep.exporters.onnx import OnnxOptions
from edgeprep.fsutil import write_text_atomic
from edgeprep.models.vit import Attention
from edgeprep.reparam.sla import SimplifiedLinearAttention
from ptq_table import cpu_name  # a sibling script: benchmarks/ is on sys.path

RESULTS = Path(__file__).resolve().parent / "results" / "attention_latency.md"
DIM, HEADS = 192, 3


def layers(tokens: int) -> dict[str, torch.nn.Module]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise SystemExit(f"--tokens {tokens} is not a square grid")
    torch.manual_seed(0)
    softmax = Attention(DIM, HEADS).eval()
    sla = SimplifiedLinearAttention.from_attention(softmax, tokens=tokens, grid=(side, side), prefix_tokens=0)
    with torch.no_grad():  # live conv and positional term, as after training
        sla.dwc.weight.normal_(0, 0.05)
        sla.pos.normal_(0, 0.05)
    return {"softmax": softmax, "sla": sla.eval()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=1.0, help="timed time per artifact per round (about)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    exporter, rt = get_exporter("onnx"), get_runtime("onnxruntime")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.tokens:
            x = torch.randn(2, n, DIM)
            loaded, p50s = {}, {}
            for name, layer in layers(n).items():
                art = exporter.export(layer, (x,), Path(tmp) / f"{name}-{n}", OnnxOptions(optimize="extended"))
                loaded[name] = rt.load(art, threads=1)
                with torch.no_grad():
                    ref = layer(x[:1]).numpy()
                got = loaded[name].run([np.ascontiguousarray(x[:1].numpy())])[0]
                assert np.abs(got - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max()), f"{name} N={n}: ORT != torch"
                p50s[name] = []
            x1 = np.ascontiguousarray(x[:1].numpy())
            # iterations per round from one timed call, so every size takes about --min-seconds
            t0 = time.perf_counter()
            loaded["softmax"].run([x1])
            iters = int(max(20, min(500, args.min_seconds / max(time.perf_counter() - t0, 1e-5))))
            for _ in range(args.rounds):
                for name in loaded:
                    p50s[name].append(loaded[name].profile([x1], warmup=5, iters=iters).p50_ms)
            rows.append((n, iters, {k: statistics.median(v) for k, v in p50s.items()}))
    text = render(rows, args, time.perf_counter() - t_start)
    print(text)
    write_text_atomic(args.out, text)
    return 0


def render(rows, args, seconds: float) -> str:
    lines = [
        "# Attention latency vs token count on ONNX Runtime: softmax vs SLA",
        "",
        f"Command: `.venv/bin/python benchmarks/attention_latency.py --tokens {' '.join(str(r[0]) for r in rows)} "
        f"--rounds {args.rounds}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {cpu_name()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}. "
        f"Wall time: {seconds / 60:.1f} min. 1-minute load average at the end: {os.getloadavg()[0]:.2f}.  ",
        f"One layer: dim {DIM}, {HEADS} heads, Q/K/V + output projections included; batch 1, 1 thread; p50 = "
        f"median of {args.rounds} interleaved per-round p50s.",
        "",
        "| tokens N | calls / round | softmax p50 (ms) | SLA p50 (ms) | softmax / SLA | softmax growth vs previous N "
        "| SLA growth vs previous N |",
        "|---|---|---|---|---|---|---|",
    ]
    prev = None
    for n, iters, p in rows:
        growth = ("-", "-") if prev is None else (f"{p['softmax'] / prev['softmax']:.2f}x",
                                                  f"{p['sla'] / prev['sla']:.2f}x")
        lines.append(f"| {n} | {iters} | {p['softmax']:.3f} | {p['sla']:.3f} | {p['softmax'] / p['sla']:.2f}x "
                     f"| {growth[0]} | {growth[1]} |")
        prev = p
    lines += ["", "Each step multiplies N by 4: linear cost grows 4x per row, quadratic cost 16x.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
