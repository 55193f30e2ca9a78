"""ExecuTorch / XNNPACK before and after re-parameterization: delegate partitions and latency.

XNNPACK takes no ``native_layer_norm``, so every LayerNorm of a ViT splits the graph: the
ExecuTorch program hands over between XNNPACK and the portable CPU kernels around each one.
PRepBN folds the norms into the neighbouring Linears, so none is left. This measures, on
vit-bench at batch 1 and 1 thread: the LN model, the PRepBN model (folded) and PRepBN+SLA (folded,
SLA in its export form), each lowered to XNNPACK and run by ExecuTorch's runtime: delegate
partitions, ops left outside XNNPACK, p50 latency (interleaved rounds), and parity with PyTorch.

The models are the trained ones `benchmarks/reparam_table.py` saved for a seed (--models), so the
parity is on real weights; without them it uses freshly initialized models (latency and
partitions do not depend on the weights).

    .venv/bin/python benchmarks/reparam_executorch.py [--models /tmp/edgeprep-reparam-bench/seed2/models.pt]
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
import torch
from ptq_table import cpu_name  # sibling script: benchmarks/ is on sys.path

from edgeprep.data import load_data
from edgeprep.exporters import get_exporter, get_runtime
from edgeprep.exporters.executorch import ExecuTorchOptions
from edgeprep.fsutil import write_text_atomic
from edgeprep.measure.parity import sqnr_db
from edgeprep.models import ZOO
from edgeprep.recipe import DataConfig
from edgeprep.reparam.fold import export_form
from edgeprep.reparam.surgery import reparam_model
from edgeprep.validate import run_batched

RESULTS = Path(__file__).resolve().parent / "results" / "reparam_executorch.md"
NAMES = {"ln": "LN (as trained)", "prepbn": "PRepBN, folded", "prepbn+sla": "PRepBN + SLA, folded"}


def fresh_models() -> dict[str, torch.nn.Module]:
    out = {}
    for name, attention in (("ln", None), ("prepbn", "keep"), ("prepbn+sla", "sla")):
        torch.manual_seed(0)
        model = ZOO["vit-bench"].factory()
        if attention:
            reparam_model(model, "prepbn", attention, 0, 0)  # lam = 0: the folded form exists
        out[name] = model.eval()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=Path("/tmp/edgeprep-reparam-bench/seed2/models.pt"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    trained = args.models.is_file()
    models = torch.load(args.models, weights_only=False) if trained else fresh_models()
    data = load_data(DataConfig(source="digits32"))
    example = (data.train.x[:2],)
    x_test = data.test.x.numpy()
    exporter, rt = get_exporter("executorch"), get_runtime("executorch")
    rows, loaded = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in NAMES:
            model = models[name].eval()
            art = exporter.export(export_form(model, example), example, Path(tmp) / name, ExecuTorchOptions())
            loaded[name] = rt.load(art, threads=1)
            got = run_batched(loaded[name], x_test)
            with torch.no_grad():
                ref = model(data.test.x).numpy()
            rows[name] = {"xnnpack": art.info["xnnpack"], "bytes": art.size_bytes, "sqnr": sqnr_db(ref, got),
                          "test": float(np.mean(got.argmax(-1) == data.test.y.numpy())), "p50s": []}
        x1 = np.ascontiguousarray(x_test[:1])
        for _ in range(args.rounds):
            for name in NAMES:
                rows[name]["p50s"].append(loaded[name].profile([x1], warmup=20, iters=args.iters).p50_ms)
    text = render(rows, args, trained, time.perf_counter() - t0)
    print(text)
    write_text_atomic(args.out, text)
    return 0


def render(rows: dict, args, trained: bool, seconds: float) -> str:
    import importlib.metadata as md

    import executorch  # noqa: F401  (version below)

    ln_p50 = statistics.median(rows["ln"]["p50s"])
    lines = [
        "# ExecuTorch / XNNPACK before and after re-parameterization (vit-bench)", "",
        f"Command: `.venv/bin/python benchmarks/reparam_executorch.py --models {args.models} --rounds {args.rounds} "
        f"--iters {args.iters}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {cpu_name()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, executorch {md.version('executorch')}. "
        f"Wall time: {seconds / 60:.1f} min. 1-minute load average at the end: {os.getloadavg()[0]:.2f}.  ",
        ("Models: the trained ones saved by benchmarks/reparam_table.py (" + str(args.models) + ")." if trained else
         "Models: freshly initialized (no saved trained models found); test accuracy is meaningless here."),
        f"Batch 1, 1 thread (XNNPACK pool), p50 = median of {args.rounds} interleaved per-round p50s "
        f"({args.iters} calls each); parity vs the PyTorch model on the 270 test images.", "",
        "| model | XNNPACK partitions | ops outside XNNPACK | ET test | SQNR vs PyTorch (dB) | p50 (ms) | p50 / LN | bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in NAMES.items():
        r = rows[name]
        outside = ", ".join(f"{k} x{v}" for k, v in r["xnnpack"]["ops_outside_delegates"].items()) or "none"
        p50 = statistics.median(r["p50s"])
        lines.append(f"| {label} | {r['xnnpack']['partitions']} | {outside} | {r['test']:.4f} | {r['sqnr']:.1f} | "
                     f"{p50:.3f} | {p50 / ln_p50:.3f}x | {r['bytes']:,} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
