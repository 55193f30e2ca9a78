"""ORT post-training quantization peers: "what users do today", next to edgeprep's result.

From a fp32 ONNX artifact this writes ``<name>-ptq-dynamic`` and/or ``<name>-ptq-static`` under
``out_root``, each a directory holding ``model.onnx``, using onnxruntime.quantization the way its
documentation recommends for x86 CPUs:
  - pre-process: quant_pre_process (symbolic shape inference + ORT basic graph optimization), so
    the quantizer sees fused, shape-annotated ops;
  - dynamic: QInt8 weights, per-channel (activations are quantized at run time, per call);
  - static: QDQ format, QInt8 per-channel weights, QUInt8 activations (U8S8, ORT's fast x86 path),
    MinMax calibration over the calibration inputs.
The lead's pipeline writes their manifests; ORT runs them at the source artifact's optimization
level, so a level that does not fuse QDQ shows up as float in the census.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from edgeprep.errors import ExportError
from edgeprep.exporters.onnxruntime_rt import one_line, root_logging_kept
from edgeprep.fsutil import atomic_dir
from edgeprep.manifest import describe_file
from edgeprep.types import Artifact

PTQ_KINDS = ("dynamic", "static")
CALIB_BATCH = 16  # samples per calibration call; MinMax does not depend on it, memory does


def _calibration_reader(input_names: Sequence[str], calib_inputs: Sequence[np.ndarray]):
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayReader(CalibrationDataReader):
        """Feeds ``calib_inputs`` (one array per model input, samples on dim 0) in batches."""

        def __init__(self) -> None:
            # float inputs go in as float32 (what the graph takes); token ids keep their int dtype
            arrays = [np.asarray(x) for x in calib_inputs]
            arrays = [x.astype(np.float32) if x.dtype.kind == "f" else x for x in arrays]
            self._batches: Iterator[dict[str, np.ndarray]] = iter([
                {name: np.ascontiguousarray(x[i:i + CALIB_BATCH]) for name, x in zip(input_names, arrays)}
                for i in range(0, len(arrays[0]), CALIB_BATCH)])

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            return next(self._batches, None)

    return ArrayReader()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.quantization prints advice and logs through the root logger (module-level
    ``logging.info`` installs a stderr handler on first use); keep both off the CLI's output."""
    with root_logging_kept():
        logging.getLogger().setLevel(logging.ERROR)  # restored by root_logging_kept
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield


def pre_process(src: Path, dst: Path) -> str:
    """quant_pre_process ``src`` into ``dst``; returns what was done (symbolic shape inference can
    fail on some graphs; ONNX shape inference alone is then used, and that is recorded)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(src), str(dst))
        return "quant_pre_process"
    except Exception as first:
        try:
            with _quiet():
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
            return f"quant_pre_process without symbolic shape inference ({one_line(first)[:120]})"
        except Exception as exc:
            raise ExportError(f"ORT PTQ pre-processing of {src} failed: {one_line(exc)}") from None


def quantize(kind: str, pre_path: Path, out_path: Path, input_names: Sequence[str],
             calib_inputs: Sequence[np.ndarray]) -> dict[str, Any]:
    """Run one ORT quantizer; returns the settings used (recorded in the artifact's info)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if kind == "dynamic":
        settings = {"weight_type": "QInt8", "per_channel": True}
        with _quiet():
            quantize_dynamic(str(pre_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True)
        return settings
    if not calib_inputs or len(calib_inputs[0]) == 0:
        raise ExportError("ORT static PTQ needs calibration inputs; set data.calibration_samples >= 1")
    settings = {"format": "QDQ", "weight_type": "QInt8", "activation_type": "QUInt8",
                "per_channel": True, "calibrate_method": "MinMax",
                "calibration_samples": int(len(calib_inputs[0]))}
    with _quiet():
        quantize_static(str(pre_path), str(out_path), _calibration_reader(input_names, calib_inputs),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return settings


def ptq_peers(artifact: Artifact, calib_inputs: Sequence[np.ndarray], out_root: Path,
              kinds: Sequence[str] = PTQ_KINDS) -> list[Artifact]:
    """Write ``<artifact.name>-ptq-<kind>`` directories under ``out_root``; return their Artifacts."""
    unknown = [k for k in kinds if k not in PTQ_KINDS]
    if unknown:
        raise ExportError(f"unknown ptq kind(s) {unknown}; valid: {', '.join(PTQ_KINDS)}")
    input_names = [s.name for s in artifact.inputs]
    peers: list[Artifact] = []
    with tempfile.TemporaryDirectory(prefix="edgeprep-ptq-") as tmp:
        pre_path = Path(tmp) / "preprocessed.onnx"
        how = pre_process(artifact.path, pre_path)
        for kind in dict.fromkeys(kinds):  # keep order, drop repeats
            name = f"{artifact.name}-ptq-{kind}"
            with atomic_dir(Path(out_root) / name) as work:
                try:
                    settings = quantize(kind, pre_path, work / "model.onnx", input_names, calib_inputs)
                except ExportError:
                    raise
                except Exception as exc:
                    raise ExportError(f"ORT {kind} PTQ of {artifact.path} failed: {one_line(exc)}") from None
                leftovers = sorted(p.name for p in work.iterdir() if p.name != "model.onnx")
                for extra in leftovers:  # calibration scratch files, never part of the artifact
                    (work / extra).unlink()
            final = Path(out_root) / name / "model.onnx"
            info = {"ptq": kind, "source": artifact.name, "source_sha256": artifact.sha256,
                    "pre_process": how, "optimize": artifact.info.get("optimize", "extended"),
                    "exporter": artifact.info.get("exporter"), "opset": artifact.info.get("opset"),
                    "quantizer": settings}
            peers.append(describe_file(name, artifact.target, artifact.runtime, final, artifact.inputs,
                                       artifact.outputs, role="ptq", info=info))
    return peers
