"""Quickstart acceptance numbers: wall time of `edgeprep run quickstart` (after install), baseline
accuracy, fp32 ORT parity. Writes benchmarks/results/quickstart.md.

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
        onnx = next(a for a in report["artifacts"] if a["name"] == "onnx")
        rows.append((i + 1, wall_s, report["stages"][0]["seconds"], report["baseline"]["metric"]["value"],
                     onnx["metric"]["value"], onnx["parity"]["sqnr_db"], onnx["parity"]["max_abs"],
                     onnx["latency_ms"]["p50"]))
    load = os.getloadavg()[0]
    lines = [
        "# Quickstart (`edgeprep run quickstart`)",
        "",
        f"Command: `.venv/bin/python benchmarks/quickstart.py --repeats {args.repeats}`  ",
        f"Date: {datetime.now(timezone.utc).date()}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; 1-min load average after: {load:.2f}",
        "",
        "| run | wall s (whole CLI call) | training s | baseline test acc (PyTorch) | ONNX acc (ORT) | SQNR dB | max abs | ORT p50 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sq = "identical" if r[5] is None else f"{r[5]:.1f}"
        lines.append(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.4f} | {r[4]:.4f} | {sq} | {r[6]:.2e} | {r[7]:.3f} |")
    text = "\n".join(lines) + "\n"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "quickstart.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
