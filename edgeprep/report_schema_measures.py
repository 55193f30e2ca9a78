"""report.json's measurement objects, shared by an artifact and its device entries: metric,
parity, latency, memory, precision, diagnosis, and the device entry itself.

Part of the ``edgeprep.report/2`` models (edgeprep/report_schema.py imports and re-exports them;
docs/report-schema.md documents every field and its unit).
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class OpenModel(BaseModel):
    """An object that may hold more keys than it names: exporters, runtimes and devices add their own.
    Strict types: a string where a number belongs is an error, not a conversion. Attribute
    docstrings become the JSON Schema's descriptions."""

    model_config = ConfigDict(strict=True, extra="allow", use_attribute_docstrings=True)


class ClosedModel(BaseModel):
    """An object built in one place (the top level, a gate result): an unknown key is a typo."""

    model_config = ConfigDict(strict=True, extra="forbid", use_attribute_docstrings=True)


# ----------------------------------------------------------------------------- measurements
class Metric(OpenModel):
    """The task metric over some rows; more keys are extra metrics of the task (embedding:
    ``top10_overlap``), each a number."""

    __pydantic_extra__: dict[str, Optional[float]]
    name: str
    """``accuracy`` (classification: fraction of rows whose argmax is the label) or ``mean_cosine``
    (embedding: mean cosine similarity to the reference embeddings)."""
    value: Optional[float]
    """The metric, in its own unit (a fraction for both above); null if it came out NaN."""
    samples: Optional[int] = None
    """Rows it was computed on (absent for the baseline and the stages: the whole eval split)."""
    higher_is_better: Optional[bool] = None
    """Absent means true. False for a loss-like metric: its drop is then ``value - reference``."""


class Parity(OpenModel):
    """The runtime's outputs against the PyTorch reference outputs, on the parity rows."""

    sqnr_db: Optional[float]
    """Signal-to-quantization-noise ratio over all outputs, dB, clipped to +/-200 (200: no
    measurable error). null means identical outputs (infinite SQNR): reports written before the
    clip used it; edgeprep no longer writes it."""
    max_abs: Optional[float]
    """Largest absolute output difference, output units; null when the outputs hold NaN/inf."""
    top1_agreement: Optional[float]
    """Fraction of rows whose argmax agrees (first output, when it is 2-D class logits); else null."""
    min_cosine: Optional[float] = None
    """Embedding models: the lowest per-row cosine similarity to the reference."""


class Latency(OpenModel):
    """Wall-clock time of one forward call, milliseconds, over ``iters`` timed calls."""

    p50: Optional[float]
    """Median, ms."""
    p90: Optional[float]
    """90th percentile, ms (what ``max_latency_ms_p90`` gates)."""
    p99: Optional[float]
    """99th percentile, ms."""
    mean: Optional[float]
    """Mean, ms."""
    ci95_p50: list[Optional[float]] = Field(min_length=2, max_length=2)
    """[low, high]: distribution-free 95% confidence interval of the median, ms."""
    iters: int
    """Timed calls."""
    warmup: int
    """Untimed calls before them."""
    threads: int
    """Intra-op threads the runtime was given."""
    batch: int
    """Rows per call."""


class Memory(OpenModel):
    """The artifact's own memory: its load and run in a process of its own (edgeprep/measure/memory.py).

    Three shapes: measured (``load_and_run_bytes`` ...), ``error`` (the subprocess failed; memory is
    reported, not gated) or ``not_measured`` (the runtime has no standalone runner)."""

    method: Optional[str] = None
    """``subprocess`` (this host), ``device runner`` (a device), or null when not measured."""
    load_and_run_bytes: Optional[int] = None
    """Bytes the load and the calls added to the process: ``peak_rss_bytes - rss_before_load_bytes``."""
    peak_rss_bytes: Optional[int] = None
    """The process's resident-set high-water mark, bytes (Python, numpy and the runtime included)."""
    rss_before_load_bytes: Optional[int] = None
    """Its resident set right before the load, bytes."""
    rss_source: Optional[str] = None
    """Where the peak was read: ``VmHWM`` (/proc) or ``ru_maxrss``."""
    peak_reset: Optional[bool] = None
    """Whether the high-water mark was reset right before the load."""
    load_ms: Optional[float] = None
    """Time to load the model, ms."""
    batch: Optional[int] = None
    """Rows per call."""
    warmup: Optional[int] = None
    """Calls before the measured ones."""
    iters: Optional[int] = None
    """Calls measured."""
    threads: Optional[int] = None
    """Intra-op threads."""
    seconds: Optional[float] = None
    """The subprocess's wall time, seconds, its runtime import included."""
    error: Optional[str] = None
    """Why the measurement failed."""
    not_measured: Optional[str] = None
    """Why nothing was measured."""


