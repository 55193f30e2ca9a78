"""LiteRT exporter (target "litert") and runtime: a .tflite model run by the LiteRT interpreter.

Export: ``litert_torch.convert`` (extra ``litert-convert``; it pins typing-extensions 4.12, so
edgeprep's dev constraints keep pydantic < 2.12, which our code supports) at a static batch, as
the device runs it. ``int8: true`` adds a peer made by ai-edge-quantizer's static recipe (int8
weights and int8 activations, min/max calibrated on the pipeline's calibration inputs).

Runtime: ``ai_edge_litert.interpreter`` (extra ``litert``) with the requested thread count. A
quantized model may take or return int8 / uint8 tensors: inputs are quantized with the tensor's
own scale and zero point (round half to even, clipped to the type's range) and outputs
dequantized, so callers always pass and get float32. The precision census reads the
interpreter's op list: a heavy op (FULLY_CONNECTED, BATCH_MATMUL, CONV_2D, DEPTHWISE_CONV_2D) is
low precision when its first input is an integer tensor.
"""
from __future__ import annotations

import collections
import contextlib
import io
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from edgeprep.errors import ExportError, MissingDependencyError, RuntimeFailure
from edgeprep.exporters.base import (
    Int8PeerExporter,
    LoadedModel,
    Runtime,
    package_version,
    refuse_qat_model,
    short_error,
    static_example,
)
from edgeprep.exporters.options import LiteRTOptions
from edgeprep.manifest import describe_file
from edgeprep.types import Artifact, LatencyStats, TensorSpec

MODEL_FILE = "model.tflite"
HEAVY_OPS = ("FULLY_CONNECTED", "BATCH_MATMUL", "CONV_2D", "DEPTHWISE_CONV_2D")
INTEGER = (np.int8, np.uint8, np.int16)


def _need(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"the litert target needs {module}: pip install 'edgeprep[{extra}]'")



def _interpreter(path: Path, threads: int = 1, reference_kernels: bool = False) -> Any:
    """A LiteRT interpreter; ``reference_kernels``: TFLite's reference op implementations, no
    XNNPACK (the quantized reference an int8 model's optimized kernels are checked against)."""
    _need("ai_edge_litert", "litert")
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.BUILTIN_REF if reference_kernels else OpResolverType.AUTO
    try:
        it = Interpreter(model_path=str(path), num_threads=int(threads), experimental_op_resolver_type=resolver)
        it.allocate_tensors()
    except Exception as exc:
        raise RuntimeFailure(f"{path}: the LiteRT interpreter cannot load it: {short_error(exc)}") from None
    return it


def _specs(details: Sequence[dict], prefix: str) -> list[TensorSpec]:
    return [TensorSpec(d.get("name") or f"{prefix}_{i}", tuple(int(s) for s in d["shape"]), "float32")
            for i, d in enumerate(details)]


class LiteRTExporter(Int8PeerExporter):
    target = "litert"
    runtime = "litert"
    options_model = LiteRTOptions

    def export(self, model: Any, example_inputs: tuple[Any, ...], out_dir: Path, options: Any) -> Artifact:
        import torch

        _need("litert_torch", "litert-convert")
        opts = LiteRTOptions.of(options)
        refuse_qat_model(model, "litert")
        example = static_example(example_inputs, opts.static_batch)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        was_training = model.training
        model.eval()
        try:
            import litert_torch

            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                litert_torch.convert(model, example).export(str(out_dir / MODEL_FILE))
        except Exception as exc:
            raise ExportError(f"LiteRT conversion failed: {short_error(exc)}") from None
        finally:
            model.train(was_training)
        it = _interpreter(out_dir / MODEL_FILE)
        info = {"batch": opts.static_batch, "precision": "fp32", "ops": dict(op_counts(it)),
                "xnnpack_partitions": xnnpack_partitions(it),
                "litert_torch": package_version("litert-torch"), "torch": torch.__version__}
        return describe_file(opts.name or self.target, self.target, self.runtime, out_dir / MODEL_FILE,
                             _specs(it.get_input_details(), "input"), _specs(it.get_output_details(), "output"),
                             info=info)

    def int8_peer(self, artifact: Artifact, calib_inputs: Sequence[np.ndarray], out_dir: Path) -> Artifact:
        return quantize_int8(artifact, calib_inputs, out_dir)


