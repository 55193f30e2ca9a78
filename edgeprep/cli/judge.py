"""Judging artifacts: `profile` (here, over SSH or emulated), `validate` (parity, metric, and where
parity breaks) and `check` (the CI gate against a baseline report)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from edgeprep.cli.app import JSON_HELP, app, emit_json, err, out
from edgeprep.errors import EXIT_GATE_FAILED, BadInputError, GateFailedError, RuntimeFailure


@app.command()
def profile(artifact: Path = typer.Argument(..., help="Artifact directory or model file."),
            warmup: int = typer.Option(20, min=0), iters: int = typer.Option(200, min=5),
            threads: int = typer.Option(1, min=1), batch: int = typer.Option(1, min=1),
            seq_len: int = typer.Option(128, "--seq-len", min=2,
                                        help="Bare model file: length of a symbolic sequence dim (token models)."),
            device: Optional[str] = typer.Option(
                None, "--device", help="Profile on a remote device instead: ssh://user@host[:port], or an "
                                       "emulated CPU family emu://<family> (see `edgeprep devices list`)."),
            identity: Optional[Path] = typer.Option(None, "--identity", help="SSH private key for --device."),
            remote_python: str = typer.Option("python3", "--remote-python",
                                              help="The device's Python (with numpy and the runtime)."),
            known_hosts: Optional[Path] = typer.Option(
                None, "--known-hosts", help="known_hosts file to verify the device (default ~/.ssh/known_hosts)."),
            accept_new_host_key: bool = typer.Option(
                False, "--accept-new-host-key", help="Record the key of a device not yet in known_hosts "
                                                     "(a changed key is still refused)."),
            remote_tmp: Optional[str] = typer.Option(None, "--remote-tmp",
                                                     help="Temp dir on the device (default: its own)."),
            timeout_s: int = typer.Option(600, "--timeout", min=1, help="Seconds for the whole remote run."),
            as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Latency percentiles of an artifact on its runtime, here or on a device over SSH; parity on an
    emulated CPU family (emu://)."""
    if device is not None and device.startswith("emu://"):
        return _profile_emulated(artifact, device, warmup, iters, threads, batch, seq_len, timeout_s, as_json,
                                 {"--identity": identity, "--known-hosts": known_hosts, "--remote-tmp": remote_tmp,
                                  "--accept-new-host-key": accept_new_host_key or None,
                                  "--remote-python": None if remote_python == "python3" else remote_python})
    if device is None:
        remote_only = {"--identity": identity, "--known-hosts": known_hosts, "--remote-tmp": remote_tmp,
                       "--accept-new-host-key": accept_new_host_key or None,
                       "--remote-python": None if remote_python == "python3" else remote_python}
        given = [k for k, v in remote_only.items() if v is not None]
        if given:
            raise BadInputError(f"{', '.join(given)}: remote options, they need --device ssh://user@host[:port]")
        return _profile_here(artifact, warmup, iters, threads, batch, seq_len, as_json)
    from edgeprep.remote.profile import profile_artifact_on_device
    from edgeprep.remote.ssh import Device

    dev = Device(url=device, identity=identity, remote_python=remote_python, known_hosts=known_hosts,
                 accept_new_host_key=accept_new_host_key, remote_tmp=remote_tmp, timeout_s=timeout_s)
    art, entry = profile_artifact_on_device(artifact, dev, warmup=warmup, iters=iters, threads=threads,
                                            batch=batch, seq_len=seq_len)
    if as_json:
        emit_json({"artifact": str(art.path), "runtime": art.runtime, **entry})
        return
    lat, d, par = entry["latency_ms"], entry["description"], entry["parity"]
    lo, hi = lat["ci95_p50"]
    peak = entry["memory"]["peak_rss_bytes"]
    out.print(f"{art.path} on {entry['device']} ({d['cpu']}, {d['cores']} cores, {d['os']}; "
              f"{entry['runtime']['package']} {entry['runtime']['version']}): p50 {lat['p50']:.3f} ms "
              f"(95% CI {lo:.3f}-{hi:.3f}), p90 {lat['p90']:.3f}, p99 {lat['p99']:.3f} ms, "
              f"peak RSS {'n/a' if peak is None else f'{peak / 2**20:.1f} MiB'} "
              f"[{lat['iters']} iters, {lat['threads']} thread(s), batch {lat['batch']}]")
    if par is not None:
        sq = par["sqnr_db"]
        agree = par["top1_agreement"]
        out.print(f"parity on the device vs the reference outputs: SQNR {sq:.2f} dB, top-1 agreement "
                  f"{'n/a' if agree is None else f'{agree:.4f}'}")


