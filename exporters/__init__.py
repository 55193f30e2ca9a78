"""Exporters and runtimes, one module per target (installed as ``edgeprep.exporters``).

Registries are plain dicts. Heavy or optional packages are imported inside the functions that
need them, so listing targets never imports a runtime.
"""
from __future__ import annotations

from edgeprep.errors import BadInputError
from edgeprep.exporters.base import Exporter, Runtime

# Filled below; kept explicit so a reader sees every target in one place.
EXPORTERS: dict[str, type[Exporter]] = {}
RUNTIMES: dict[str, type[Runtime]] = {}


def get_exporter(target: str) -> Exporter:
    if target not in EXPORTERS:
        raise BadInputError(f"unknown export target {target!r}; valid targets: {', '.join(sorted(EXPORTERS))}")
    return EXPORTERS[target]()


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise BadInputError(f"unknown runtime {name!r}; valid runtimes: {', '.join(sorted(RUNTIMES))}")
    return RUNTIMES[name]()


def _register() -> None:
    # Importing these modules is cheap: they import onnx/onnxruntime/torch inside functions only.
    from edgeprep.exporters.coreml import CoreMLExporter, CoreMLRuntime
    from edgeprep.exporters.executorch import ExecuTorchExporter, ExecuTorchRuntime
    from edgeprep.exporters.litert import LiteRTExporter, LiteRTRuntime
    from edgeprep.exporters.onnx import OnnxExporter, OrtMobileExporter
    from edgeprep.exporters.onnxruntime_rt import OrtRuntime
    from edgeprep.exporters.tensorrt import TensorRTExporter, TensorRTRuntime

    EXPORTERS["onnx"] = OnnxExporter
    EXPORTERS["ort-mobile"] = OrtMobileExporter
    EXPORTERS["executorch"] = ExecuTorchExporter
    EXPORTERS["litert"] = LiteRTExporter
    EXPORTERS["coreml"] = CoreMLExporter
    EXPORTERS["tensorrt"] = TensorRTExporter
    RUNTIMES["onnxruntime"] = OrtRuntime
    RUNTIMES["executorch"] = ExecuTorchRuntime
    RUNTIMES["litert"] = LiteRTRuntime
    RUNTIMES["coreml"] = CoreMLRuntime
    RUNTIMES["tensorrt"] = TensorRTRuntime


_register()
