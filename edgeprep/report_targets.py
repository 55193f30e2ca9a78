"""The target-specific parts of the report: artifacts whose runtime cannot run on this machine,
Core ML programs as read back from the saved package, the TensorRT preparation check, and ORT
Mobile's usability verdict. Each returns no section when the run has no such artifact."""
from __future__ import annotations

from typing import Any, Mapping

from edgeprep.gates import artifact_name
from edgeprep.report_model import MISSING, Section, Table, cell_text, fmt, fmt_int, get_nested


def not_run_sections(arts: list[Mapping[str, Any]]) -> list[Section]:
    """Artifacts whose runtime cannot run on this machine, and why (what was checked instead has
    its own section: Core ML programs, TensorRT preparation)."""
    lines = [f"{artifact_name(a)} ({cell_text(a.get('runtime'))}): {a['not_run']}" for a in arts if a.get("not_run")]
    return [Section("Not run on this machine", text=lines)] if lines else []


def tensorrt_sections(arts: list[Mapping[str, Any]]) -> list[Section]:
    """Each TensorRT-prepared ONNX checked node by node against TensorRT's operator table."""
    t = Table(["name", "precision", "TensorRT", "opset", "nodes supported", "Q / DQ nodes", "unsupported"],
              numeric=[False, False, False, True, False, False, False])
    for a in arts:
        support = get_nested(a, "info", "tensorrt_support")
        if not isinstance(support, Mapping):
            continue
        bad = "; ".join(f"{u.get('op')} ×{u.get('count')} ({u.get('why')})" for u in support.get("unsupported") or [])
        opset_s = f"{support.get('opset')}" + ("" if support.get("opset_supported") else " (outside TensorRT's range)")
        t.rows.append([artifact_name(a), cell_text(get_nested(a, "info", "precision")),
                       cell_text(support.get("tensorrt_version")),
                       opset_s, f"{support.get('supported_nodes')}/{support.get('nodes')}",
                       f"{support.get('quantize_nodes')} / {support.get('dequantize_nodes')}", bad or "none"])
        t.row_status.append(None if support.get("all_supported") else "fail")
    if not t.rows:
        return []
    source = next(get_nested(a, "info", "tensorrt_support", "source") for a in arts
                  if get_nested(a, "info", "tensorrt_support"))
    return [Section("TensorRT preparation (static check)", t, [f"Operator table: {source}."])]


def coreml_sections(arts: list[Mapping[str, Any]]) -> list[Section]:
    """Each Core ML package as read back from disk: deployment target, ops, weights by dtype, and
    whether the model's own integer weights were carried over exactly."""
    t = Table(["name", "deployment target", "ops", "compressed weight ops", "weight elements by dtype",
               "carried integer weights"], numeric=[False, False, True, True, False, False])
    for a in arts:
        spec = get_nested(a, "info", "spec")
        if not isinstance(spec, Mapping):
            continue
        weights = ", ".join(f"{k} {fmt_int(get_nested(v, 'elements'))}" for k, v in (spec.get("weights") or {}).items())
        carried = get_nested(a, "info", "carried")
        carried_s = (f"{carried.get('weights')}: codes identical {carried.get('codes_identical')}, max abs error "
                     f"{fmt(carried.get('max_abs_weight_error'), '.2g')}") if isinstance(carried, Mapping) else "none"
        t.rows.append([artifact_name(a), cell_text(spec.get("deployment_target")),
                       fmt_int(sum((spec.get("ops") or {}).values())),
                       fmt_int(spec.get("compressed_weight_ops")), weights or MISSING, carried_s])
        t.row_status.append(None)
    if not t.rows:
        return []
    return [Section("Core ML programs (read back from the saved .mlpackage)", t,
                    ["Weights carried = the model's own QAT integers and scales stored as Core ML constexpr ops, "
                     "checked by decompressing the saved file."])]


def mobile_sections(arts: list[Mapping[str, Any]]) -> list[Section]:
    """ORT's mobile usability verdict (NNAPI / CoreML EP coverage) of each artifact with an .ort."""
    from edgeprep.exporters.ort_mobile import verdict_line

    lines = []
    for a in arts:
        mobile = get_nested(a, "info", "mobile")
        if not isinstance(mobile, Mapping):
            continue
        fixed = mobile.get("fixed_batch")
        shape = f"batch fixed to {fixed}" if fixed else "dynamic batch"
        lines.append(f"{artifact_name(a)} ({cell_text(mobile.get('file'))}, {shape}): "
                     f"{verdict_line(mobile.get('usability')) or MISSING}")
    if not lines:
        return []
    lines.append("Verdict = ONNX Runtime's own check (onnxruntime.tools.check_onnx_model_mobile_usability): is it "
                 "worth trying that execution provider instead of the CPU one. NNAPI takes no dynamic shapes; the "
                 "export option mobile_fixed_batch writes the .ort with a fixed batch.")
    return [Section("ORT Mobile usability", text=lines)]
