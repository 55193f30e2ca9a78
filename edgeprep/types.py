"""Small shared value types: tensor specs, artifacts, latency statistics.

Kept free of heavy imports (no torch, no onnx) so every module and the CLI can import them cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

# Who an artifact speaks for in the report:
#   "edgeprep" - the recipe's final model (what the user ships)
#   "baseline" - the fp32 model before any compression stage, same target (speedup reference)
#   "ptq"      - what users do today: the runtime's own post-training quantization of the baseline
ARTIFACT_ROLES = ("edgeprep", "baseline", "ptq")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # a str is a symbolic (dynamic) dim, e.g. "batch"
    dtype: str  # numpy dtype name, e.g. "float32"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(name=str(d["name"]), shape=tuple(d["shape"]), dtype=str(d["dtype"]))


@dataclass(frozen=True)
class Artifact:
    """One exported model on disk. ``path`` is the main model file inside ``path.parent``."""

    name: str  # artifact directory name, unique in a run: "onnx", "onnx-ptq-dynamic", ...
    target: str  # exporter registry key: "onnx", ...
    runtime: str  # runtime registry key: "onnxruntime", ...
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sha256: str
    size_bytes: int
    role: str = "edgeprep"
    info: Mapping[str, Any] = field(default_factory=dict)  # exporter facts (exporter used, opset, ...)

    @property
    def dir(self) -> Path:
        return self.path.parent


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of one forward call, in milliseconds, over ``iters`` timed calls."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    ci95_p50_ms: tuple[float, float]  # distribution-free 95% confidence interval of the median
    iters: int
    warmup: int
    threads: int
    batch: int
    # No memory figure: the profiling process's RSS is edgeprep's (torch, data, earlier artifacts),
    # not the artifact's. Each artifact's own memory is measured in a process of its own
    # (edgeprep/measure/memory.py) and reported beside latency_ms, under "memory".

    def to_report(self) -> dict[str, Any]:
        return {
            "p50": self.p50_ms,
            "p90": self.p90_ms,
            "p99": self.p99_ms,
            "mean": self.mean_ms,
            "ci95_p50": list(self.ci95_p50_ms),
            "iters": self.iters,
            "warmup": self.warmup,
            "threads": self.threads,
            "batch": self.batch,
        }
