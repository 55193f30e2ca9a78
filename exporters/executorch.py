"""ExecuTorch exporter (target "executorch") and runtime: a .pte program lowered to XNNPACK.

Export: ``torch.export`` at a static batch (edge programs run one fixed shape; batch 1 is what a
device runs), then ``to_edge_transform_and_lower`` with the XNNPACK partitioner, then the
ExecuTorch program. The manifest records how much of the graph XNNPACK took: the number of
delegate partitions (one is ideal; every extra one is a hand-over between XNNPACK and the portable
CPU kernels) and the ops left outside any delegate. The exported program before lowering is kept
as ``program.pt2`` so the int8 peer can be made from it later (``derived``).

int8 (``int8: true``): a peer artifact, PT2E post-training quantization with ExecuTorch's
XNNPACKQuantizer (symmetric int8, per-channel weights, static activations) calibrated on the
pipeline's calibration inputs, lowered the same way. It runs on XNNPACK's int8 kernels; its
``program.pt2`` is the quantized PyTorch program, the reference its parity is checked against.

Runtime: ``executorch.runtime`` (the pybindings of the C++ runtime) on this CPU; the XNNPACK
thread pool is set to the requested thread count. Optional package: ``pip install 'edgeprep[executorch]'``.
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
from edgeprep.exporters.options import ExecuTorchOptions
from edgeprep.fsutil import write_bytes_atomic
from edgeprep.manifest import describe_file
from edgeprep.types import Artifact, LatencyStats, TensorSpec

MODEL_FILE = "model.pte"
PROGRAM_FILE = "program.pt2"
INSTALL = "pip install 'edgeprep[executorch]'"


def _need_executorch() -> None:
    try:
        import executorch  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"the executorch target needs ExecuTorch: {INSTALL}") from None



def _lower(exported: Any) -> tuple[bytes, dict[str, Any]]:
    """XNNPACK-lowered ExecuTorch program bytes, and the partition summary."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    graph = edge.exported_program().graph_module.graph
    calls = [n for n in graph.nodes if n.op == "call_function"]
    delegates = [n for n in calls if "executorch_call_delegate" in str(n.target)]
    outside = collections.Counter(_op_name(n.target) for n in calls
                                  if n not in delegates and "getitem" not in str(n.target))
    program = edge.to_executorch()
    return bytes(program.buffer), {"delegate": "XnnpackBackend", "partitions": len(delegates),
                                   "ops_outside_delegates": dict(sorted(outside.items()))}


def _op_name(target: Any) -> str:
    """'aten.native_layer_norm.default' -> 'native_layer_norm' (the portable kernel that runs it)."""
    name = getattr(target, "__name__", None) or str(target)
    parts = name.split(".")
    return parts[1] if len(parts) >= 3 and parts[0] == "aten" else name


