"""After the stages: export every recipe entry, judge each artifact on its runtime (here and on the
recipe's devices), build report.json, gate it and write the report. ``edgeprep.pipeline`` calls
``finish`` with what its stages produced."""
from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from edgeprep import __version__
from edgeprep.artifacts import expectations, export_artifact
from edgeprep.errors import EdgeprepError
from edgeprep.manifest import load_artifact, write_manifest
from edgeprep.measure.host import host_cpu
from edgeprep.measure.metrics import metric_for, torch_outputs
from edgeprep.models.hf import runtime_inputs
from edgeprep.recipe import Recipe
from edgeprep.report_schema import REPORT_SCHEMA


@dataclass
class _Judging:
    """What every artifact is judged against: the parity rows (as the pipeline holds them and as the
    runtimes are fed), the eval split, and the reference outputs of both PyTorch models."""

    task: str
    ref_x: np.ndarray  # the pipeline's rows (packed for token models)
    ref_y: np.ndarray
    ref_in: list  # one array per artifact input (input_ids and attention_mask for token models)
    eval_in: list
    eval_y: np.ndarray
    ref_outputs: dict[str, Any]  # "edgeprep": the final model's, "other": the fp32 baseline's
    compressed: bool  # a stage compressed the model, so the fp32 baseline is exported beside it


def finish(recipe: Recipe, state: Any, run_dir: Path, model, baseline_model, stage_entries, compressed: bool,
           opts: Any) -> dict[str, Any]:
    """Export, judge every artifact (here and on the recipe's devices), gate, write the report.
    ``state``: the pipeline's loaded inputs (data, example inputs, model name, base dir)."""
    vcfg = recipe.validate_
    eval_x, eval_y = state.eval_x.numpy(), state.eval_y.numpy()
    ref_x = np.ascontiguousarray(eval_x[:vcfg.parity_samples])
    ref_outputs = {"edgeprep": torch_outputs(model, torch.from_numpy(ref_x))}
    ref_outputs["other"] = torch_outputs(baseline_model, torch.from_numpy(ref_x)) if compressed else ref_outputs["edgeprep"]
    j = _Judging(state.data.task, ref_x, eval_y[:vcfg.parity_samples], runtime_inputs(model, ref_x),
                 runtime_inputs(model, eval_x), eval_y, ref_outputs, compressed)
    artifacts, group = _export_all(recipe, state, run_dir, model, baseline_model, j, opts)
    device_errors: list[EdgeprepError] = []
    entries = _judge_all(artifacts, group, vcfg, state, run_dir, j, device_errors, opts)
    report = _report_document(recipe, state, model, baseline_model, stage_entries, entries, j)
    if recipe.gates.min_sqnr_db is not None:  # a failed SQNR gate names the layer that broke it, and the fix
        from edgeprep.measure.diagnose import diagnose_entries

        devices = {d.label: d for d in (c.to_device(state.base_dir) for c in vcfg.devices)}
        diagnose_entries(entries, artifacts, recipe.gates.min_sqnr_db, j.ref_in, ref_outputs["edgeprep"],
                         devices=devices, torch_model=model, torch_x=torch.from_numpy(ref_x), log=opts.log)
    from edgeprep.gates import evaluate_gates
    from edgeprep.report import write_reports

    report["gates"] = evaluate_gates(recipe.gates, report)
    report["passed"] = all(g["passed"] for g in report["gates"]) and not device_errors
    write_reports(run_dir, report)
    if device_errors:  # the report keeps every measurement made; the run still fails, with the error's exit code
        first = device_errors[0]
        more = f" (and {len(device_errors) - 1} more device error(s))" if len(device_errors) > 1 else ""
        raise type(first)(f"{first}{more}; the report with every other result is in {run_dir}")
    return report


