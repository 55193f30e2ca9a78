#!/usr/bin/env bash
# Render report.html from a realistic sample report and screenshot it in headless Chromium, to look
# at the HTML in a real browser. Not part of the test suite; chromium is not a project dependency
# (Debian: apt-get install -y chromium).
# Usage: benchmarks/screenshot_report.sh [OUT_DIR]   -> OUT_DIR/report.html, OUT_DIR/report.png
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/edgeprep-report-sample}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
"$PY" - "$OUT" <<'PYEOF'
import sys
from pathlib import Path
from edgeprep.gates import evaluate_gates
from edgeprep.recipe import GatesConfig
from edgeprep.report import REPORT_SCHEMA, write_reports

def art(name, role, p50, metric, sqnr, nbytes, frac, ops, speedup, info):
    return {"name": name, "target": "onnx", "runtime": "onnxruntime", "role": role,
            "path": f"artifacts/{name}/model.onnx", "bytes": nbytes,
            "sha256": "9f2c1e7a" * 8,
            "parity": {"sqnr_db": sqnr, "max_abs": 0.0031 if sqnr else 0.0, "top1_agreement": 0.9972 if sqnr else 1.0},
            "metric": {"name": "accuracy", "value": metric},
            "latency_ms": {"p50": p50, "p90": p50 * 1.08, "p99": p50 * 1.3, "mean": p50 * 1.03, "iters": 200,
                           "threads": 1, "batch": 1, "ci95_p50": [p50 * 0.99, p50 * 1.01], "warmup": 20,
                           "peak_rss_bytes": 412_000_000},
            "precision": {"low_precision_op_fraction": frac, "ops": ops}, "speedup": speedup, "info": info,
            "runtime_version": "1.23.0", "memory": None}

report = {
    "schema": REPORT_SCHEMA, "recipe": "vit-bench-qat", "created": "2025-01-01T12:00:00+00:00",
    "edgeprep_version": "0.1.0",
    "machine": {"platform": "Linux-6.1-x86_64", "processor": "x86_64", "python": "3.11.7", "torch": "2.13.0+cpu",
                "cpu_threads": 2, "cpu": {"model": "AMD EPYC", "arch": "x86_64", "isa": ["avx2", "fma"], "cores": 2}},
    "model": {"name": "vit-bench", "params": 2_690_186, "macs": 176_947_200},
    "baseline": {"metric": {"name": "accuracy", "value": 0.9694}, "params": 2_690_186, "bytes": 10_784_512},
    "stages": [
        {"kind": "finetune", "seconds": 94.2, "params": 2_690_186, "macs": 176_947_200,
         "metric": {"name": "accuracy", "value": 0.9694}, "notes": ["trained 12 epochs from scratch"], "details": {}},
        {"kind": "qat", "seconds": 41.7, "params": 2_690_186, "macs": 176_947_200,
         "metric": {"name": "accuracy", "value": 0.9667},
         "notes": ["int8 weights (per-channel) + int8 activations on 36 Linear", "skipped head: <ignore> re:head"],
         "details": {}},
    ],
    "artifacts": [
        art("onnx-fp32", "baseline", 9.812, 0.9694, None, 10_784_512, 0.0, {"MatMul": 36, "Gemm": 1}, 1.0,
            {"exporter": "dynamo", "opset": 18}),
        art("onnx-ptq-dynamic", "ptq", 6.204, 0.9611, 31.42, 2_871_040, 1.0,
            {"DynamicQuantizeMatMul": 36, "MatMulInteger": 1}, 1.58, {"ptq": "dynamic"}),
        art("onnx-ptq-static", "ptq", 5.731, 0.9444, 27.9, 2_902_113, 0.973,
            {"QLinearMatMul": 36, "MatMul": 1}, 1.71, {"ptq": "static", "calibration": "minmax, 128 samples"}),
        art("onnx", "edgeprep", 5.402, 0.9667, 38.71, 2_889_744, 1.0, {"MatMulInteger": 37}, 1.82,
            {"exporter": "dynamo", "opset": 18, "quant": "QDQ from QAT <scales>"}),
    ],
}
gates = GatesConfig(max_metric_drop=0.01, min_sqnr_db=30, max_latency_ms_p90=5.5, min_speedup=1.5,
                    max_size_bytes=4_000_000)
report["gates"] = evaluate_gates(gates, report)
report["passed"] = all(g["passed"] for g in report["gates"])
paths = write_reports(Path(sys.argv[1]), report)
print(paths["html"])
PYEOF
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" \
  --screenshot="$OUT/report.png" --window-size=1280,1600 "file://$(realpath "$OUT/report.html")"
echo "$OUT/report.png"