def _specs(example: Sequence[Any], outputs: Sequence[Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    ins = [TensorSpec(f"input_{i}", tuple(int(d) for d in t.shape), str(t.numpy().dtype)) for i, t in enumerate(example)]
    outs = [TensorSpec(f"output_{i}", tuple(int(d) for d in t.shape), str(t.detach().numpy().dtype))
            for i, t in enumerate(outputs)]
    return ins, outs


class ExecuTorchExporter(Int8PeerExporter):
    target = "executorch"
    runtime = "executorch"
    options_model = ExecuTorchOptions

    def export(self, model: Any, example_inputs: tuple[Any, ...], out_dir: Path, options: Any) -> Artifact:
        import torch

        _need_executorch()
        opts = ExecuTorchOptions.of(options)
        refuse_qat_model(model, "executorch")
        example = static_example(example_inputs, opts.static_batch)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                outputs = model(*example)
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            with contextlib.redirect_stdout(io.StringIO()):
                exported = torch.export.export(model, example)
                buf = io.BytesIO()
                torch.export.save(exported, buf)
                pte, partitions = _lower(exported)
        except (MissingDependencyError, ExportError):
            raise
        except Exception as exc:
            raise ExportError(f"ExecuTorch export failed: {short_error(exc)}") from None
        finally:
            model.train(was_training)
        write_bytes_atomic(out_dir / PROGRAM_FILE, buf.getvalue())
        write_bytes_atomic(out_dir / MODEL_FILE, pte)
        inputs, outs = _specs(example, outputs)
        info = {"batch": opts.static_batch, "precision": "fp32", "xnnpack": partitions, "program": PROGRAM_FILE,
                "executorch": package_version("executorch"), "torch": torch.__version__}
        return describe_file(opts.name or self.target, self.target, self.runtime, out_dir / MODEL_FILE,
                             inputs, outs, info=info)

    def int8_peer(self, artifact: Artifact, calib_inputs: Sequence[np.ndarray], out_dir: Path) -> Artifact:
        return quantize_int8(artifact, calib_inputs, out_dir)


def quantize_int8(artifact: Artifact, calib_inputs: Sequence[np.ndarray], out_dir: Path) -> Artifact:
    """PT2E int8 (XNNPACKQuantizer) of the artifact's saved program, calibrated on ``calib_inputs``
    (one array per model input, any number of rows: fed in the program's static batch)."""
    import torch

    _need_executorch()
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batch = int(artifact.info.get("batch", 1))
    program = artifact.dir / str(artifact.info.get("program", PROGRAM_FILE))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            module = torch.export.load(str(program)).module()
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            prepared = prepare_pt2e(module, quantizer)
            calib = [np.asarray(c) for c in calib_inputs]
            for i in range(0, len(calib[0]) - batch + 1, batch):
                prepared(*(torch.from_numpy(np.ascontiguousarray(c[i:i + batch])) for c in calib))
            converted = convert_pt2e(prepared)
            example = tuple(torch.from_numpy(np.ascontiguousarray(c[:batch])) for c in calib)
            exported = torch.export.export(converted, example)
            reference = io.BytesIO()
            torch.export.save(exported, reference)
            pte, partitions = _lower(exported)
            with torch.no_grad():
                outputs = converted(*example)
    except Exception as exc:
        raise ExportError(f"ExecuTorch int8 (PT2E) failed for {artifact.name}: {short_error(exc)}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out_dir / PROGRAM_FILE, reference.getvalue())  # the PyTorch quantized reference
    write_bytes_atomic(out_dir / MODEL_FILE, pte)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    inputs, outs = _specs(example, outputs)
    info = {"batch": batch, "precision": "int8 (PT2E, XNNPACKQuantizer: per-channel weights, static activations)",
            "calibration_rows": int(len(calib[0]) // batch * batch), "xnnpack": partitions, "program": PROGRAM_FILE,
            "executorch": package_version("executorch"), "torch": torch.__version__}
    return describe_file(f"{artifact.name}-int8", "executorch", "executorch", out_dir / MODEL_FILE, inputs, outs,
                         role="ptq", info=info)



class ExecuTorchModel(LoadedModel):
    def __init__(self, artifact: Artifact, threads: int = 1):
        _need_executorch()
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime as EtRuntime

        self.artifact, self.threads = artifact, int(threads)
        portable_lib._unsafe_reset_threadpool(self.threads)  # XNNPACK's pool: the thread count asked for
        try:
            self.method = EtRuntime.get().load_program(Path(artifact.path)).load_method("forward")
        except Exception as exc:
            raise RuntimeFailure(f"{artifact.path}: ExecuTorch cannot load it: {short_error(exc)}") from None
        self.input_names = tuple(s.name for s in artifact.inputs)
        self.output_names = tuple(s.name for s in artifact.outputs)
        self._dtypes = [np.dtype(s.dtype) for s in artifact.inputs]
        first = artifact.inputs[0].shape[0] if artifact.inputs else None
        self.fixed_batch: Optional[int] = first if isinstance(first, int) else None

    def _tensors(self, inputs: Sequence[np.ndarray]) -> list[Any]:
        import torch

        if len(inputs) != len(self._dtypes):
            raise RuntimeFailure(f"{self.artifact.path}: expected {len(self._dtypes)} inputs, got {len(inputs)}")
        return [torch.from_numpy(np.ascontiguousarray(x, dtype=d)) for x, d in zip(inputs, self._dtypes)]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        tensors = self._tensors(inputs)
        try:
            return [o.numpy().copy() for o in self.method.execute(tensors)]
        except Exception as exc:
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
            raise RuntimeFailure(f"{self.artifact.path}: ExecuTorch failed on inputs {shapes}: {short_error(exc)}") from None

    def profile(self, inputs: Sequence[np.ndarray], warmup: int, iters: int) -> LatencyStats:
        from edgeprep.measure.latency import time_callable

        tensors = self._tensors(inputs)
        self.run(inputs)  # fail here with a clear message, not inside the timing loop
        execute = self.method.execute
        return time_callable(lambda: execute(tensors), warmup=warmup, iters=iters, threads=self.threads,
                             batch=int(tensors[0].shape[0]))


class ExecuTorchRuntime(Runtime):
    name = "executorch"
    package = "executorch"
    extra = "executorch"

    def load(self, artifact: Artifact, threads: int = 1) -> LoadedModel:
        return ExecuTorchModel(artifact, threads)