def _export_all(recipe: Recipe, state: Any, run_dir: Path, model, baseline_model, j: _Judging, opts):
    """Every export entry's artifact, its fp32 baseline (when a stage compressed the model) and its
    derived peers; ``group`` maps each artifact to the entry it belongs to (its speedup reference)."""
    from edgeprep.exporters import get_exporter

    artifacts: list[Any] = []
    group: dict[str, str] = {}
    for cfg in recipe.export:
        exporter = get_exporter(cfg.target)
        name = cfg.artifact_name
        opts.log(f"export {name} ({cfg.target})")
        art = export_artifact(exporter, model, state.example_inputs, run_dir / "artifacts" / name, cfg,
                              name=name, role="edgeprep", task=j.task, ref_x=j.ref_x, labels=j.ref_y,
                              expect=expectations("edgeprep", recipe.gates.min_sqnr_db, recipe.gates.max_metric_drop))
        artifacts.append(art)
        group[art.name] = name
        base_art = art
        if j.compressed:
            base_art = export_artifact(exporter, baseline_model, state.example_inputs,
                                       run_dir / "artifacts" / f"{name}-baseline", cfg, name=f"{name}-baseline",
                                       role="baseline", task=j.task, ref_x=j.ref_x, labels=j.ref_y,
                                       expect=expectations("baseline", None, None))
            artifacts.append(base_art)
            group[base_art.name] = name
        calib = runtime_inputs(model, state.data.calib.numpy())
        for peer in exporter.derived(base_art, calib, run_dir / "artifacts", cfg):
            artifacts.append(_adopt_peer(peer, baseline_model, j.task, j.ref_x, j.ref_in, j.ref_y))
            group[artifacts[-1].name] = name
    return artifacts, group


def _judge_all(artifacts, group: dict[str, str], vcfg, state: Any, run_dir: Path, j: _Judging,
               device_errors: list[EdgeprepError], opts) -> list[dict[str, Any]]:
    """Each artifact's report entry, measured on its runtime here (and on each device), with its
    speedup over the fp32 artifact of its export entry. Parity reference: the final model for
    edgeprep's artifacts, the fp32 baseline for the rest."""
    from edgeprep.validate import judge

    entries = []
    speed_ref: dict[str, float] = {}
    for art in artifacts:
        opts.log(f"judge {art.name} on {art.runtime}")
        ref_out = j.ref_outputs["edgeprep" if art.role == "edgeprep" else "other"]
        measured = judge(art, task=j.task, ref_inputs=j.ref_in, ref_outputs=ref_out, eval_x=j.eval_in,
                         eval_y=j.eval_y, warmup=vcfg.profile.warmup, iters=vcfg.profile.iters,
                         threads=vcfg.profile.threads, batch=vcfg.profile.batch,
                         save_graph_to=run_dir / "runtime_graphs" / f"{art.name}.optimized.onnx")
        entry = {"name": art.name, "target": art.target, "runtime": art.runtime, "role": art.role,
                 "path": str(art.path), "bytes": art.size_bytes, "sha256": art.sha256, **measured,
                 "info": dict(art.info)}
        if vcfg.devices:
            entry["devices"] = _profile_on_devices(art, vcfg, state.base_dir, j.task, j.ref_in, ref_out, j.ref_y,
                                                   device_errors, opts, host_entry=entry)
        entries.append(entry)
        if entry["latency_ms"] and (art.role == "baseline" or (art.role == "edgeprep" and not j.compressed)):
            speed_ref[group[art.name]] = entry["latency_ms"]["p50"]
    for entry in entries:
        ref = speed_ref.get(group[entry["name"]])
        entry["speedup"] = (ref / entry["latency_ms"]["p50"]) if ref and entry["latency_ms"] else None
    _device_speedups(entries, group, j.compressed)
    return entries


def _report_document(recipe: Recipe, state: Any, model, baseline_model, stage_entries, entries,
                     j: _Judging) -> dict[str, Any]:
    """report.json before its gates: provenance, the model, the fp32 baseline, stages and artifacts."""
    from edgeprep.measure.cost import count_macs, count_params

    metric_name, metric_fn = metric_for(j.task)
    vcfg = recipe.validate_
    return {
        "schema": REPORT_SCHEMA,
        "recipe": recipe.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "edgeprep_version": __version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_threads": torch.get_num_threads(),
                    # int8 kernels differ per CPU family: every number below was measured on this CPU
                    "cpu": host_cpu()},
        "model": {"name": state.model_name, "params": count_params(model),
                  "macs": count_macs(model, (state.example_inputs[0][:1],))},
        "baseline": {"metric": {"name": metric_name, "value": metric_fn(torch_outputs(baseline_model, state.eval_x),
                                                                       j.eval_y)},
                     **_baseline_on_parity_rows(vcfg, baseline_model, j.ref_x, j.ref_y, metric_name, metric_fn),
                     "params": count_params(baseline_model),
                     "bytes": _baseline_bytes(entries)},
        "stages": stage_entries,
        "artifacts": entries,
    }


