"""The two interfaces every target implements: an Exporter that writes an artifact, and a Runtime
that loads it and runs it. Registries live in ``edgeprep.exporters`` (this package's __init__).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from edgeprep.errors import BadInputError
from edgeprep.exporters.options import ExportOptions  # noqa: F401  (re-exported: the exporters' base)
from edgeprep.types import Artifact, LatencyStats


def package_version(dist: str) -> str | None:
    """Installed version of a distribution, for the manifest (None when not installed)."""
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def short_error(exc: BaseException, limit: int = 300) -> str:
    """One line for an error message: the type and the whitespace-collapsed text, capped."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"


# Targets whose export goes through torch.export and cannot take a QAT (fake-quant) model yet.
TORCH_EXPORT_TARGETS = ("executorch", "litert")
QAT_TORCH_EXPORT_FIX = ("export the float model from before the qat stage instead (a recipe's `int8: true` adds the "
                        "target's own int8 PTQ), or export this one to onnx, tensorrt or coreml, which carry the QAT "
                        "numbers")


def refuse_qat_model(model: Any, target: str) -> None:
    """One clear line instead of torch.export's data-dependent-guard trace: the fake quantizers'
    calibration branch and scale checks read tensors, which torch.export cannot trace, and lowering
    the QAT numbers onto ExecuTorch's / LiteRT's integer kernels is not built. (A binarized model
    exports to ExecuTorch: its binarizers have a branch-free inference form.)"""
    from edgeprep.quant.linear import QuantLinear

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise BadInputError(f"{target}: a QAT (fake-quant) model cannot be exported to {target} yet; "
                            + QAT_TORCH_EXPORT_FIX)


def static_example(example_inputs: Sequence[Any], batch: int) -> tuple[Any, ...]:
    """The example inputs at the fixed batch an edge program is built for (first row repeated)."""
    return tuple(t[:1].expand(batch, *t.shape[1:]).contiguous() for t in example_inputs)


def float32_feed(names: Sequence[str], inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs by name as contiguous float32, the feed dict Core ML and Polygraphy's runners take."""
    return {n: np.ascontiguousarray(x, dtype=np.float32) for n, x in zip(names, inputs)}


class Exporter(ABC):
    target: ClassVar[str]  # registry key, e.g. "onnx"
    runtime: ClassVar[str]  # key into RUNTIMES that runs what this exporter writes
    options_model: ClassVar[type[ExportOptions]] = ExportOptions

    @abstractmethod
    def export(self, model: Any, example_inputs: tuple[Any, ...], out_dir: Path,
               options: ExportOptions) -> Artifact:
        """Write the artifact's files into ``out_dir`` (an empty directory) and describe them.

        ``model`` is an eval-mode torch.nn.Module; ``example_inputs`` a tuple of torch tensors
        with a batch of at least 2 (a batch-1 example bakes batch 1 into some graphs).
        Raise ExportError (exit 3) with a one-line reason on failure.
        """

    def derived(self, artifact: Artifact, calib_inputs: Sequence[np.ndarray], out_root: Path,
                options: ExportOptions) -> list[Artifact]:
        """Artifacts derived from ``artifact`` (e.g. the runtime's own PTQ as a peer baseline).

        Each is already written in its own directory under ``out_root``; the pipeline writes their
        manifests and reference data. Default: none.
        """
        return []


class Int8PeerExporter(Exporter):
    """A target whose options have ``int8``: ``derived`` makes the runtime's own int8 PTQ peer
    (``<name>-int8``) from the fp32 artifact with the pipeline's calibration inputs."""

    @abstractmethod
    def int8_peer(self, artifact: Artifact, calib_inputs: Sequence[np.ndarray], out_dir: Path) -> Artifact:
        """Write the int8 peer of ``artifact`` into ``out_dir`` and describe it."""

    def derived(self, artifact: Artifact, calib_inputs: Sequence[np.ndarray], out_root: Path,
                options: ExportOptions) -> list[Artifact]:
        if not getattr(self.options_model.of(options), "int8", False) or not len(calib_inputs):
            return []
        return [self.int8_peer(artifact, calib_inputs, Path(out_root) / f"{artifact.name}-int8")]


class LoadedModel(ABC):
    """An artifact loaded into its runtime with a fixed thread count."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    fixed_batch: int | None = None  # a static-shape model takes exactly this many rows per call

    @abstractmethod
    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one forward pass; inputs in the artifact's input order."""

    def profile(self, inputs: Sequence[np.ndarray], warmup: int, iters: int) -> LatencyStats:
        from edgeprep.measure.latency import time_callable

        return time_callable(lambda: self.run(inputs), warmup=warmup, iters=iters,
                             threads=self.threads, batch=int(inputs[0].shape[0]))

    def precision_census(self, save_graph_to: Path | None = None) -> dict[str, Any] | None:
        """Which heavy ops run in low precision after the runtime's own graph rewrites.

        With ``save_graph_to``, also write the graph the runtime executes there (when it can).

        Returns {"low_precision_op_fraction": float, "ops": {op_type: count}, ...} or None when
        the runtime cannot show its executed graph.
        """
        return None

    threads: int = 1


class Runtime(ABC):
    name: ClassVar[str]  # registry key, e.g. "onnxruntime"
    package: ClassVar[str]  # importable package that provides it, for `edgeprep doctor`
    extra: ClassVar[str | None] = None  # edgeprep extra that installs it

    @abstractmethod
    def load(self, artifact: Artifact, threads: int = 1) -> LoadedModel:
        """Load ``artifact``; raise RuntimeFailure (exit 3) or MissingDependencyError (exit 4)."""

    def usable_here(self) -> tuple[bool, str]:
        """(usable, reason) for `edgeprep doctor`; default: usable when the package imports."""
        return True, ""

    def version(self) -> str | None:
        """The runtime package's version, recorded beside every number measured with it (kernels
        change between releases). Read from the module when it is already imported (what really
        ran), else from the installed distribution, so asking never imports a heavy runtime."""
        import sys

        loaded = sys.modules.get(self.package)
        return getattr(loaded, "__version__", None) or package_version(self.package)
