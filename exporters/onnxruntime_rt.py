"""ONNX Runtime (CPU): load an .onnx or .ort artifact, run it, profile it, and take its census.

Sessions are built the same way everywhere (here, by the exporter's self-check and by the PTQ
module) so a number measured in one place means the same thing in another: CPU provider,
``intra_op_num_threads=threads``, one inter-op thread, sequential execution, and the graph
optimization level the artifact was exported for (``info["optimize"]``, default "extended").
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from edgeprep.errors import MissingDependencyError, RuntimeFailure
from edgeprep.exporters.base import LoadedModel, Runtime
from edgeprep.quant.nbits import DEFAULT_ACCURACY_LEVEL as NBITS_ACCURACY_LEVEL
from edgeprep.quant.nbits import session_config_for_nbits
from edgeprep.types import Artifact, LatencyStats

DEFAULT_OPTIMIZE = "extended"
OPTIMIZE_LEVELS = ("disable", "basic", "extended", "all")

# ORT's type strings -> numpy dtypes, to cast inputs to what the graph expects.
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime", purpose="running ONNX artifacts") from None
    return onnxruntime


def one_line(exc: BaseException) -> str:
    """First non-empty line of an exception message (ORT and torch messages span many lines)."""
    text = str(exc).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@contextlib.contextmanager
def root_logging_kept() -> Iterator[None]:
    """Undo what importing onnxruntime.tools does to the process: its logger module calls
    ``logging.basicConfig`` (a stderr handler on the root logger, which would print every library's
    INFO/WARNING records through the CLI from then on)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


def session_options(optimize: str = DEFAULT_OPTIMIZE, threads: int = 1,
                    optimized_model_path: Optional[Path] = None) -> Any:
    ort = _ort()
    if optimize not in OPTIMIZE_LEVELS:
        raise RuntimeFailure(f"unknown ORT optimization level {optimize!r}; "
                             f"valid: {', '.join(OPTIMIZE_LEVELS)}")
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimize]
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only: "all" warns on every save that NCHWc is hardware specific
    # Weight-only DequantizeLinear -> MatMul fuses into MatMulNBits; ORT's default accuracy level 4
    # re-quantizes its activations to int8 per block (different numbers, and slower on x86, see
    # edgeprep/quant/nbits.py). Level 1 keeps fp32 activations: the artifact computes what it says.
    for key, value in session_config_for_nbits(NBITS_ACCURACY_LEVEL).items():
        so.add_session_config_entry(key, value)
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return so


def ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's own exception types (pybind classes that derive straight from Exception:
    Fail, InvalidArgument, InvalidGraph, RuntimeException, ...), for ``except`` clauses that turn
    a runtime failure into a typed one-line error without catching everything else."""
    import onnxruntime.capi.onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


def session_from_proto(proto: Any, what: str, optimize: str = DEFAULT_OPTIMIZE,
                       disabled_optimizers: Sequence[str] = ()) -> Any:
    """An ORT CPU session (one thread) on an in-memory graph; a load failure is a one-line
    RuntimeFailure naming ``what`` the graph is."""
    ort = _ort()
    so = session_options(optimize, 1, None)
    try:
        return ort.InferenceSession(proto.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(disabled_optimizers))
    except ort_errors() as exc:
        raise RuntimeFailure(f"{what}: ONNX Runtime cannot load it: {one_line(exc)}") from None


def create_session(path: Path, optimize: str = DEFAULT_OPTIMIZE, threads: int = 1,
                   optimized_model_path: Optional[Path] = None) -> Any:
    """An ORT CPU session; any load failure becomes a one-line RuntimeFailure."""
    ort = _ort()
    so = session_options(optimize, threads, optimized_model_path)
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind exception types
        raise RuntimeFailure(f"{path}: ONNX Runtime cannot load it: {one_line(exc)}") from None


def optimized_graph(path: Path, optimize: str = DEFAULT_OPTIMIZE) -> Any:
    """The onnx ModelProto ORT really executes for ``path`` at ``optimize`` (saved, then read)."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="edgeprep-ort-opt-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        create_session(path, optimize, threads=1, optimized_model_path=out)
        return onnx.load(str(out))


