"""Profile the same ORT artifact twice in one process; print both p50s and their ratio.

Acceptance: the two p50s agree within 10% (ratio = larger / smaller <= 1.10).

    .venv/bin/python benchmarks/profile_repeatability.py [--artifact runs/quickstart/artifacts/onnx]

Without --artifact, vit-bench (untrained: weights do not change fp32 latency) is exported to a
temporary directory first. Writes benchmarks/results/profile_repeatability.md as well.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from edgeprep.exporters import get_exporter, get_runtime
from edgeprep.exporters.onnx import OnnxOptions
from edgeprep.fsutil import write_text_atomic
from edgeprep.manifest import load_artifact
from edgeprep.models import ZOO

RESULTS = Path(__file__).resolve().parent / "results" / "profile_repeatability.md"
LIMIT_RATIO = 1.10


def _profile_twice(artifact, warmup: int, iters: int, threads: int, batch: int):
    loaded = get_runtime(artifact.runtime).load(artifact, threads=threads)
    shape = [batch if isinstance(d, str) else int(d) for d in artifact.inputs[0].shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    return [loaded.profile([x], warmup=warmup, iters=iters) for _ in range(2)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, help="artifact directory (manifest.json); default: export vit-bench")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edgeprep-repeat-") as tmp:
        if args.artifact:
            artifact, what = load_artifact(args.artifact), str(args.artifact)
        else:
            torch.manual_seed(0)
            model = ZOO["vit-bench"].factory().eval()
            artifact = get_exporter("onnx").export(model, (torch.rand(2, 1, 32, 32),), Path(tmp) / "onnx",
                                                   OnnxOptions())
            what = "vit-bench fp32 ONNX (exported here)"
        first, second = _profile_twice(artifact, args.warmup, args.iters, args.threads, args.batch)
    ratio = max(first.p50_ms, second.p50_ms) / min(first.p50_ms, second.p50_ms)
    verdict = "PASS" if ratio <= LIMIT_RATIO else "FAIL"
    text = "\n".join([
        "# Profiling repeatability (same artifact, twice, one process)",
        "",
        f"Command: `.venv/bin/python benchmarks/profile_repeatability.py --iters {args.iters} "
        f"--warmup {args.warmup} --threads {args.threads} --batch {args.batch}`  ",
        f"Artifact: {what}; onnxruntime {onnxruntime.__version__}, {platform.machine()}, "
        f"batch {args.batch}, {args.threads} thread(s)  ",
        # Other processes on the same cores move a 1-thread p50 by up to ~40%; show how busy it was.
        f"1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
        f"({os.cpu_count()} CPUs)",
        "",
        "| run | p50 ms | 95% CI of p50 ms | p90 ms | p99 ms |",
        "|---|---|---|---|---|",
        *(f"| {i} | {s.p50_ms:.3f} | {s.ci95_p50_ms[0]:.3f} - {s.ci95_p50_ms[1]:.3f} | {s.p90_ms:.3f} "
          f"| {s.p99_ms:.3f} |" for i, s in ((1, first), (2, second))),
        "",
        f"p50 ratio (larger / smaller): {ratio:.3f} -> {verdict} (limit {LIMIT_RATIO:.2f})",
        "",
    ])
    print(text)
    write_text_atomic(args.out, text)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