def _profile_emulated(artifact: Path, device: str, warmup: int, iters: int, threads: int, batch: int, seq_len: int,
                      timeout_s: int, as_json: bool, ssh_options: dict[str, Any]) -> None:
    from edgeprep.remote.emulate import EmulatedDevice

    dev = EmulatedDevice(url=device, timeout_s=timeout_s)  # an unknown family: one line, exit 2
    given = [k for k, v in ssh_options.items() if v is not None]
    if given:
        raise BadInputError(f"{', '.join(given)}: ssh options, they do not apply to {device}")
    from edgeprep.remote.profile import profile_artifact_on_device

    log = (lambda m: None) if as_json else (lambda m: err.print(f"[dim]›[/dim] {escape(m)}"))
    art, entry = profile_artifact_on_device(artifact, dev, warmup=warmup, iters=iters, threads=threads,
                                            batch=batch, seq_len=seq_len, log=log)
    if as_json:
        emit_json({"artifact": str(art.path), "runtime": art.runtime, **entry})
        return
    d, par = entry["description"], entry["parity"]
    isa = " ".join(d.get("isa") or []) or "-"
    out.print(f"{art.path} on {entry['device']}: {d['cpu']} [{isa}], {d['emulated_by']}; "
              f"{entry['runtime']['package']} {entry['runtime']['version']}")
    out.print(f"latency not measured: {entry['latency_note']}")
    if par is not None:
        agree = par["top1_agreement"]
        out.print(f"parity on the emulated CPU vs the reference outputs: SQNR {par['sqnr_db']:.2f} dB, top-1 "
                  f"agreement {'n/a' if agree is None else f'{agree:.4f}'}")
    else:
        out.print("no parity: a bare model file has no reference outputs; pass its artifact directory")


def _profile_here(artifact: Path, warmup: int, iters: int, threads: int, batch: int, seq_len: int,
                  as_json: bool) -> None:
    from edgeprep.validate import profile_path

    art, stats = profile_path(artifact, warmup=warmup, iters=iters, threads=threads, batch=batch, seq_len=seq_len)
    if as_json:
        emit_json({"artifact": str(art.path), "runtime": art.runtime, "latency_ms": stats.to_report()})
        return
    lo, hi = stats.ci95_p50_ms
    out.print(f"{art.path} on {art.runtime}: p50 {stats.p50_ms:.3f} ms (95% CI {lo:.3f}-{hi:.3f}), "
              f"p90 {stats.p90_ms:.3f}, p99 {stats.p99_ms:.3f}, mean {stats.mean_ms:.3f} ms "
              f"[{stats.iters} iters, {stats.threads} thread(s), batch {stats.batch}]")


