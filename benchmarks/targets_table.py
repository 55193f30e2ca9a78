"""vit-bench on every export target, fp32 and int8, measured in one run (issue 7's table).

One vit-bench (trained 300 steps as the other tables) is exported to ONNX (ORT), ORT Mobile (.ort,
batch fixed to 1), ExecuTorch / XNNPACK and LiteRT, fp32 and int8 each (int8 = the runtime's own
post-training quantization, calibrated on the same 128 training images: ORT static QDQ, the same
QDQ model as .ort, PT2E + XNNPACKQuantizer, ai-edge-quantizer static_wi8_ai8); Core ML and TensorRT
artifacts are written and statically checked (their runtimes do not run on this machine).

Every runnable artifact runs the 270-image test split on its runtime: test accuracy, top-1
agreement and SQNR against the fp32 PyTorch model, and for int8 the top-1 agreement with its own
quantized reference (ORT: the same QDQ graph with graph optimizations off, i.e. float Q/DQ
simulation; ExecuTorch: the PT2E-quantized PyTorch program; LiteRT: the interpreter's reference
kernels). Latency: batch 1, 1 thread, median of --rounds interleaved rounds of --iters calls.
XNNPACK partitions (ExecuTorch, LiteRT): how many pieces the XNNPACK delegate took; 1 = the whole graph.

    .venv/bin/python benchmarks/targets_table.py [--rounds 3] [--iters 200]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ptq_table import cpu_name  # sibling script: benchmarks/ is on sys.path

from edgeprep.data import load_data
from edgeprep.exporters import get_exporter, get_runtime
from edgeprep.exporters.coreml import CoreMLOptions
from edgeprep.exporters.executorch import ExecuTorchOptions
from edgeprep.exporters.executorch import quantize_int8 as et_int8
from edgeprep.exporters.litert import LiteRTOptions
from edgeprep.exporters.litert import quantize_int8 as lt_int8
from edgeprep.exporters.onnx import OnnxOptions, write_ort_format
from edgeprep.exporters.onnx_ptq import ptq_peers
from edgeprep.exporters.onnxruntime_rt import create_session
from edgeprep.exporters.tensorrt import TensorRTOptions, quantize_for_tensorrt
from edgeprep.fsutil import write_text_atomic
from edgeprep.manifest import describe_file
from edgeprep.measure.parity import parity
from edgeprep.models import ZOO
from edgeprep.recipe import DataConfig, TrainConfig
from edgeprep.train import evaluate_accuracy, train
from edgeprep.validate import run_batched

RESULTS = Path(__file__).resolve().parent / "results" / "targets_table.md"
BASE_TRAIN = TrainConfig(steps=300, batch_size=64, lr=1e-3, warmup_steps=30)  # as the other tables


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    data = load_data(DataConfig(source="digits32"))
    model = ZOO["vit-bench"].factory()
    train(model, data.train, BASE_TRAIN, seed=args.seed, progress=False, description="vit-bench")
    model.eval()
    torch_acc = evaluate_accuracy(model, data.test)
    x, y = data.test.x.numpy(), data.test.y.numpy()
    with torch.no_grad():
        ref = model(data.test.x).numpy()
    example, calib = (data.train.x[:2],), [data.calib.numpy()]
    with tempfile.TemporaryDirectory(prefix="edgeprep-targets-") as tmp:
        root = Path(tmp)
        arts = export_all(model, example, calib, root)
        rows = measure(arts, x, y, ref, args)
    text = render(rows, torch_acc, len(data.calib), args, time.perf_counter() - t_start)
    print(text)
    write_text_atomic(args.out, text)
    return 0


def export_all(model, example, calib, root: Path) -> dict[str, dict[str, Any]]:
    """{label: {"artifact", "runtime", "precision", "quant_ref" (callable x -> logits or None)}}."""
    out: dict[str, dict[str, Any]] = {}
    onnx = get_exporter("onnx").export(model, example, root / "onnx", OnnxOptions())
    ptq = ptq_peers(onnx, calib, root, kinds=["static"])[0]
    out["ONNX Runtime fp32"] = {"artifact": onnx, "precision": "fp32"}
    out["ONNX Runtime int8"] = {"artifact": ptq, "precision": "int8", "quant_ref": _ort_reference(ptq.path)}
    for label, source in (("ORT Mobile fp32", onnx), ("ORT Mobile int8", ptq)):
        mobile = write_ort_format(source.path, fixed_batch=1)
        ort_path = source.dir / mobile["file"]
        spec = [dataclasses.replace(s, shape=(1, *s.shape[1:])) for s in source.inputs]
        art = describe_file(label, "ort-mobile", "onnxruntime", ort_path, spec, source.outputs, info={"mobile": mobile})
        out[label] = {"artifact": art, "precision": "fp32" if "fp32" in label else "int8"}
        if "int8" in label:
            out[label]["quant_ref"] = out["ONNX Runtime int8"]["quant_ref"]
    et = get_exporter("executorch").export(model, example, root / "executorch", ExecuTorchOptions(static_batch=1))
    et8 = et_int8(et, calib, root / "executorch-int8")
    out["ExecuTorch/XNNPACK fp32"] = {"artifact": et, "precision": "fp32"}
    out["ExecuTorch/XNNPACK int8"] = {"artifact": et8, "precision": "int8", "quant_ref": _pt2_reference(et8)}
    lt = get_exporter("litert").export(model, example, root / "litert", LiteRTOptions(static_batch=1))
    lt8 = lt_int8(lt, calib, root / "litert-int8")
    out["LiteRT fp32"] = {"artifact": lt, "precision": "fp32"}
    out["LiteRT int8"] = {"artifact": lt8, "precision": "int8", "quant_ref": _litert_reference(lt8)}
    cm = get_exporter("coreml").export(model, example, root / "coreml", CoreMLOptions())
    cm8 = get_exporter("coreml").export(model, example, root / "coreml-int8", CoreMLOptions(coreml_weights="int8"))
    out["Core ML fp16"] = {"artifact": cm, "precision": "fp16"}
    out["Core ML int8 weights"] = {"artifact": cm8, "precision": "int8 weights"}
    trt = get_exporter("tensorrt").export(model, example, root / "tensorrt", TensorRTOptions())
    out["TensorRT fp16"] = {"artifact": trt, "precision": "fp16"}
    out["TensorRT int8"] = {"artifact": quantize_for_tensorrt(trt, calib, root / "tensorrt-int8"), "precision": "int8"}
    return out


def _ort_reference(path: Path):
    session = create_session(path, "disable", threads=1)  # Q/DQ simulated in float: the QDQ graph's meaning
    name = session.get_inputs()[0].name
    return lambda xs: np.concatenate([session.run(None, {name: xs[i:i + 64]})[0] for i in range(0, len(xs), 64)])


def _pt2_reference(art):
    program = torch.export.load(str(art.dir / "program.pt2")).module()

    def run(xs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([program(torch.from_numpy(xs[i:i + 1])).numpy() for i in range(len(xs))])

    return run


def _litert_reference(art):
    from edgeprep.exporters.litert import LiteRTModel

    return lambda xs: run_batched(LiteRTModel(art, reference_kernels=True), xs)


def measure(arts: dict[str, dict[str, Any]], x: np.ndarray, y: np.ndarray, ref: np.ndarray, args) -> dict:
    rows: dict[str, dict[str, Any]] = {}
    loaded = {}
    for label, a in arts.items():
        art = a["artifact"]
        xnn = art.info.get("xnnpack_partitions", (art.info.get("xnnpack") or {}).get("partitions"))
        row = {"precision": a["precision"], "bytes": art.size_bytes, "runtime": art.runtime, "p50s": [],
               "xnnpack": xnn}
        usable, why = get_runtime(art.runtime).usable_here()
        if not usable:
            row["not_run"] = why
            row["check"] = _static_check(art)
            rows[label] = row
            continue
        loaded[label] = get_runtime(art.runtime).load(art, threads=1)
        got = run_batched(loaded[label], x)
        p = parity([ref], [got])
        row.update(acc=float(np.mean(got.argmax(-1) == y)), agree=p["top1_agreement"], sqnr=p["sqnr_db"])
        if a.get("quant_ref") is not None:
            qref = a["quant_ref"](x)
            row["agree_qref"] = float(np.mean(qref.argmax(-1) == got.argmax(-1)))
        rows[label] = row
    x1 = np.ascontiguousarray(x[:1])
    for _ in range(args.rounds):
        for label, m in loaded.items():
            rows[label]["p50s"].append(m.profile([x1], warmup=20, iters=args.iters).p50_ms)
    return rows


def _static_check(art) -> str:
    spec, support = art.info.get("spec"), art.info.get("tensorrt_support")
    if spec:
        weights = ", ".join(f"{k} {v['elements']:,}" for k, v in spec["weights"].items())
        return f"spec read back: {spec['deployment_target']}, {spec['compressed_weight_ops']} compressed weight ops; {weights}"
    if support:
        return (f"TensorRT {support['tensorrt_version']} op table: {support['supported_nodes']}/{support['nodes']} nodes "
                f"supported, {support['quantize_nodes']} Q / {support['dequantize_nodes']} DQ")
    return "-"


def render(rows: dict, torch_acc: float, n_calib: int, args, seconds: float) -> str:
    import onnxruntime

    from edgeprep.exporters.base import package_version

    fp32_p50 = {}
    for label, r in rows.items():
        if r["p50s"]:
            r["p50"] = statistics.median(r["p50s"])
            if r["precision"] == "fp32":
                fp32_p50[label.rsplit(" ", 1)[0]] = r["p50"]
    lines = [
        "# vit-bench on every export target: fp32 and int8 in one run",
        "",
        f"Command: `.venv/bin/python benchmarks/targets_table.py --rounds {args.rounds} --iters {args.iters}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {cpu_name()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, executorch "
        f"{package_version('executorch')}, ai-edge-litert {package_version('ai-edge-litert')}, coremltools "
        f"{package_version('coremltools')}. Wall time: {seconds / 60:.1f} min; 1-minute load average at the end "
        f"{os.getloadavg()[0]:.2f}.  ",
        f"Model: vit-bench trained {BASE_TRAIN.steps} steps (seed {args.seed}); PyTorch fp32 test accuracy "
        f"{torch_acc:.4f} (270 test images). int8 = each runtime's own PTQ, calibrated on the same {n_calib} "
        "training images.  ",
        f"Latency: batch 1, 1 thread, median of {args.rounds} interleaved rounds of {args.iters} calls (20 warmup).",
        "",
        "| target | precision | test acc | top-1 agree / SQNR dB vs fp32 PyTorch | top-1 agree vs its quantized "
        "reference | p50 ms | int8 speedup | XNNPACK partitions | bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        target = label.rsplit(" ", 1)[0] if label.endswith(("fp32", "int8", "fp16")) else label
        if "not_run" in r:
            lines.append(f"| {target} | {r['precision']} | not run here | {r['check']} | - | - | - | - | {r['bytes']:,} |")
            continue
        qref = f"{r['agree_qref']:.4f}" if "agree_qref" in r else "-"
        base = fp32_p50.get(target)
        speed = f"{base / r['p50']:.2f}x" if r["precision"] == "int8" and base else "-"
        lines.append(f"| {target} | {r['precision']} | {r['acc']:.4f} | {r['agree']:.4f} / {r['sqnr']:.1f} | {qref} "
                     f"| {r['p50']:.3f} | {speed} | {'-' if r['xnnpack'] is None else r['xnnpack']} | {r['bytes']:,} |")
    lines += ["", "Round p50s (ms): " + "; ".join(f"{k}: {', '.join(f'{v:.3f}' for v in r['p50s'])}"
                                                   for k, r in rows.items() if r["p50s"]),
              "", "Not run here: " + "; ".join(f"{k}: {r['not_run']}" for k, r in rows.items() if "not_run" in r), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
