"""ORT Mobile extras: ONNX Runtime's own mobile usability verdict, and fixed input shapes.

``mobile_usability`` runs the checks of ``python -m onnxruntime.tools.check_onnx_model_mobile_usability``
(its module ``onnxruntime.tools.mobile_helpers.usability_checker``), but keeps the numbers instead
of log lines: for NNAPI (Android), CoreML NeuralNetwork and CoreML MLProgram (iOS), how many
nodes the EP could take, in how many partitions, which ops it cannot take, and ORT's verdict
(YES / MAYBE / NO: is it worth trying that EP instead of the CPU EP). Like the tool, it first
optimizes the model to ORT's BASIC level (what the ORT-format conversion does too), and when the
model has dynamic inputs it also reports the verdict as if they were fixed.

NNAPI takes no dynamically sized values, so a dynamic batch axis keeps it off the graph; the
export option ``mobile_fixed_batch: N`` writes the .ort from a copy whose batch axis is fixed to N
(ORT's ``make_dim_param_fixed``), which usually raises that coverage. The .ort then takes exactly
N rows per call; edgeprep's validation feeds it in chunks of N.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Optional

from edgeprep.errors import ExportError
from edgeprep.exporters.onnxruntime_rt import root_logging_kept

EPS = {"nnapi": "NNAPI (Android)", "coreml_neuralnetwork": "CoreML NeuralNetwork (iOS)",
       "coreml_mlprogram": "CoreML MLProgram (iOS)"}


def _partitions(info: Any) -> dict[str, Any]:
    return {"nodes": int(info.num_nodes), "supported_nodes": int(info.num_supported_nodes),
            "partitions": int(info.num_partitions), "unsupported_ops": sorted(info.unsupported_ops),
            "nodes_unsupported_due_to_dynamic_shapes": int(info.nodes_unsupported_due_to_dynamic_input),
            "verdict": info.suitability().name}


def mobile_usability(onnx_path: Path) -> dict[str, Any]:
    """ORT's mobile usability analysis of ``onnx_path``, as data (see the module docstring)."""
    with root_logging_kept():  # the tool's module calls logging.basicConfig on import
        from onnxruntime.tools.mobile_helpers import usability_checker as uc
        from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    checks = {"nnapi": lambda m, fixed: uc.check_nnapi_partitions(m, fixed),
              "coreml_neuralnetwork": lambda m, fixed: uc.check_coreml_partitions(
                  m, fixed, "coreml_supported_neuralnetwork_ops.md"),
              "coreml_mlprogram": lambda m, fixed: uc.check_coreml_partitions(
                  m, fixed, "coreml_supported_mlprogram_ops.md")}
    quiet = logging.getLogger("edgeprep.ort_mobile.usability")
    quiet.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="edgeprep-mobile-") as tmp:
            basic = Path(tmp) / "basic.onnx"
            optimize_model(Path(onnx_path), basic, use_external_initializers=True)
            model = ModelProtoWithShapeInfo(basic).model_with_shape_info
            dynamic_inputs, _ = uc.check_shapes(model.graph, quiet)
            out: dict[str, Any] = {"tool": "onnxruntime.tools.check_onnx_model_mobile_usability",
                                   "dynamic_inputs": [i.name for i in dynamic_inputs], "eps": {}}
            for key, check in checks.items():
                entry = {"ep": EPS[key], **_partitions(check(model, True))}
                if dynamic_inputs:
                    entry["if_inputs_fixed"] = _partitions(check(model, False))
                out["eps"][key] = entry
    except Exception as exc:  # the tool's own failure: one line, the export itself is kept
        return {"tool": "onnxruntime.tools.check_onnx_model_mobile_usability", "error": f"{type(exc).__name__}: {exc}"}
    return out


def fix_batch(onnx_path: Path, out_path: Path, batch: int, dim_name: str = "batch") -> Path:
    """Copy of the model with the symbolic batch axis fixed to ``batch`` (inputs, outputs, values)."""
    import onnx

    with root_logging_kept():
        from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    if batch < 1:
        raise ExportError(f"mobile_fixed_batch must be >= 1, got {batch}")
    model = onnx.load(str(onnx_path))
    params = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    if dim_name not in params:
        raise ExportError(f"mobile_fixed_batch: {onnx_path.name} has no symbolic '{dim_name}' input axis to fix "
                          f"(its symbolic axes: {sorted(params) or 'none'})")
    make_dim_param_fixed(model.graph, dim_name, batch)
    fix_output_shapes(model)
    onnx.save(model, str(out_path))
    return out_path


def verdict_line(usability: Optional[dict[str, Any]]) -> str:
    """One line for the report: each EP's verdict and coverage (and with fixed inputs, if different)."""
    if not usability:
        return ""
    if "error" in usability:
        return f"ORT mobile usability check failed: {usability['error']}"
    parts = []
    for entry in usability["eps"].values():
        text = (f"{entry['ep']}: {entry['verdict']} ({entry['supported_nodes']}/{entry['nodes']} nodes, "
                f"{entry['partitions']} partition{'s' if entry['partitions'] != 1 else ''})")
        fixed = entry.get("if_inputs_fixed")
        if fixed and (fixed["verdict"], fixed["supported_nodes"]) != (entry["verdict"], entry["supported_nodes"]):
            text += f", with fixed input shapes {fixed['verdict']} ({fixed['supported_nodes']}/{fixed['nodes']})"
        parts.append(text)
    return "; ".join(parts)
