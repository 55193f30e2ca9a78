"""Attention latency on ONNX Runtime vs token count: softmax attention vs Simplified Linear Attention.

One attention layer of vit-bench's width (dim 192, 3 heads of 64) on an N-token square grid,
N in {64, 256, 1024, 4096}, each exported to ONNX by edgeprep's exporter (SLA in its export form,
SLAInference, with its 5x5 depthwise conv on V) and profiled on ORT at batch 1, 1 thread, in
interleaved rounds. Two measurements per N:
- the layer: Q/K/V and output projections included (what a block really runs). The projections
  are the same work in both and grow linearly, so they bound the ratio at any N;
- the attention core: from the projected Q, K, V to the output before the output projection,
  the part where the two methods differ (softmax(QK^T)V vs SLA + DWConv(V)).
ORT graph optimization level "all" (ORT's own default for a session): at "extended" the depthwise
conv is not moved to ORT's NCHWc kernels and takes ~2 ms at N = 1024 instead of ~0.12 ms.

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
from ptq_table import cpu_name  # a sibling script: benchmarks/ is on sys.path

from edgeprep.exporters import get_exporter, get_runtime
from edgeprep.exporters.onnx import OnnxOptions
from edgeprep.fsutil import write_text_atomic
from edgeprep.models.vit import Attention
from edgeprep.reparam.sla import SimplifiedLinearAttention, SLAInference

RESULTS = Path(__file__).resolve().parent / "results" / "attention_latency.md"
DIM, HEADS = 192, 3


class SoftmaxCore(torch.nn.Module):
    """Our ViT Attention between its projections: Q, K, V [B, N, inner] -> output [B, N, inner]."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, tokens, inner = q.shape
        q, k, v = (t.reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        probs = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return (probs @ v).transpose(1, 2).reshape(batch, tokens, inner)


class SLACore(torch.nn.Module):
    """SLAInference between its projections: channel-first Q, K, V [B, inner, N] (the layout its
    projections produce) -> channel-first output."""

    def __init__(self, sla: SLAInference):
        super().__init__()
        self.sla = sla

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.sla.mix(q, k, v)


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
    return {"softmax": softmax, "sla": SLAInference(sla.eval()).eval()}


def cores(layer: dict[str, torch.nn.Module], x: torch.Tensor) -> dict[str, tuple[torch.nn.Module, tuple]]:
    """The attention cores and their inputs: each layer's own projections of ``x``."""
    softmax, sla = layer["softmax"], layer["sla"]
    with torch.no_grad():
        q, k, v = softmax.qkv(x).chunk(3, dim=-1)
        projected = sla.project(x)
    return {"softmax": (SoftmaxCore(softmax).eval(), (q.contiguous(), k.contiguous(), v.contiguous())),
            "sla": (SLACore(sla).eval(), tuple(t.contiguous() for t in projected))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=1.0, help="timed time per artifact per round (about)")
    ap.add_argument("--optimize", default="all", help="ORT graph optimization level (see the docstring)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    exporter, rt = get_exporter("onnx"), get_runtime("onnxruntime")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.tokens:
            x = torch.randn(2, n, DIM)
            layer = layers(n)
            cases = {("layer", name): (m, (x,)) for name, m in layer.items()}
            cases.update({("core", name): mc for name, mc in cores(layer, x).items()})
            loaded, inputs, p50s = {}, {}, {}
            for (part, name), (module, example) in cases.items():
                art = exporter.export(module, example, Path(tmp) / f"{part}-{name}-{n}",
                                      OnnxOptions(optimize=args.optimize))
                loaded[part, name] = rt.load(art, threads=1)
                inputs[part, name] = [np.ascontiguousarray(t[:1].numpy()) for t in example]
                with torch.no_grad():
                    ref = module(*(t[:1] for t in example)).numpy()
                got = loaded[part, name].run(inputs[part, name])[0]
                assert np.abs(got - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max()), f"{part} {name} N={n}: ORT != torch"
                p50s[part, name] = []
            # iterations per round from one timed call, so every size takes about --min-seconds
            t0 = time.perf_counter()
            loaded["layer", "softmax"].run(inputs["layer", "softmax"])
            iters = int(max(20, min(500, args.min_seconds / max(time.perf_counter() - t0, 1e-5))))
            for _ in range(args.rounds):
                for key in loaded:
                    p50s[key].append(loaded[key].profile(inputs[key], warmup=5, iters=iters).p50_ms)
            rows.append((n, iters, {key: statistics.median(v) for key, v in p50s.items()}))
    text = render(rows, args, time.perf_counter() - t_start)
    print(text)
    write_text_atomic(args.out, text)
    return 0


def render(rows, args, seconds: float) -> str:
    lines = [
        "# Attention latency vs token count on ONNX Runtime: softmax vs SLA",
        "",
        f"Command: `.venv/bin/python benchmarks/attention_latency.py --tokens {' '.join(str(r[0]) for r in rows)} "
        f"--rounds {args.rounds} --optimize {args.optimize}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {cpu_name()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}. "
        f"Wall time: {seconds / 60:.1f} min. 1-minute load average at the end: {os.getloadavg()[0]:.2f}.  ",
        f"dim {DIM}, {HEADS} heads; batch 1, 1 thread, ORT optimization level {args.optimize}; p50 = median of "
        f"{args.rounds} interleaved per-round p50s. Layer: Q/K/V + output projections included. Core: from the "
        "projected Q, K, V to the output before the output projection.",
        "",
        "| tokens N | calls / round | layer: softmax p50 (ms) | layer: SLA p50 (ms) | layer: softmax / SLA "
        "| core: softmax p50 (ms) | core: SLA p50 (ms) | core: softmax / SLA | SLA layer growth vs previous N "
        "| softmax layer growth vs previous N |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    prev = None
    for n, iters, p in rows:
        ls, la, cs, ca = p["layer", "softmax"], p["layer", "sla"], p["core", "softmax"], p["core", "sla"]
        growth = ("-", "-") if prev is None else (f"{la / prev['layer', 'sla']:.2f}x",
                                                  f"{ls / prev['layer', 'softmax']:.2f}x")
        lines.append(f"| {n} | {iters} | {ls:.3f} | {la:.3f} | {ls / la:.2f}x | {cs:.3f} | {ca:.3f} | {cs / ca:.2f}x "
                     f"| {growth[0]} | {growth[1]} |")
        prev = p
    lines += ["", "Each step multiplies N by 4: linear cost grows 4x per row, quadratic cost 16x.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
