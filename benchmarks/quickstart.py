"""Quickstart acceptance numbers: wall time of `edgeprep run quickstart` (after install), baseline
accuracy, the final (pruned + int8 QAT) artifact's accuracy, size, ORT parity and integer-op share.
Writes benchmarks/results/quickstart.md.

Usage: .venv/bin/python benchmarks/quickstart.py [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "edgeprep", "run", "quickstart", "--out", f"{tmp}/run",
                                   "--quiet"], capture_output=True, text=True)
            wall_s = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(proc.stderr)
            report = json.loads(Path(f"{tmp}/run/report.json").read_text())
        arts = {a["name"]: a for a in report["artifacts"]}
        onnx, base = arts["onnx"], arts.get("onnx-baseline", arts["onnx"])
        stage_s = {s["kind"]: s["seconds"] for s in report["stages"]}
        rows.append((i + 1, wall_s, stage_s.get("finetune", 0.0), stage_s.get("prune", 0.0),
                     report["baseline"]["metric"]["value"], base["metric"]["value"], onnx["metric"]["value"],
                     report["baseline"]["params"], report["model"]["params"], onnx["parity"]["sqnr_db"],
                     onnx["parity"]["max_abs"], base["latency_ms"]["p50"], onnx["latency_ms"]["p50"],
                     onnx.get("speedup"), stage_s.get("qat", 0.0), base["bytes"], onnx["bytes"],
                     (onnx.get("precision") or {}).get("low_precision_op_fraction")))
    load = os.getloadavg()[0]
    lines = [
        "# Quickstart (`edgeprep run quickstart`)",
        "",
        f"Command: `.venv/bin/python benchmarks/quickstart.py --repeats {args.repeats}`  ",
        f"Date: {datetime.now(timezone.utc).date()}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; 1-min load average after: {load:.2f}",
        "",
        "| run | wall s (whole CLI call) | finetune s | prune s | qat s | baseline acc (PyTorch) | baseline ONNX acc (ORT) "
        "| final ONNX acc (ORT) | params before -> after | bytes before -> after | integer-op share | final SQNR dB "
        "vs PyTorch | final max abs | baseline / final ORT p50 ms | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sq = "identical" if r[9] is None else f"{r[9]:.1f}"
        speed = "-" if r[13] is None else f"{r[13]:.2f}x"
        share = "-" if r[17] is None else f"{r[17]:.2f}"
        lines.append(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.1f} | {r[14]:.1f} | {r[4]:.4f} | {r[5]:.4f} "
                     f"| {r[6]:.4f} | {r[7]:,} -> {r[8]:,} | {r[15]:,} -> {r[16]:,} | {share} | {sq} | {r[10]:.2e} "
                     f"| {r[11]:.3f} / {r[12]:.3f} | {speed} |")
    text = "\n".join(lines) + "\n"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "quickstart.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