def _profile_on_devices(art, vcfg, base_dir: Path, task: str, ref_in: list, ref_out, ref_y,
                        errors: list[EdgeprepError], opts: Any,
                        host_entry: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """The artifact on each of the recipe's devices (ssh://, emu://, or `native`: the host entry
    itself); a failure is recorded in its entry and kept in ``errors`` (the run fails after the
    report is written), so one bad device loses no other result."""
    from edgeprep.remote.emulate import EmulatedDevice, NativeDevice
    from edgeprep.remote.profile import device_entry, native_entry
    from edgeprep.remote.session import supported_runtimes
    from edgeprep.remote.ssh import DeviceAccessError, DeviceUnreachableError

    results = []
    for dcfg in vcfg.devices:
        device = dcfg.to_device(base_dir)
        if isinstance(device, NativeDevice):
            results.append(native_entry(device, host_entry or {}))
            continue
        # a device that could not be reached or logged into is not tried again for every artifact
        earlier = next((e for e in errors if isinstance(e, (DeviceAccessError, DeviceUnreachableError))
                        and str(e).startswith(f"device {device.label}:")), None)
        if earlier is not None:
            results.append({"device": device.label, "url": device.url, "exit_code": earlier.exit_code,
                            "error": f"not tried: it failed earlier in this run ({earlier})"})
            continue
        runtimes = supported_runtimes(device)
        if art.runtime not in runtimes:
            how = (f"run emulated as {device.family.name}" if isinstance(device, EmulatedDevice)
                   else "profiled over SSH")
            results.append({"device": device.label, "url": device.url,
                            "not_run": f"{art.runtime} artifacts are not {how} (supported: {', '.join(runtimes)})"})
            continue
        opts.log(f"profile {art.name} on device {device.label}")
        p = vcfg.profile
        try:
            results.append(device_entry(art, device, ref_inputs=ref_in, ref_outputs=ref_out, labels=ref_y, task=task,
                                        warmup=p.warmup, iters=p.iters, threads=p.threads, batch=p.batch,
                                        # emulated: first use fetches the family's set-up, worth a word
                                        log=opts.log if isinstance(device, EmulatedDevice) else (lambda m: None)))
        except EdgeprepError as exc:
            errors.append(exc)
            results.append({"device": device.label, "url": device.url, "error": str(exc),
                            "exit_code": exc.exit_code})
    return results


def _baseline_on_parity_rows(vcfg, baseline_model, ref_x, ref_y, metric_name: str, metric_fn) -> dict[str, Any]:
    """With devices: the baseline's metric on the parity rows, the rows a device's metric is computed
    on (the device gets the manifest's reference inputs, not the whole eval split), so a device's
    max_metric_drop gate compares the same samples."""
    if not vcfg.devices:
        return {}
    value = metric_fn(torch_outputs(baseline_model, torch.from_numpy(ref_x)), ref_y)
    return {"metric_on_parity_rows": {"name": metric_name, "value": value, "samples": int(len(ref_y))}}


def _device_speedups(entries: list[dict[str, Any]], group: dict[str, str], compressed: bool) -> None:
    """On each device, an artifact's speedup over the fp32 artifact of its export entry measured on
    that same device (the host's speedup compares host numbers only). An emulated device has none:
    its latency is QEMU's translation speed, not a timing."""
    ref: dict[tuple[str, str], float] = {}
    for e in entries:
        if e["role"] == "baseline" or (e["role"] == "edgeprep" and not compressed):
            for d in e.get("devices", []):
                if d.get("latency_ms") and not d.get("emulated"):
                    ref[(group[e["name"]], d["device"])] = d["latency_ms"]["p50"]
    for e in entries:
        for d in e.get("devices", []):
            r = ref.get((group[e["name"]], d["device"]))
            d["speedup"] = r / d["latency_ms"]["p50"] if r and d.get("latency_ms") and not d.get("emulated") else None


def _adopt_peer(peer, baseline_model, task, ref_x, ref_in, ref_y):
    """Write the manifest for a peer artifact an exporter derived (e.g. ORT PTQ)."""
    import dataclasses

    from edgeprep.types import Artifact

    if not isinstance(peer, Artifact):
        raise TypeError("Exporter.derived must return Artifacts")
    ref_out = torch_outputs(baseline_model, torch.from_numpy(ref_x))
    peer = dataclasses.replace(peer, role="ptq")
    write_manifest(peer, task=task, ref_inputs=ref_in, ref_outputs=[ref_out], labels=ref_y,
                   extra={"expect": expectations("ptq", None, None)})
    return load_artifact(peer.dir)


def _baseline_bytes(entries: list[dict[str, Any]]) -> Optional[int]:
    for role in ("baseline", "edgeprep"):
        for e in entries:
            if e["role"] == role:
                return e["bytes"]
    return None