@app.command()
def validate(artifact: Path = typer.Argument(..., help="Artifact directory (with manifest.json)."),
             min_sqnr_db: Optional[float] = typer.Option(
                 None, help="Fail (exit 1) below this SQNR (default: the manifest's expectation)."),
             min_top1_agreement: Optional[float] = typer.Option(None, help="Fail (exit 1) below this."),
             device: Optional[str] = typer.Option(
                 None, "--device", help="Check parity on an emulated CPU family (emu://x86-avx2, emu://arm64-a76, "
                                        "...) or an ssh:// device instead of this host."),
             iters: int = typer.Option(50, min=5), threads: int = typer.Option(1, min=1),
             as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Re-check an artifact alone: integrity, parity with its reference outputs, metric, latency.
    When SQNR is below the limit, names the first diverging layer and measures the fixes."""
    from edgeprep.validate import judge_artifact_dir

    if not artifact.is_dir():
        raise BadInputError(f"{artifact}: validate needs an artifact directory with manifest.json "
                            "(a bare model file has no reference outputs); use `edgeprep profile` for files")
    from edgeprep.manifest import load_reference, read_manifest

    dev = None
    if device is not None:
        from edgeprep.remote.config import DeviceConfig

        try:
            dev = DeviceConfig(url=device).to_device(Path.cwd())
        except ValueError as exc:  # pydantic's wrapper around the URL check: its first line is ours
            raise BadInputError(f"--device {device}: {str(exc).splitlines()[-1].split(', input_value')[0]}") from None
    art, entry = (judge_artifact_dir(artifact, warmup=5, iters=iters, threads=threads, batch=1) if dev is None
                  else _judge_on_device(artifact, dev, iters=iters, threads=threads))
    if entry.get("not_run"):  # e.g. Core ML off macOS: nothing was measured, so nothing is validated
        raise RuntimeFailure(f"{artifact}: cannot validate on this machine: {entry['not_run']}")
    expect = read_manifest(artifact).get("expect", {})  # what the run that made it promised
    if min_sqnr_db is None:
        min_sqnr_db = expect.get("min_sqnr_db")
    sq = entry["parity"]["sqnr_db"]
    failures = []
    if min_sqnr_db is not None and sq is not None and sq < min_sqnr_db:
        from edgeprep.measure.diagnose import diagnose, fix_text

        ref = load_reference(artifact)
        log = (lambda m: None) if as_json else (lambda m: err.print(f"[dim]›[/dim] {escape(m)}"))
        entry["diagnosis"] = diagnose(art, ref.inputs, ref.outputs[0], threshold_db=min_sqnr_db, device=dev, log=log)
        fix = fix_text(entry["diagnosis"])
        failures.append(f"SQNR {sq:.2f} dB < {min_sqnr_db} dB{' on ' + dev.label if dev else ''}: "
                        f"{entry['diagnosis']['summary']}" + (f"; {fix}" if fix else ""))
    agree = entry["parity"]["top1_agreement"]
    if min_top1_agreement is not None and agree is not None and agree < min_top1_agreement:
        failures.append(f"top-1 agreement {agree:.4f} < {min_top1_agreement}")
    if as_json:
        emit_json({"artifact": str(art.path), **entry, "passed": not failures})
    else:
        m = entry.get("metric")
        max_abs = entry["parity"]["max_abs"]
        lat = entry.get("latency_ms") or {}
        where = f" on {dev.label}" if dev else ""
        out.print(f"{art.name} ({art.runtime}{where}): sha256 ok; SQNR "
                  f"{'identical' if sq is None else f'{sq:.2f} dB'}, "
                  f"max abs {'non-finite' if max_abs is None else f'{max_abs:.3g}'}, "
                  f"top-1 agreement {'n/a' if agree is None else f'{agree:.4f}'}"
                  + (f", {m['name']} {m['value']:.4f} on {m['samples']} reference samples" if m else "")
                  + (f", p50 {lat['p50']:.3f} ms" if lat.get("p50") is not None and not entry.get("emulated")
                     else ", latency not a timing (emulated)" if entry.get("emulated") else ""), soft_wrap=True)
    if failures:
        err.print(f"[red]error:[/red] {escape(art.name)}: " + escape("; ".join(failures)), soft_wrap=True)
        raise typer.Exit(EXIT_GATE_FAILED)


def _judge_on_device(artifact: Path, dev: Any, *, iters: int, threads: int) -> tuple[Any, dict[str, Any]]:
    """validate --device: the artifact's reference run on a device, judged as on the host."""
    from edgeprep.manifest import load_reference
    from edgeprep.remote.emulate import NativeDevice
    from edgeprep.remote.profile import device_entry
    from edgeprep.validate import artifact_from_path

    if isinstance(dev, NativeDevice):
        raise BadInputError("--device native is this host: leave --device out")
    art = artifact_from_path(artifact)
    ref = load_reference(artifact)
    entry = device_entry(art, dev, ref_inputs=ref.inputs, ref_outputs=ref.outputs[0], labels=ref.labels, task=ref.task,
                         warmup=2, iters=min(iters, 10), threads=threads, batch=1)
    if entry.get("parity") is None:
        raise RuntimeFailure(f"{artifact}: no parity came back from {dev.label}")
    return art, entry


@app.command()
def check(report: Path = typer.Argument(..., help="report.json (or run directory) under test."),
          baseline: Path = typer.Option(..., "--baseline", help="Stored baseline report.json."),
          junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML here."),
          latency_tolerance: float = typer.Option(0.15, help="Allowed p50 latency growth (fraction)."),
          metric_tolerance: float = typer.Option(0.0, help="Allowed metric drop (absolute)."),
          sqnr_tolerance_db: float = typer.Option(1.0, help="Allowed parity SQNR drop (dB)."),
          size_tolerance: float = typer.Option(0.01, help="Allowed artifact size growth (fraction)."),
          save_baseline: bool = typer.Option(False, "--save-baseline",
                                             help="Store REPORT as the --baseline file instead of comparing "
                                                  "(refused when the run failed its gates)."),
          as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """CI gate: compare a report with a baseline report; exit 1 on regression."""
    from edgeprep.check import compare, load_report, save_as_baseline, write_junit

    if save_baseline:
        saved = save_as_baseline(report, baseline)
        if as_json:
            emit_json(saved)
        else:
            out.print(f"saved {escape(saved['report'])} as the baseline {escape(saved['baseline'])} "
                      f"({saved['artifacts']} artifacts; its gates passed)")
        return
    result = compare(load_report(report), load_report(baseline), latency_tolerance=latency_tolerance,
                     metric_tolerance=metric_tolerance, sqnr_tolerance_db=sqnr_tolerance_db,
                     size_tolerance=size_tolerance)
    if junit:
        write_junit(result, junit)
    if as_json:
        emit_json(result.to_dict())
    else:
        for c in result.cases:
            color = "yellow" if c.skipped else ("green" if c.passed else "red")
            word = "SKIP" if c.skipped else ("PASS" if c.passed else "FAIL")
            out.print(f"[{color}]{word}[/{color}] {escape(c.message)}")  # the message starts with the case name
    if not result.passed:
        raise GateFailedError(result.summary())


