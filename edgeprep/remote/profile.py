"""Profile an artifact on a remote device and judge what comes back, as the host judges itself.

The entry this returns goes into report.json under the artifact, in ``"devices"``:
  {"device": label, "url", "description": {cpu, board, cores, machine, os, kernel, memory_bytes, python, ...},
   "runtime": {"package", "version"}, "latency_ms": {p50, p90, p99, mean, ci95_p50, iters, warmup, threads,
   batch}, "memory": {"method": "device runner", "load_and_run_bytes", "peak_rss_bytes",
   "rss_before_load_bytes", "rss_source", "peak_reset"} (as the host's, edgeprep/measure/memory.py), "load_ms",
   "parity": {sqnr_db, max_abs, top1_agreement} | null, "metric": {name, value, samples} | null}
Latency percentiles are computed here from the device's raw per-call samples with the same code
as on the host (measure/latency.py), so the two are comparable.

An emu:// device's entry adds "emulated": true, "family", "qemu": {binary, version, cpu},
"latency_is_timing": false and "latency_note"; its description names the emulated CPU model and its
ISA flags ("cpu", "isa": flags on, "isa_flags": on and off, "emulated_by"); what the runner saw
itself (the host's CPU, on x86) is kept in "runner_cpu" / "runner_isa".
Its latency is QEMU's translation speed, kept for completeness and never gated. ssh:// entries say
"emulated": false. A `native` entry (native_entry) is the host's own measurement, not a new run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from edgeprep.measure.latency import summarize_ns
from edgeprep.measure.memory import DEVICE_RUNNER, memory_entry
from edgeprep.remote.emulate import EMULATED_ITERS, EMULATED_WARMUP, LATENCY_NOTE, EmulatedDevice, NativeDevice
from edgeprep.remote.session import AnyDevice, run_on_device
from edgeprep.types import Artifact


def device_entry(artifact: Artifact, device: AnyDevice, *, ref_inputs: Sequence[np.ndarray],
                 ref_outputs: Optional[np.ndarray], labels: Optional[np.ndarray], task: Optional[str],
                 warmup: int, iters: int, threads: int, batch: int,
                 log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Run ``artifact`` on ``device`` (one array per model input in ``ref_inputs``): parity with
    ``ref_outputs`` (when given), the task metric on
    ``labels`` (when given), latency percentiles and memory, and the device's description."""
    parity_wanted = ref_outputs is not None or labels is not None
    emulated = isinstance(device, EmulatedDevice)
    if emulated:  # not a timing: a few calls prove the runner works, more only cost time
        warmup, iters = min(warmup, EMULATED_WARMUP), min(iters, EMULATED_ITERS)
    res = run_on_device(artifact, device, list(ref_inputs), warmup=warmup, iters=iters, threads=threads,
                        batch=batch, parity=parity_wanted, log=log)
    stats = summarize_ns(res.samples_ns, warmup=warmup, threads=threads, batch=res.batch)
    entry: dict[str, Any] = {
        "device": device.label, "url": device.url, "description": res.description,
        "runtime": {"package": res.runtime_package, "version": res.runtime_version},
        "latency_ms": stats.to_report(), "load_ms": res.load_ms,
        "memory": memory_entry({"peak_rss_bytes": res.peak_rss_bytes, "rss_source": res.rss_source,
                                "rss_before_load_bytes": res.rss_before_load_bytes, "peak_reset": res.peak_reset},
                               DEVICE_RUNNER),
        "parity": None, "metric": None, "emulated": emulated}
    if emulated and res.emulation is not None:
        emu, fam = res.emulation, device.family
        entry.update(family=fam.name, latency_is_timing=False, latency_note=LATENCY_NOTE,
                     qemu={"binary": str(emu.qemu), "version": emu.qemu_version, "cpu": fam.qemu_cpu})
        # the runner reads /proc/cpuinfo, which under qemu-x86_64 is this host's: name the emulated CPU
        # instead ("isa": the flags on, as the runner lists them; "isa_flags": on and off, as probed)
        entry["description"] = {**res.description, "cpu": fam.cpu_model,
                                "isa": sorted(k for k, v in emu.isa.items() if v), "isa_flags": emu.isa,
                                "emulated_by": f"qemu-{fam.arch} {emu.qemu_version} -cpu {fam.qemu_cpu}",
                                "runner_cpu": res.description.get("cpu"), "runner_isa": res.description.get("isa")}
    if ref_outputs is not None:
        from edgeprep.measure.parity import parity

        entry["parity"] = parity([ref_outputs], [res.outputs[0]])
        if task == "embedding":  # as on the host (validate.judge): top-1 of embedding dims means nothing
            from edgeprep.measure.embedding import cosines

            entry["parity"]["top1_agreement"] = None
            entry["parity"]["min_cosine"] = float(cosines(ref_outputs, res.outputs[0]).min())
    if labels is not None and task is not None:
        from edgeprep.measure.metrics import metric_for

        name, fn = metric_for(task)
        entry["metric"] = {"name": name, "value": fn(res.outputs[0], labels), "samples": int(len(labels))}
    return entry


def native_entry(device: NativeDevice, host_entry: dict[str, Any]) -> dict[str, Any]:
    """`native` in validate.devices: the artifact's own host measurement, listed as a device (not run
    again), with this host's CPU and ISA flags, so a recipe can name the set of families it covers."""
    import platform

    from edgeprep.remote.emu_cache import host_isa
    from edgeprep.remote.runner import describe_device

    entry = {"device": device.label, "url": device.url, "native": True, "emulated": False,
             "description": {**describe_device(), "isa_flags": host_isa()},
             "runtime": {"package": host_entry.get("runtime"), "version": host_entry.get("runtime_version")},
             "latency_ms": host_entry.get("latency_ms"), "memory": host_entry.get("memory"),
             "parity": host_entry.get("parity"),
             "metric": host_entry.get("metric"),
             "note": f"this host ({platform.machine()}): the artifact's own measurement, not run again; its gates "
                     "are the artifact's"}
    if host_entry.get("not_run"):
        entry["not_run"] = host_entry["not_run"]
    return entry


def profile_artifact_on_device(path: Path, device: AnyDevice, *, warmup: int, iters: int, threads: int, batch: int,
                               seq_len: int = 128,
                               log: Callable[[str], None] = lambda m: None) -> tuple[Artifact, dict[str, Any]]:
    """``edgeprep profile ARTIFACT --device``: an artifact directory brings its reference inputs and
    outputs (so parity is checked on the device); a bare model file is timed on random inputs."""
    from edgeprep.manifest import MANIFEST_NAME, load_reference
    from edgeprep.validate import artifact_from_path, synthetic_inputs

    artifact = artifact_from_path(path)
    if (Path(path) / MANIFEST_NAME).is_file():
        ref = load_reference(path)
        return artifact, device_entry(artifact, device, ref_inputs=ref.inputs, ref_outputs=ref.outputs[0],
                                      labels=ref.labels, task=ref.task, warmup=warmup, iters=iters,
                                      threads=threads, batch=batch, log=log)
    xs = synthetic_inputs(artifact, batch, seq_len)
    return artifact, device_entry(artifact, device, ref_inputs=xs, ref_outputs=None, labels=None, task=None,
                                  warmup=warmup, iters=iters, threads=threads, batch=batch, log=log)
