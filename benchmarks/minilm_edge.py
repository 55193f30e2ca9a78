"""Issue 8's acceptance run: recipes/minilm-edge.yaml end to end, then its ONNX artifact against the
peers a user has today (benchmarks/minilm_peers.py), all measured in this one process.

1. Runs `edgeprep run recipes/minilm-edge.yaml` (wall time: the issue asks < 30 min on 2 cores),
   unless --run DIR reuses a finished run.
2. Quality of every model on the same held-out sentences at sequence 128 vs the PyTorch fp32
   model: mean / min cosine and top-10 retrieval overlap. The recipe's test split is the first 316
   sentences of the hash-ordered corpus; these are its first --sentences, never trained on.
3. Latency: batch 1, sequence 32 and 128, 1 and 2 threads, p50 of --iters calls, median of --rounds
   interleaved rounds (edgeprep's artifact inside the same rounds as the peers).
4. The ORT artifact against the PyTorch compressed model (the run's last checkpoint), per
   sentence, at sequence 32 and 128 (the issue: cosine >= 0.999 for every sentence).

    .venv/bin/python benchmarks/minilm_edge.py [--run DIR | --keep-run DIR] [--rounds 5] [--iters 100]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from minilm_peers import (  # sibling scripts: benchmarks/ is on sys.path
    add_measure_args,
    build_peers,
    feed_for,
    measure_all,
    table_lines,
)
from ptq_table import cpu_name

from edgeprep.checkpoint import load_checkpoint
from edgeprep.exporters.onnxruntime_rt import create_session
from edgeprep.exporters.residual_sum import residual_adds_to_sum
from edgeprep.fsutil import write_text_atomic
from edgeprep.measure.embedding import cosines
from edgeprep.models.hf import load_sentence_encoder, minilm_dir, pack, tokenize
from edgeprep.text_corpus import corpus_digest, split

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "minilm-edge.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "minilm_edge.md"
EDGEPREP = "edgeprep int8 (pruned + QAT)"
DYN = "ORT dynamic int8 per-channel (optimum)"
DYN_SUM = "ORT dynamic int8 per-channel + residual Sum"
COLS = [(32, 1), (32, 2), (128, 1), (128, 2)]


def run_recipe(out: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "edgeprep"), "run", str(RECIPE), "--out", str(out),
                           "--force"], cwd=ROOT, text=True, capture_output=True)
    seconds = time.perf_counter() - t0
    if done.returncode not in (0, 1):  # 1: a gate failed; the numbers are still wanted
        sys.exit(f"recipe run failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds


def runtime_vs_pytorch(run_dir: Path, onnx_path: Path, tok, sentences: int) -> dict[int, dict[str, float]]:
    """Per-sentence cosine of the ORT artifact to the PyTorch compressed model, at 32 and 128 tokens."""
    last = sorted((run_dir / "stages").iterdir(), key=lambda p: int(p.name.split("-")[0]))[-1]
    model = load_checkpoint(last / "checkpoint").model.eval()
    sess = create_session(onnx_path, "extended", threads=2)
    _, test = split(0, sentences)
    out = {}
    for seq in (32, 128):
        ids, mask = tokenize(tok, test, seq)
        with torch.no_grad():
            ref = model(pack(ids, mask)).numpy()
        got = np.concatenate([sess.run(None, feed_for(sess, ids[i:i + 50], mask[i:i + 50]))[0]
                              for i in range(0, len(ids), 50)])
        c = cosines(ref, got)
        out[seq] = {"min": float(c.min()), "mean": float(c.mean()), "max_abs": float(np.abs(ref - got).max())}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="a finished run of the recipe (skips step 1)")
    ap.add_argument("--keep-run", type=Path, default=None, help="run the recipe into this directory and keep it")
    add_measure_args(ap, RESULTS)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeprep-minilm-edge-") as tmp:
        run_dir = args.run or args.keep_run or Path(tmp) / "run"
        recipe_seconds = None if args.run else run_recipe(run_dir)
        report = json.loads((run_dir / "report.json").read_text())
        art = next(a for a in report["artifacts"] if a["role"] == "edgeprep" and a["target"] == "onnx")
        torch.set_num_threads(2)
        model, tok = load_sentence_encoder(minilm_dir())
        peers = build_peers(Path(tmp), model, tok)
        # fairness: the same residual-Sum rewrite edgeprep's export applies, on the peer to beat, so
        # the table separates what the rewrite buys from what pruning + QAT buy
        dyn_sum = Path(tmp) / "optimum-int8-pc-sum.onnx"
        shutil.copyfile(peers[DYN][0], dyn_sum)
        residual_adds_to_sum(dyn_sum)
        peers[DYN_SUM] = (dyn_sum, "extended", True)
        peers[EDGEPREP] = (Path(art["path"]), "extended", False)
        quality, sizes, latency = measure_all(peers, model, tok, args.sentences, args.rounds, args.iters)
        parity = runtime_vs_pytorch(run_dir, Path(art["path"]), tok, args.sentences)
    text = render(report, recipe_seconds, peers, quality, sizes, latency, parity, args,
                  time.perf_counter() - t_start)
    print(text)
    write_text_atomic(args.out, text)
    return 0


def render(report, recipe_seconds, peers, quality, sizes, latency, parity, args, seconds: float) -> str:
    import onnxruntime

    p50 = {k: statistics.median(v) for k, v in latency.items()}
    fp32, dyn = "optimum fp32", DYN
    prune = next((s["details"]["pruning"] for s in report["stages"] if s["kind"] == "prune"), None)
    lines = [
        "# all-MiniLM-L6-v2: edgeprep's recipe vs the ONNX Runtime peers (issue 8)", "",
        f"Command: `.venv/bin/python benchmarks/minilm_edge.py --rounds {args.rounds} --iters {args.iters}"
        + (f" --run {args.run}" if args.run else "") + "`  ",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {cpu_name()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}. Wall time "
        f"{seconds / 60:.1f} min; 1-minute load average at the end: {os.getloadavg()[0]:.2f}.  ",
        "Recipe run (`edgeprep run recipes/minilm-edge.yaml`): "
        + (f"{recipe_seconds / 60:.1f} min wall" if recipe_seconds is not None else "reused, not timed here")
        + "; stages: " + ", ".join(f"{s['kind']} {s['seconds'] / 60:.1f} min" for s in report["stages"]) + ".  ",
        (f"Pruned: MACs -{prune['removed']['macs']:.1%}, params -{prune['removed']['params']:.1%} (the embedding "
         "table is most of the params and is not pruned).  " if prune else ""),
        f"Quality: {args.sentences} held-out sentences (corpus digest {corpus_digest()[:12]}) at sequence 128 vs "
        f"the PyTorch fp32 model. Latency: batch 1, p50 ms, median of {args.rounds} interleaved rounds of "
        f"{args.iters} calls.", "",
    ] + table_lines(peers, quality, sizes, p50, COLS)
    q = quality[EDGEPREP]
    lines += ["", "Targets (issue 8) for edgeprep's artifact:", "",
              "| check | " + " | ".join(f"seq {s} / {t} thr" for s, t in COLS) + " |",
              "|---|" + "---|" * len(COLS)]
    for label, ref, goal in (("speedup vs optimum fp32 (>= 3x)", fp32, 3.0),
                             ("speedup vs per-channel dynamic int8 (>= 1.5x)", dyn, 1.5),
                             ("(same, the peer with the residual-Sum rewrite too)", DYN_SUM, 1.5)):
        vals = [p50[(ref, s, t)] / p50[(EDGEPREP, s, t)] for s, t in COLS]
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}x {'met' if v >= goal else 'MISSED'}" for v in vals) + " |")
    lines += ["", f"- mean cosine {q['mean_cosine']:.4f} (>= 0.98: {'met' if q['mean_cosine'] >= 0.98 else 'MISSED'}), "
              f"top-10 overlap {q['topk_overlap']:.3f} (>= 0.9: {'met' if q['topk_overlap'] >= 0.9 else 'MISSED'})"]
    for seq, p in parity.items():
        lines.append(f"- ORT artifact vs the PyTorch compressed model at sequence {seq}: per-sentence cosine min "
                     f"{p['min']:.6f} (>= 0.999: {'met' if p['min'] >= 0.999 else 'MISSED'}), mean {p['mean']:.6f}, "
                     f"max abs {p['max_abs']:.3g}")
    if recipe_seconds is not None:
        lines.append(f"- whole recipe on this machine: {recipe_seconds / 60:.1f} min (< 30: "
                     f"{'met' if recipe_seconds < 1800 else 'MISSED'})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
