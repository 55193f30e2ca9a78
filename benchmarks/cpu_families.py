"""int8 on every CPU family: parity per family and speed on this host, before and after the fix.

One vit-bench model (32x32 digits, 64 tokens, dim 192, depth 6) is finetuned, then int8-QAT'd twice
from the same checkpoint: with full-range int8 weights ([-127, 127], `qat target_cpu: x86-vnni`,
edgeprep's form before the fix) and with reduced-range weights ([-63, 63], `target_cpu: portable`,
the new default). The full-range model is exported twice: int8 weights as trained, and stored as
uint8 + zero point 128 (`export int8_weights: u8`). Each artifact is validated against its own
PyTorch model on this host and on emulated CPU families (QEMU user mode: the families' real ORT
kernels; emulated latency is not a timing), then the three are timed on this host in interleaved
rounds (batch 1, 1 thread; median of the rounds' p50s).

    .venv/bin/python benchmarks/cpu_families.py [--rounds 7 --iters 200 --keep DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import publish  # noqa: E402

FAMILIES = ["native", "emu://x86-avx2", "emu://x86-sse4", "emu://arm64-a53", "emu://arm64-a76", "emu://arm64-max"]
FINETUNE = """\
name: cpu-families
seed: 0
model: {source: vit-bench}
data: {source: digits32, calibration_samples: 128}
train: {steps: 300, batch_size: 64, lr: 0.001, warmup_steps: 30}
stages:
  - kind: finetune
export:
  - target: onnx
validate:
  split: test
  profile: {warmup: 5, iters: 20, threads: 1, batch: 1}
"""
QAT = ["--steps", "200", "--label-loss", "1.0", "--lr", "0.0001"]  # as recipes/vit-bench-qat.yaml
FORMS = {  # label -> (qat target_cpu, export options)
    "full-range int8 weights [-127, 127] (before the fix)": ("x86-vnni", []),
    "full range stored uint8 + zp 128 (export --int8-weights u8)": ("x86-vnni", ["--int8-weights", "u8"]),
    "reduced range [-63, 63] (qat target_cpu: portable, the new default)": ("portable", []),
}


def cli(*args: str) -> str:
    proc = subprocess.run([str(REPO / ".venv/bin/edgeprep"), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"edgeprep {' '.join(args)}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def build(work: Path) -> dict[str, Path]:
    """One finetuned checkpoint; QAT twice from it (full / reduced range); three artifacts."""
    (work / "finetune.yaml").write_text(FINETUNE)
    print("finetune ...", flush=True)
    cli("run", str(work / "finetune.yaml"), "--out", str(work / "ft"), "--force", "--quiet")
    ckpt = work / "ft" / "stages" / "0-finetune" / "checkpoint"
    arts = {}
    for label, (cpu, export_opts) in FORMS.items():
        qat = work / f"qat-{cpu}"
        if not qat.exists():
            print(f"qat target_cpu {cpu} ...", flush=True)
            cli("qat", str(ckpt), "-o", str(qat), "--target-cpu", cpu, *QAT)
        art = work / f"art-{len(arts)}"
        cli("export", str(qat), "-t", "onnx", "-o", str(art), *export_opts)
        arts[label] = art
    return arts


def parity_by_family(art: Path) -> tuple[dict[str, float], dict]:
    """SQNR vs the artifact's own PyTorch model on each family (validate --device), and the host entry."""
    sqnr, host = {}, {}
    for fam in FAMILIES:
        print(f"  {art.name} on {fam}", flush=True)
        dev = [] if fam == "native" else ["--device", fam]
        entry = json.loads(cli("validate", str(art), "--json", "--min-sqnr-db", "0", *dev))
        sqnr[fam] = entry["parity"]["sqnr_db"]
        if fam == "native":
            host = entry
    return sqnr, host


def host_speed(paths: dict[str, Path], rounds: int, iters: int) -> dict[str, float]:
    """Median over interleaved rounds of each artifact's p50 (batch 1, 1 thread, this host)."""
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)
    sessions = {}
    for label, path in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        sessions[label] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    p50s: dict[str, list[float]] = {label: [] for label in paths}
    for _ in range(rounds):
        for label, sess in sessions.items():
            feed = {sess.get_inputs()[0].name: x}
            for _ in range(20):
                sess.run(None, feed)
            samples = []
            for _ in range(iters):
                t0 = time.perf_counter_ns()
                sess.run(None, feed)
                samples.append(time.perf_counter_ns() - t0)
            p50s[label].append(statistics.median(samples) / 1e6)
    return {label: statistics.median(v) for label, v in p50s.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--keep", type=Path, help="keep the run directories here (and reuse what is there)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from edgeprep.measure.host import cpu_label, host_cpu

    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="edgeprep-cpu-families-")
    work = args.keep or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    arts = build(work)
    results = {label: parity_by_family(art) for label, art in arts.items()}
    speed = host_speed({label: art / "model.onnx" for label, art in arts.items()}, args.rounds, args.iters)
    before = speed[next(iter(FORMS))]
    fams = [f.replace("emu://", "") for f in FAMILIES]
    host = results[next(iter(FORMS))][1]
    lines = [f"# int8 on every CPU family (benchmarks/cpu_families.py, {date.today()})", "",
             f"Host: {cpu_label(host_cpu())}; onnxruntime {host.get('runtime_version')}. Parity: SQNR (dB) of each "
             "artifact against its own PyTorch model on its 256 reference images (vit-bench test split), on this host "
             "(native) and on QEMU-emulated families (their ORT kernels; emulated latency is not a timing). Speed: "
             f"batch 1, 1 thread, median of {args.rounds} interleaved rounds of {args.iters} calls' p50, this host.",
             "", "| artifact | accuracy (ORT, 256 imgs) | " + " | ".join(f"SQNR {f}" for f in fams)
             + " | bytes | p50 ms (host) | vs before |",
             "|---|---|" + "---|" * len(fams) + "---|---|---|"]
    for label, art in arts.items():
        sqnr, entry = results[label]
        cells = ["identical" if sqnr[f] is None else f"{sqnr[f]:.1f}" for f in FAMILIES]
        size = (art / "model.onnx").stat().st_size
        lines.append(f"| {label} | {entry['metric']['value']:.4f} | " + " | ".join(cells)
                     + f" | {size:,} | {speed[label]:.3f} | {speed[label] / before:.2f}x |")
    publish("\n".join(lines) + "\n", REPO / "benchmarks" / "results" / "cpu_families.md")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
