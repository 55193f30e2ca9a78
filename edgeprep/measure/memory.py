"""Each artifact's own memory: its load and inference measured in a fresh process of its own.

Why not this process's RSS: when edgeprep judges an artifact it already holds torch, the data and
every earlier artifact's session, so its high-water mark (626-688 MB for a 128 kB model) is the
same for every artifact and says nothing about any of them. The device runner
(edgeprep/remote/runner.py) loads one artifact in a process of its own and reports that process's
RSS before the load and its peak after; here it runs on this host as a subprocess of
``sys.executable``, over the same protocol as on a device, but reads the model file in place (no
copy). Its peak is read from the process image's own counter (edgeprep/remote/rss.py: ru_maxrss
would carry this process's peak into the child) and restarted right before the load.

report.json, per artifact measured here: ``"memory"``:
  {"method": "subprocess",
   "load_and_run_bytes": what loading the model and running it at the profile batch adds to a
                         process that has Python, numpy and the runtime imported (peak - before),
   "peak_rss_bytes": the subprocess's RSS high-water mark (Python, numpy and the runtime included),
   "rss_before_load_bytes": its RSS with those imported, right before the load,
   "rss_source": "VmHWM" | "ru_maxrss", "peak_reset": bool (rss.py), "load_ms",
   "batch", "warmup", "iters", "threads": the calls made after the load,
   "seconds": the subprocess's wall time, its runtime import included}
or {"method": "subprocess", "error": why} when the subprocess failed (memory is not gated, so the
run goes on), or {"method": null, "not_measured": why} for a runtime without a standalone runner.
Reports written before this field have only ``latency_ms.peak_rss_bytes``: the whole edgeprep
process's mark, the same for every artifact; the views do not show it.

Device entries (edgeprep/remote/profile.py) carry the same ``memory`` keys with ``"method":
"device runner"``.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from edgeprep.gates import as_number

SUBPROCESS = "subprocess"
DEVICE_RUNNER = "device runner"
# A peak needs the allocations of one call, not a distribution: the first call sizes the runtime's
# arenas; a few more show they are reused. Each costs a call's time only.
MEMORY_WARMUP = 1
MEMORY_ITERS = 3
# The subprocess imports the runtime before anything else: ~0.2 s for onnxruntime, ~0.1 s for
# ai-edge-litert, 6-8 s for executorch (it imports torch) on a 2-core EPYC; a big model's load on top.
START_TIMEOUT_S = 120
TIMEOUT_S = 600


@dataclass(frozen=True)
class LocalProcess:
    """What session._Session needs to know of the "device": here, a subprocess on this host."""

    timeout_s: int = TIMEOUT_S
    connect_timeout_s: int = START_TIMEOUT_S
    remote_tmp: Optional[str] = None  # the runner's work dir (its inputs only): the default temp dir
    label: str = "subprocess on this host"

    @property
    def remote_python(self) -> str:  # what the session's error messages call the runner's interpreter
        return sys.executable


def load_and_run_bytes(memory: Any) -> Optional[int]:
    """An entry's ``memory`` -> the bytes its load and run added; also for entries written before the
    field (device entries had peak and before). None when nothing was measured."""
    if not isinstance(memory, Mapping) or memory.get("error") or memory.get("not_measured"):
        return None
    value = as_number(memory.get("load_and_run_bytes"))
    if value is None:
        peak, before = as_number(memory.get("peak_rss_bytes")), as_number(memory.get("rss_before_load_bytes"))
        value = peak - before if peak is not None and before is not None else None
    return None if value is None else int(value)


def memory_entry(result: Mapping[str, Any], method: str, **measured_with: Any) -> dict[str, Any]:
    """The report's ``memory`` from a runner's result (runner.measure's fields)."""
    peak, before = result.get("peak_rss_bytes"), result.get("rss_before_load_bytes")
    return {"method": method,
            "load_and_run_bytes": max(0, int(peak) - int(before)) if peak is not None and before is not None else None,
            "peak_rss_bytes": peak, "rss_before_load_bytes": before,
            "rss_source": result.get("rss_source"), "peak_reset": result.get("peak_reset"), **measured_with}


def measure_memory(artifact: Any, inputs: Sequence[Any], *, threads: int, warmup: int = MEMORY_WARMUP,
                   iters: int = MEMORY_ITERS, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """``artifact`` loaded and run on ``inputs`` (one array per model input, the profile batch's rows)
    in a subprocess of its own: the report's ``memory`` (module docstring). Never raises an
    edgeprep error: a failure is recorded in the entry, as memory is reported, not gated."""
    from edgeprep.errors import EdgeprepError
    from edgeprep.remote.runner import RUNNERS

    if artifact.runtime not in RUNNERS:
        return {"method": None, "not_measured": f"{artifact.runtime} has no standalone runner to load it in a "
                                                f"process of its own (runners: {', '.join(sorted(RUNNERS))})"}
    started = time.monotonic()
    try:
        result = _run_in_subprocess(artifact, inputs, threads=threads, warmup=warmup, iters=iters, log=log)
    except EdgeprepError as exc:
        return {"method": SUBPROCESS, "error": str(exc)}
    return memory_entry(result, SUBPROCESS, load_ms=float(result["load_ms"]), batch=int(result["batch"]),
                        warmup=int(warmup), iters=int(iters), threads=int(threads),
                        seconds=round(time.monotonic() - started, 3))


def _run_in_subprocess(artifact: Any, inputs: Sequence[Any], *, threads: int, warmup: int, iters: int,
                       log: Callable[[str], None]) -> Mapping[str, Any]:
    """The runner's result event for one artifact, run by ``sys.executable`` (session.py's protocol)."""
    from edgeprep.errors import EdgeprepError, RuntimeFailure
    from edgeprep.remote.session import (
        _cancel,
        _collect,
        _frame,
        _npz_bytes,
        _Session,
        remove_local_dir,
        runner_args,
        runner_source,
        runtime_info,
    )

    device = LocalProcess()
    source = runner_source()
    npz = _npz_bytes(inputs)
    session = _Session(device, [sys.executable, *runner_args(source, artifact.runtime, None)], source, log,
                       timeout_s=device.timeout_s)
    hello: dict[str, Any] = {}
    try:
        hello = session.wait("starting", within_s=device.connect_timeout_s)
        if hello["event"] == "error":  # no temp dir for the inputs
            session.wait("starting")
            raise RuntimeFailure(f"memory of {artifact.name}: {hello['message']}")
        if not hello["runtime"]["ok"]:
            _cancel(session, "runtime missing")
            raise RuntimeFailure(f"memory of {artifact.name}: {sys.executable} cannot import {artifact.runtime} in a "
                                 f"subprocess: {hello['runtime']['error']}")
        path = Path(artifact.path).resolve()
        job = {"runtime": artifact.runtime, "model": path.name, "model_path": str(path),
               "inputs": "inputs.npz", "warmup": int(warmup), "iters": int(iters), "threads": int(threads),
               "batch": int(len(inputs[0])), "parity": False, "input_names": [s.name for s in artifact.inputs],
               "info": runtime_info(artifact), "files": [{"name": "inputs.npz", "bytes": len(npz)}]}
        session.send(_frame(json.dumps(job).encode()))
        session.send(npz)
        result, _ = _collect(session, artifact, hello)
        return result
    except EdgeprepError:
        if hello.get("workdir") and not session.saw_bye:  # killed before it removed its inputs' dir
            remove_local_dir(hello["workdir"])
        raise
    finally:
        session.close()
