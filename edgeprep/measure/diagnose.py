"""A failed parity check on ONNX Runtime, explained: where it breaks, and what fixes it at what cost.

``diagnose`` localizes the first diverging heavy layer (``edgeprep.measure.localize``) on the target
that failed (this host, or a ssh:// / emu:// device), then re-validates the offered fixes on that
same target: the named layer's int8 weights stored as uint8 (``u8_weight_layers: [name]``), and every
int8 weight as uint8 (``int8_weights: u8``). Both are rewrites of the artifact file (the same
numbers, other kernels: ``edgeprep.quant.weight_storage``), so they are measured here without the
model; each comes with its SQNR on the target, its size and its latency on this host. The fix that
needs retraining (QAT ``target_cpu: portable``) is named, not measured.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from edgeprep.errors import EdgeprepError, ExportError, RuntimeFailure
from edgeprep.measure.latency import time_callable
from edgeprep.measure.localize import SAMPLES, host_runner, localize, torch_layer_outputs
from edgeprep.measure.parity import SQNR_CAP_DB, sqnr_db
from edgeprep.quant.weight_storage import weights_to_uint8
from edgeprep.types import Artifact

RETRAIN_HINT = ("or retrain with qat target_cpu: portable (int8 weights on [-63, 63]: exact on every CPU family's "
                "kernels at full speed)")
LATENCY_ITERS = 50


def onnx_source(artifact: Artifact) -> Optional[Any]:
    """The ONNX graph behind an ORT artifact (a .ort file's source .onnx sits beside it), or None."""
    import onnx

    path = artifact.path
    if path.suffix == ".ort":
        path = path.with_name(str(artifact.info.get("source_onnx") or "model.onnx"))
    if artifact.runtime != "onnxruntime" or path.suffix != ".onnx" or not path.is_file():
        return None
    return onnx.load(str(path))


def diagnose(artifact: Artifact, ref_inputs: Sequence[np.ndarray], ref_outputs: np.ndarray, *, threshold_db: float,
             device: Any = None, torch_model: Any = None, torch_x: Any = None,
             log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """The report's ``diagnosis`` entry for ``artifact`` on this host (``device`` None) or a device."""
    proto = onnx_source(artifact)
    if proto is None:
        return {"summary": f"not localized: {artifact.runtime} {artifact.path.suffix} artifacts are localized only "
                           "as ONNX graphs on ONNX Runtime", "fixes": []}
    names = [i.name for i in proto.graph.input]
    xs = [np.ascontiguousarray(np.asarray(x)[:SAMPLES]) for x in ref_inputs]
    ref = np.asarray(ref_outputs)[:SAMPLES]
    if device is None:
        run = host_runner(str(artifact.info.get("optimize") or "extended"))
    else:
        from edgeprep.measure.localize import device_runner

        run = device_runner(device, artifact)  # quiet: one run per prefix, the protocol's events are noise
    layer_refs = None
    if torch_model is not None and torch_x is not None:
        from edgeprep.measure.localize import heavy_layers

        layer_refs = torch_layer_outputs(torch_model, torch_x[:SAMPLES], heavy_layers(proto))
    where = "this host" if device is None else f"device {getattr(device, 'label', device)}"
    log(f"localize {artifact.name} on {where}")
    div = localize(proto, names, xs, run, threshold_db=threshold_db, torch_outputs=layer_refs,
                   bisect=device is not None)
    fixes = []
    if div.layer is not None:
        candidates = ([(f"u8_weight_layers: [{div.layer.module}]", [div.layer.module])] if div.layer.module else [])
        candidates.append(("int8_weights: u8", None))
        base_ms = _host_p50_ms(proto, names, xs)
        for option, layers in candidates:
            fixed = type(proto)()
            fixed.CopyFrom(proto)
            try:
                if not weights_to_uint8(fixed, layers):
                    continue
            except ExportError as exc:  # a layer the pass cannot rewrite: say so, offer the next fix
                fixes.append({"option": option, "error": str(exc)})
                continue
            log(f"re-validate {artifact.name} with {option} on {where}")
            got = run(fixed, {n: x for n, x in zip(names, xs)})
            sq = min(SQNR_CAP_DB, float(sqnr_db(ref.astype(np.float64).ravel(), np.asarray(got, np.float64).ravel())))
            p50 = _host_p50_ms(fixed, names, xs)
            fixes.append({"option": option, "where": "export", "sqnr_db": sq, "passes": sq >= threshold_db,
                          "bytes": fixed.ByteSize(), "bytes_delta": fixed.ByteSize() - proto.ByteSize(),
                          "host_p50_ms": p50, "host_p50_ms_before": base_ms,
                          "host_latency_ratio": p50 / base_ms if base_ms else None})
    return {"target": where, "divergence": div.to_json(), "summary": div.describe(), "fixes": fixes,
            "retrain": RETRAIN_HINT if div.layer is not None else None}


def fix_text(diagnosis: dict[str, Any]) -> str:
    """One clause for the failure line: the measured fixes, best first, and the retraining one."""
    parts = []
    for f in sorted(diagnosis.get("fixes") or [], key=lambda f: (not f.get("passes"), f.get("host_latency_ratio") or 9)):
        if f.get("error"):
            continue
        parts.append(f"export {f['option']} -> {f['sqnr_db']:.1f} dB there, {f['bytes_delta']:+,} bytes, "
                     f"{f['host_latency_ratio']:.2f}x p50 on this host")
    if diagnosis.get("retrain"):
        parts.append(diagnosis["retrain"])
    return ("fix: " + "; ".join(parts)) if parts else ""


def _host_p50_ms(proto: Any, names: Sequence[str], xs: Sequence[np.ndarray]) -> Optional[float]:
    """Batch-1 p50 of the model on this host (one thread): the fix's cost, measured the same way."""
    from edgeprep.exporters.onnxruntime_rt import one_line, ort_errors, session_from_proto

    sess = session_from_proto(proto, "the artifact (timing a fix)")
    feed = {i.name: dict(zip(names, xs))[i.name][:1] for i in sess.get_inputs()}
    try:
        return time_callable(lambda: sess.run(None, feed), warmup=5, iters=LATENCY_ITERS, threads=1, batch=1).p50_ms
    except ort_errors() as exc:
        raise RuntimeFailure(f"timing a fix on this host: ONNX Runtime failed: {one_line(exc)}") from None


def diagnose_entries(entries: list[dict[str, Any]], artifacts: Sequence[Artifact], threshold_db: float,
                     ref_inputs: Sequence[np.ndarray], ref_outputs: np.ndarray, *, devices: dict[str, Any],
                     torch_model: Any = None, torch_x: Any = None,
                     log: Callable[[str], None] = lambda m: None) -> None:
    """Add ``diagnosis`` to every shipped artifact entry (and device entry) whose SQNR is below
    ``threshold_db``: the pipeline's answer to a failed ``min_sqnr_db`` gate."""
    by_name = {a.name: a for a in artifacts}
    for entry in entries:
        art = by_name.get(entry["name"])
        if art is None or entry.get("role") != "edgeprep":
            continue
        targets = [(entry, None)] + [(d, devices.get(d.get("device"))) for d in entry.get("devices") or []
                                     if not d.get("native") and d.get("device") in devices]
        for where, device in targets:
            sq = (where.get("parity") or {}).get("sqnr_db")
            if sq is None or sq >= threshold_db:
                continue
            try:
                where["diagnosis"] = diagnose(art, ref_inputs, ref_outputs, threshold_db=threshold_db, device=device,
                                              torch_model=torch_model, torch_x=torch_x, log=log)
            except EdgeprepError as exc:  # a typed failure (device lost, graph not cuttable) must not hide the
                # failed gate it was explaining: the gate still fails, its diagnosis says why there is none
                where["diagnosis"] = {"summary": f"not localized: {exc}"[:300], "fixes": []}


def diagnosis_lines(report: dict[str, Any]) -> list[str]:
    """One line per diagnosed artifact / device, for the CLI's failure message."""
    lines = []
    for a in report.get("artifacts") or []:
        for where in [a] + list(a.get("devices") or []):
            d = where.get("diagnosis")
            if d:
                on = "" if where is a else f" on {where.get('device')}"
                fix = fix_text(d)
                lines.append(f"{a.get('name')}{on}: {d['summary']}" + (f"; {fix}" if fix else ""))
    return lines