def ort_format_op_counts(path: Path) -> Counter:
    """Op types (with counts, subgraphs included) stored in an ORT-format (.ort) model.

    A .ort file is saved already optimized and ORT does not re-optimize it at load, so its nodes
    are what runs.
    """
    with root_logging_kept():
        import onnxruntime.tools.ort_format_model  # noqa: F401  (puts ort_flatbuffers_py on sys.path)
        import ort_flatbuffers_py.fbs as fbs

    buf = bytearray(Path(path).read_bytes())
    if not fbs.InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(buf, 0):
        raise RuntimeFailure(f"{path}: not an ORT-format model")
    counts: Counter = Counter()

    def walk(graph: Any) -> None:
        for i in range(graph.NodesLength()):
            node = graph.Nodes(i)
            counts[node.OpType().decode()] += 1
            for j in range(node.AttributesLength()):
                attr = node.Attributes(j)
                if attr.G() is not None:
                    walk(attr.G())
                for k in range(attr.GraphsLength()):
                    walk(attr.Graphs(k))

    walk(fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(buf, 0).Model().Graph())
    return counts


class OrtModel(LoadedModel):
    def __init__(self, artifact: Artifact, threads: int = 1):
        self.artifact = artifact
        self.threads = int(threads)
        self.optimize = str(artifact.info.get("optimize") or DEFAULT_OPTIMIZE)
        self.session = create_session(artifact.path, self.optimize, self.threads)
        sess_inputs = self.session.get_inputs()
        self._dtypes = [ORT_DTYPES.get(i.type, np.float32) for i in sess_inputs]
        names = tuple(i.name for i in sess_inputs)
        declared = tuple(s.name for s in artifact.inputs)
        if declared and sorted(declared) != sorted(names):
            raise RuntimeFailure(f"{artifact.path}: graph inputs {list(names)} do not match the "
                                 f"manifest's {list(declared)}; re-export the artifact")
        # Manifest order is the contract for callers; map it onto the session's names.
        self.input_names = declared or names
        dtype_of = dict(zip(names, self._dtypes))
        self._dtypes = [dtype_of[n] for n in self.input_names]
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        first = sess_inputs[0].shape[0] if sess_inputs and sess_inputs[0].shape else None
        # an .ort written with mobile_fixed_batch takes exactly that many rows per call
        self.fixed_batch: Optional[int] = first if isinstance(first, int) and first > 0 else None

    def _feed(self, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        if len(inputs) != len(self.input_names):
            raise RuntimeFailure(f"{self.artifact.path}: expected {len(self.input_names)} inputs "
                                 f"({', '.join(self.input_names)}), got {len(inputs)}")
        return {n: np.ascontiguousarray(x, dtype=d) for n, x, d in zip(self.input_names, inputs, self._dtypes)}

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        feed = self._feed(inputs)
        try:
            return list(self.session.run(None, feed))
        except Exception as exc:
            shapes = ", ".join(f"{n}{tuple(x.shape)}" for n, x in feed.items())
            raise RuntimeFailure(f"{self.artifact.path}: ONNX Runtime failed on inputs {shapes}: "
                                 f"{one_line(exc)}") from None

    def profile(self, inputs: Sequence[np.ndarray], warmup: int, iters: int) -> LatencyStats:
        from edgeprep.measure.latency import time_callable

        feed = self._feed(inputs)  # cast once: the timed call is the session alone
        self.run(inputs)  # fail here with a clear message, not inside the timing loop
        run = self.session.run
        return time_callable(lambda: run(None, feed), warmup=warmup, iters=iters,
                             threads=self.threads, batch=int(next(iter(feed.values())).shape[0]))

    def precision_census(self, save_graph_to: Optional[Path] = None) -> dict[str, Any]:
        from edgeprep.measure.census import census_from_counts, census_of_model

        if self.artifact.path.suffix == ".ort":
            return census_from_counts(ort_format_op_counts(self.artifact.path),
                                      optimization_level="saved-in-ort-file")
        graph = optimized_graph(self.artifact.path, self.optimize)
        census = census_of_model(graph, self.optimize)
        if save_graph_to is not None:  # the graph ORT really runs, for the user to open in Netron
            import onnx

            from edgeprep.fsutil import write_bytes_atomic

            write_bytes_atomic(Path(save_graph_to), onnx.ModelProto.SerializeToString(graph))
            census["optimized_graph"] = str(save_graph_to)
        return census


class OrtRuntime(Runtime):
    name = "onnxruntime"
    package = "onnxruntime"
    extra = None  # a core dependency

    def load(self, artifact: Artifact, threads: int = 1) -> OrtModel:
        if not Path(artifact.path).is_file():
            raise RuntimeFailure(f"{artifact.path}: model file not found; re-export the artifact")
        return OrtModel(artifact, threads=threads)

    def usable_here(self) -> tuple[bool, str]:
        try:
            ort = _ort()
        except MissingDependencyError as exc:
            return False, str(exc)
        providers = ort.get_available_providers()
        if "CPUExecutionProvider" not in providers:
            return False, f"no CPUExecutionProvider (available: {', '.join(providers)})"
        return True, f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs"
