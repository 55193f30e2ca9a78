"""Judge one artifact on its own runtime: parity, task metric, latency, precision census.

Used by the pipeline for every exported artifact and by ``edgeprep validate`` / ``profile`` on an
artifact directory alone (then the manifest's reference inputs/outputs are the ground truth).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from edgeprep.errors import BadInputError
from edgeprep.manifest import MANIFEST_NAME, load_artifact, load_reference
from edgeprep.measure.metrics import extra_metrics, metric_for
from edgeprep.types import Artifact, LatencyStats, TensorSpec


def as_input_list(x: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """One array per model input: a single array is a one-input model's rows."""
    return [x] if isinstance(x, np.ndarray) else list(x)


def run_batched(loaded, x: np.ndarray | Sequence[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """First output of the runtime over rows ``x`` (one array, or one per input with the same rows)
    in batches. A model with a fixed batch size (an .ort written with mobile_fixed_batch, an
    ExecuTorch or LiteRT program) gets chunks of exactly that size, the last one padded with
    copies of its last row (their outputs are dropped)."""
    xs = as_input_list(x)
    n = len(xs[0])
    fixed = getattr(loaded, "fixed_batch", None)
    if fixed:
        outs = []
        for i in range(0, n, fixed):
            chunks = [a[i:i + fixed] for a in xs]
            pad = fixed - len(chunks[0])
            if pad:
                chunks = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunks]
            outs.append(loaded.run(chunks)[0][:fixed - pad])
        return np.concatenate(outs, axis=0)
    outs = [loaded.run([a[i:i + batch_size] for a in xs])[0] for i in range(0, n, batch_size)]
    return np.concatenate(outs, axis=0)


def parity_of(ref_outputs: np.ndarray, outputs: np.ndarray) -> dict[str, Any]:
    from edgeprep.measure.parity import parity

    return parity([ref_outputs], [outputs])


def load_runtime(artifact: Artifact, threads: int = 1):
    from edgeprep.exporters import get_runtime

    return get_runtime(artifact.runtime).load(artifact, threads=threads)


def judge(artifact: Artifact, *, task: str, ref_inputs: np.ndarray | Sequence[np.ndarray], ref_outputs: np.ndarray,
          eval_x: Optional[np.ndarray | Sequence[np.ndarray]], eval_y: Optional[np.ndarray], warmup: int, iters: int,
          threads: int, batch: int, save_graph_to: Optional[Path] = None) -> dict[str, Any]:
    """Measure ``artifact`` on its runtime; returns the report's per-artifact fields: parity, metric,
    latency_ms (here, in this process), memory (in a subprocess of its own: measure/memory.py), precision.

    A runtime that cannot run on this machine (Core ML off macOS, TensorRT without its libraries
    or a GPU) measures nothing: parity, metric and latency are null and ``not_run`` says why, so
    the gates and the report show the gap instead of hiding it."""
    from edgeprep.exporters import get_runtime

    runtime = get_runtime(artifact.runtime)
    usable, why = runtime.usable_here()
    if not usable:
        return {"parity": None, "metric": None, "latency_ms": None, "memory": None, "precision": None,
                "not_run": why, "runtime_version": runtime.version()}
    loaded = load_runtime(artifact, threads=threads)
    outputs = run_batched(loaded, ref_inputs)
    # provenance: int8 kernels differ per runtime release (and per CPU: report.json's machine.cpu)
    entry: dict[str, Any] = {"runtime_version": runtime.version(), "parity": parity_of(ref_outputs, outputs)}
    if task == "embedding":  # per-sentence agreement with the PyTorch model; top-1 of embedding dims means nothing
        from edgeprep.measure.embedding import cosines

        entry["parity"]["top1_agreement"] = None
        entry["parity"]["min_cosine"] = float(cosines(ref_outputs, outputs).min())
    name, fn = metric_for(task)
    if eval_x is not None and eval_y is not None:
        eval_out = run_batched(loaded, eval_x)
        entry["metric"] = {"name": name, "value": fn(eval_out, eval_y), "samples": int(len(eval_y)),
                           **extra_metrics(task, eval_out, eval_y)}
    else:
        entry["metric"] = None
    profile_inputs = [_batch_of(a, getattr(loaded, "fixed_batch", None) or batch) for a in as_input_list(ref_inputs)]
    stats: LatencyStats = loaded.profile(profile_inputs, warmup=warmup, iters=iters)
    entry["latency_ms"] = stats.to_report()
    # this process's RSS is edgeprep's (torch, data, earlier artifacts): the artifact's own memory
    # is its load and run in a fresh process, at the profile batch
    from edgeprep.measure.memory import measure_memory

    entry["memory"] = measure_memory(artifact, profile_inputs, threads=threads)
    entry["precision"] = loaded.precision_census(save_graph_to=save_graph_to)
    return entry


def _batch_of(x: np.ndarray, batch: int) -> np.ndarray:
    reps = int(np.ceil(batch / len(x)))
    return np.ascontiguousarray(np.concatenate([x] * reps, axis=0)[:batch])


def judge_artifact_dir(artifact_dir: Path, *, warmup: int, iters: int, threads: int,
                       batch: int) -> tuple[Artifact, dict[str, Any]]:
    """``edgeprep validate``: re-check an artifact directory alone against its stored reference."""
    artifact = load_artifact(artifact_dir, verify=True)
    ref = load_reference(artifact_dir)
    entry = judge(artifact, task=ref.task, ref_inputs=ref.inputs, ref_outputs=ref.outputs[0],
                  eval_x=ref.inputs if ref.labels is not None else None, eval_y=ref.labels,
                  warmup=warmup, iters=iters, threads=threads, batch=batch)
    return artifact, entry


# ----------------------------------------------------------------------------- bare model files
# A model file without a manifest can still be profiled (not validated: it has no reference).
SUFFIX_TARGETS = {".onnx": ("onnx", "onnxruntime"), ".ort": ("ort-mobile", "onnxruntime")}


def artifact_from_path(path: Path, verify: bool = True) -> Artifact:
    """An artifact directory (with manifest.json) or a bare model file known by its suffix."""
    path = Path(path)
    if path.is_dir():
        return load_artifact(path, verify=verify)
    if not path.exists():
        raise BadInputError(f"{path}: no such artifact directory or model file")
    if path.suffix not in SUFFIX_TARGETS:
        raise BadInputError(f"{path}: unknown model file type {path.suffix!r}; pass an artifact directory "
                            f"(with {MANIFEST_NAME}) or one of: {', '.join(sorted(SUFFIX_TARGETS))}")
    target, runtime = SUFFIX_TARGETS[path.suffix]
    from edgeprep.fsutil import sha256_file

    return Artifact(name=path.stem, target=target, runtime=runtime, path=path,
                    inputs=_onnx_inputs(path), outputs=(), sha256=sha256_file(path),
                    size_bytes=path.stat().st_size, role="edgeprep", info={})


def _onnx_inputs(path: Path) -> tuple[TensorSpec, ...]:
    from edgeprep.exporters.onnxruntime_rt import ORT_DTYPES, create_session

    sess = create_session(path)  # a load failure is a one-line RuntimeFailure (exit 3)
    def dims(shape) -> tuple[int | str, ...]:  # dim 0 symbolic -> "batch"; other symbols kept ("sequence")
        return tuple(d if isinstance(d, int) else ("batch" if i == 0 else (d or "?")) for i, d in enumerate(shape))

    return tuple(TensorSpec(i.name, dims(i.shape), np.dtype(ORT_DTYPES.get(i.type, np.float32)).name)
                 for i in sess.get_inputs())


DEFAULT_SEQ_LEN = 128  # what a bare token model's symbolic sequence dim is profiled at


def synthetic_inputs(artifact: Artifact, batch: int, seq_len: int = DEFAULT_SEQ_LEN,
                     seed: int = 0) -> list[np.ndarray]:
    """Inputs matching the artifact's input specs: a symbolic dim 0 -> ``batch``, any other
    symbolic dim (a sequence) -> ``seq_len``. Float inputs are random normal; integer inputs are
    ones (a valid token id and a full attention mask: random integers could exceed a vocabulary)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in artifact.inputs:
        shape = [int(d) if not isinstance(d, str) else (batch if i == 0 else seq_len) for i, d in enumerate(spec.shape)]
        if np.issubdtype(np.dtype(spec.dtype), np.integer) or np.dtype(spec.dtype) == np.bool_:
            arrays.append(np.ones(shape, dtype=spec.dtype))
        else:
            arrays.append(rng.standard_normal(shape).astype(spec.dtype))
    return arrays


def profile_path(path: Path, *, warmup: int, iters: int, threads: int, batch: int,
                 seq_len: int = DEFAULT_SEQ_LEN) -> tuple[Artifact, LatencyStats]:
    """``edgeprep profile``: reference inputs when the artifact has them, else synthetic ones."""
    artifact = artifact_from_path(path)
    if (Path(path) / MANIFEST_NAME).is_file():
        inputs: Sequence[np.ndarray] = [_batch_of(x, batch) for x in load_reference(path).inputs]
    else:
        inputs = synthetic_inputs(artifact, batch, seq_len)
    loaded = load_runtime(artifact, threads=threads)
    return artifact, loaded.profile(list(inputs), warmup=warmup, iters=iters)