class Precision(OpenModel):
    """Which heavy ops run in low precision in the graph the runtime really executes."""

    low_precision_op_fraction: Optional[float] = None
    """Fraction (0-1) of the heavy ops (MatMul, Gemm, Conv and their integer forms) that run in
    low precision; absent where the runtime cannot show its executed graph (Core ML)."""
    ops: dict[str, int]
    """Op type -> count in the executed graph."""


class Diagnosis(OpenModel):
    """Why an SQNR gate failed: the first diverging layer, and the fixes re-validated (measure/diagnose.py)."""

    summary: str
    """One line: where parity broke, or why it was not localized."""
    fixes: list[dict[str, Any]]
    """Each fix tried: ``option`` (the recipe change), ``sqnr_db`` (dB, after it), ``passes``,
    ``bytes``, ``bytes_delta``, ``host_p50_ms``, ``host_p50_ms_before``, ``host_latency_ratio``;
    or ``option`` and ``error``."""
    target: Optional[str] = None
    """Where it was localized: ``this host`` or ``device <label>``."""
    divergence: Optional[dict[str, Any]] = None
    """The localization: ``layer``, ``sqnr_before_db``, ``sqnr_after_db``, ``reference``,
    ``threshold_db``, ``measured_db`` (layer -> dB)."""
    retrain: Optional[str] = None
    """The fix that needs retraining, named, not measured."""


# ----------------------------------------------------------------------------- devices
class DeviceRuntime(OpenModel):
    """The runtime the device runner used."""

    package: Optional[str]
    """The runtime's Python package on the device."""
    version: Optional[str]
    """Its version."""


class DeviceEntry(OpenModel):
    """The artifact on one of ``validate.devices``. Shapes: measured, ``native`` (this host's own
    measurement, listed again), ``error`` (the device failed) or ``not_run`` (its runtime is not
    supported there). Measurements are as the artifact's own, with the same units."""

    device: str
    """The device's label."""
    url: Optional[str]
    """``ssh://user@host``, ``emu://<family>`` or ``native``."""
    native: bool = False
    """True for the host's own entry: its gates are the artifact's."""
    emulated: Optional[bool] = None
    """True on an emu:// device: its latency is QEMU's translation speed, never gated."""
    description: Optional[dict[str, Any]] = None
    """The device as its runner saw it: cpu, arch, isa, isa_flags, cores, os, kernel, memory_bytes, ..."""
    runtime: Optional[DeviceRuntime] = None
    latency_ms: Optional[Latency] = None
    load_ms: Optional[float] = None
    """Time to load the model on the device, ms."""
    memory: Optional[Memory] = None
    parity: Optional[Parity] = None
    metric: Optional[Metric] = None
    """On the parity rows (the reference inputs sent to the device), not the whole eval split."""
    speedup: Optional[float] = None
    """The export entry's fp32 artifact p50 / this p50, both on this device; null when emulated."""
    error: Optional[str] = None
    """Why the device failed (the run then fails after writing the report)."""
    exit_code: Optional[int] = None
    """The error's exit code."""
    not_run: Optional[str] = None
    """Why the artifact was not run there."""
    note: Optional[str] = None
    family: Optional[str] = None
    """emu:// only: the emulated CPU family."""
    latency_is_timing: Optional[bool] = None
    """emu:// only: false."""
    latency_note: Optional[str] = None
    qemu: Optional[dict[str, Any]] = None
    """emu:// only: binary, version, cpu."""
    diagnosis: Optional[Diagnosis] = None
