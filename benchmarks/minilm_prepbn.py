"""PRepBN on all-MiniLM-L6-v2 (issue 8: "try PRepBN on this post-LN model, keep it only if it helps").

Starts from a stage checkpoint of the MiniLM recipe (normally the 5%-pruned one that
`benchmarks/minilm_edge.py --keep-run DIR` leaves in DIR/stages/0-prune/checkpoint) and runs

1. `edgeprep reparam CKPT --norm prepbn --steps N --lr LR` (LayerNorm -> PRepBN, distilled from the
   checkpoint's model; the targets stay the original model's embeddings);
2. `edgeprep export` of both checkpoints to ONNX (fp32, dynamic batch and sequence): the LayerNorm
   model and the PRepBN model with its BatchNorms folded away;
3. quality (mean / min cosine, top-10 overlap vs the PyTorch fp32 original, 300 held-out sentences
   at sequence 128) and ORT latency (batch 1, sequence 32 and 128, 1 and 2 threads, p50, median of
   interleaved rounds), the same measurement as minilm_edge.py.

    .venv/bin/python benchmarks/minilm_prepbn.py --checkpoint DIR [--steps 300] [--lr 1e-4]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch
from common import publish  # a sibling script: benchmarks/ is on sys.path
from minilm_peers import add_measure_args, measure_all  # sibling scripts: benchmarks/ is on sys.path
from ptq_table import cpu_name

from edgeprep.models.hf import load_sentence_encoder, minilm_dir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "minilm_prepbn.md"
COLS = [(32, 1), (32, 2), (128, 1), (128, 2)]


def cli(*args: str) -> None:
    done = subprocess.run([str(Path(sys.executable).parent / "edgeprep"), *args], cwd=ROOT, text=True,
                          capture_output=True)
    if done.returncode != 0:
        sys.exit(f"edgeprep {' '.join(args)} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    print(done.stdout.strip(), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="a MiniLM recipe stage checkpoint (float)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-4)
    add_measure_args(ap, RESULTS)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeprep-minilm-prepbn-") as tmp:
        work = Path(tmp)
        t_reparam = time.perf_counter()
        cli("reparam", str(args.checkpoint), "-o", str(work / "prepbn"), "--steps", str(args.steps),
            "--lr", str(args.lr))
        t_reparam = time.perf_counter() - t_reparam
        models = {}
        for name, ckpt in (("LayerNorm (the checkpoint)", args.checkpoint), ("PRepBN, folded", work / "prepbn")):
            out = work / f"onnx-{len(models)}"
            cli("export", str(ckpt), "-t", "onnx", "-o", str(out), "--dynamic-sequence")
            models[name] = (out / "model.onnx", "extended", False)
        ops = {n: [node.op_type for node in onnx.load(str(p)).graph.node] for n, (p, _, _) in models.items()}
        torch.set_num_threads(2)
        model, tok = load_sentence_encoder(minilm_dir())
        quality, sizes, latency = measure_all(models, model, tok, args.sentences, args.rounds, args.iters)
    p50 = {k: statistics.median(v) for k, v in latency.items()}
    ref = next(iter(models))
    lines = [
        "# PRepBN on all-MiniLM-L6-v2 (fp32, ONNX Runtime)", "",
        f"Command: `.venv/bin/python benchmarks/minilm_prepbn.py --checkpoint {args.checkpoint} --steps {args.steps} "
        f"--lr {args.lr} --rounds {args.rounds} --iters {args.iters}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {cpu_name()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}. Wall time {(time.perf_counter() - t0) / 60:.1f} min "
        f"(reparam stage {t_reparam / 60:.1f} min).  ",
        f"Quality: {args.sentences} held-out sentences at sequence 128 vs the PyTorch fp32 original. Latency: batch 1, "
        f"p50 ms, median of {args.rounds} interleaved rounds of {args.iters} calls.", "",
        "| model | LayerNormalization / BatchNormalization nodes | mean cosine | min cosine | top-10 overlap | "
        + " | ".join(f"p50 seq {s} / {t} thr" for s, t in COLS) + " | "
        + " | ".join(f"vs LayerNorm seq {s} / {t} thr" for s, t in COLS) + " |",
        "|---|---|---|---|---|" + "---|" * (2 * len(COLS)),
    ]
    for name in models:
        q = quality[name]
        lines.append(f"| {name} | {ops[name].count('LayerNormalization')} / {ops[name].count('BatchNormalization')} | "
                     f"{q['mean_cosine']:.5f} | {q['min_cosine']:.5f} | {q['topk_overlap']:.3f} | "
                     + " | ".join(f"{p50[name, s, t]:.3f}" for s, t in COLS) + " | "
                     + " | ".join(f"{p50[ref, s, t] / p50[name, s, t]:.2f}x" for s, t in COLS) + " |")
    text = "\n".join(lines + [""])
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