def quantize_int8(artifact: Artifact, calib_inputs: Sequence[np.ndarray], out_dir: Path) -> Artifact:
    """ai-edge-quantizer static int8 (weights and activations) of the artifact's .tflite."""
    _need("ai_edge_quantizer", "litert-convert")
    from ai_edge_quantizer import quantizer, recipe

    batch = int(artifact.info.get("batch", 1))
    it = _interpreter(artifact.path)
    signature = next(iter(it.get_signature_list()))
    names = it.get_signature_list()[signature]["inputs"]
    calib = [np.asarray(c, dtype=np.float32) for c in calib_inputs]
    rows = len(calib[0]) // batch * batch
    samples = [{n: np.ascontiguousarray(c[i:i + batch]) for n, c in zip(names, calib)} for i in range(0, rows, batch)]
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            qt = quantizer.Quantizer(str(artifact.path))
            qt.load_quantization_recipe(recipe.static_wi8_ai8())
            result = qt.calibrate({signature: samples})
            qt.quantize(result).export_model(str(out_dir / MODEL_FILE), overwrite=True)
    except Exception as exc:
        raise ExportError(f"LiteRT int8 quantization failed for {artifact.name}: {short_error(exc)}") from None
    q = _interpreter(out_dir / MODEL_FILE)
    info = {"batch": batch, "precision": "int8 (ai-edge-quantizer static_wi8_ai8, min/max)", "calibration_rows": rows,
            "ops": dict(op_counts(q)), "xnnpack_partitions": xnnpack_partitions(q),
            "io_dtypes": [str(d["dtype"].__name__) for d in q.get_input_details()]}
    return describe_file(f"{artifact.name}-int8", "litert", "litert", out_dir / MODEL_FILE,
                         _specs(q.get_input_details(), "input"), _specs(q.get_output_details(), "output"),
                         role="ptq", info=info)


def op_counts(it: Any) -> collections.Counter:
    return collections.Counter(op["op_name"] for op in it._get_ops_details())


def xnnpack_partitions(it: Any) -> int:
    """How many pieces the XNNPACK delegate took (DELEGATE nodes in the execution plan). One means
    it took the whole graph; many means the graph hands over to the builtin kernels between them,
    which is what makes an int8 model slower than its fp32 one (measured: vit-bench 62 vs 1)."""
    return int(op_counts(it).get("DELEGATE", 0))



def quantize_input(x: np.ndarray, detail: dict) -> np.ndarray:
    """float -> the input tensor's integer type with its scale / zero point (float inputs pass)."""
    dtype = detail["dtype"]
    if dtype not in INTEGER:
        return np.ascontiguousarray(x, dtype=dtype)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, dtype=np.float32) / scale) + zero  # numpy rounds half to even, as TFLite
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize_output(y: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] not in INTEGER:
        return y
    scale, zero = detail["quantization"]
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


class LiteRTModel(LoadedModel):
    def __init__(self, artifact: Artifact, threads: int = 1, reference_kernels: bool = False):
        self.artifact, self.threads = artifact, int(threads)
        self.it = _interpreter(artifact.path, self.threads, reference_kernels)
        self.inputs, self.outputs = self.it.get_input_details(), self.it.get_output_details()
        self.input_names = tuple(d["name"] for d in self.inputs)
        self.output_names = tuple(d["name"] for d in self.outputs)
        self.fixed_batch: Optional[int] = int(self.inputs[0]["shape"][0]) if self.inputs else None

    def _set(self, inputs: Sequence[np.ndarray]) -> None:
        if len(inputs) != len(self.inputs):
            raise RuntimeFailure(f"{self.artifact.path}: expected {len(self.inputs)} inputs, got {len(inputs)}")
        for x, d in zip(inputs, self.inputs):
            if tuple(x.shape) != tuple(d["shape"]):
                raise RuntimeFailure(f"{self.artifact.path}: input {d['name']} must have shape {tuple(d['shape'])}, "
                                     f"got {tuple(x.shape)} (a LiteRT model has static shapes)")
            self.it.set_tensor(d["index"], quantize_input(x, d))

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        self._set(inputs)
        try:
            self.it.invoke()
        except Exception as exc:
            raise RuntimeFailure(f"{self.artifact.path}: LiteRT failed: {short_error(exc)}") from None
        return [dequantize_output(self.it.get_tensor(d["index"]), d) for d in self.outputs]

    def profile(self, inputs: Sequence[np.ndarray], warmup: int, iters: int) -> LatencyStats:
        from edgeprep.measure.latency import time_callable

        self.run(inputs)  # set the inputs once and fail here, not inside the timing loop
        return time_callable(self.it.invoke, warmup=warmup, iters=iters, threads=self.threads,
                             batch=int(inputs[0].shape[0]))

    def precision_census(self, save_graph_to: Optional[Path] = None) -> dict[str, Any]:
        tensors = {t["index"]: t for t in self.it.get_tensor_details()}
        ops: collections.Counter = collections.Counter()
        heavy = low = 0
        for op in self.it._get_ops_details():
            ops[op["op_name"]] += 1
            if op["op_name"] in HEAVY_OPS and len(op["inputs"]):
                heavy += 1
                low += tensors[int(op["inputs"][0])]["dtype"] in INTEGER
        return {"low_precision_op_fraction": low / heavy if heavy else 0.0, "heavy_ops": heavy,
                "low_precision_ops": low, "float_ops": heavy - low, "ops": dict(ops),
                "xnnpack_partitions": int(ops.get("DELEGATE", 0)),
                "optimization_level": "as converted (LiteRT applies XNNPACK at load)"}


class LiteRTRuntime(Runtime):
    name = "litert"
    package = "ai_edge_litert"
    extra = "litert"

    def load(self, artifact: Artifact, threads: int = 1) -> LoadedModel:
        return LiteRTModel(artifact, threads)
