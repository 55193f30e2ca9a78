"""The `edgeprep` command line: parse -> call the library -> print. Errors -> one line + exit code."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from edgeprep.errors import (EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_RUNTIME, BadInputError, EdgeprepError,
                             GateFailedError, RuntimeFailure)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Compress PyTorch models, export them to edge runtimes, and prove on each runtime "
                       "that they are still accurate and really faster.")
# Not a terminal (CI logs, pipes): rich would fold tables at 80 columns; logs can be wide.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)

DEBUG_HELP = "Show the full traceback on errors."
JSON_HELP = "Print machine-readable JSON on stdout."


def _print_version(value: bool) -> None:
    if value:
        from edgeprep import __version__

        out.print(f"edgeprep {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print edgeprep's version and exit.")) -> None:
    """edgeprep: compress, export, and prove it on the runtime."""


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- run
@app.command()
def run(recipe: str = typer.Argument(..., help="Recipe YAML file, or the name of a bundled recipe."),
        out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<name>)."),
        resume: bool = typer.Option(False, "--resume", help="Continue after the last completed stage."),
        force: bool = typer.Option(False, "--force", help="Delete an existing run directory first."),
        trust_pickle: bool = typer.Option(False, "--trust-pickle",
                                          help="Allow loading full pickles (runs code from the file)."),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
        quiet: bool = typer.Option(False, "--quiet", help="No progress output.")) -> None:
    """Run a recipe: stages, export, on-runtime validation, gates, report."""
    from edgeprep.recipe import load_recipe
    from edgeprep.recipes_index import resolve_recipe

    path = resolve_recipe(recipe)
    # A bad recipe is reported before the pipeline imports torch and the runtimes (~3 s): the user
    # waits a fraction of a second for the one-line error. run_recipe loads it again (cheap).
    load_recipe(path)
    from edgeprep.pipeline import RunOptions, run_recipe

    log = (lambda m: None) if (quiet or as_json) else (lambda m: err.print(f"[dim]›[/dim] {escape(m)}"))
    report = run_recipe(path, RunOptions(out_dir=out_dir, resume=resume, force=force,
                                         trust_pickle=trust_pickle, progress=not (quiet or as_json), log=log))
    if not report:  # a non-zero torchrun rank: rank 0 reports
        return
    if as_json:
        _emit_json(report)
    else:
        _print_summary(report, out_dir or Path("runs") / report["recipe"])
    if not report["passed"]:
        from edgeprep.gates import describe_failures, failed_gates, raise_for_failed_gates
        from edgeprep.measure.diagnose import diagnosis_lines

        where = diagnosis_lines(report)
        if where and failed_gates(report["gates"]):  # the failure line says where parity broke and the fix
            raise GateFailedError(f"gate(s) failed: {describe_failures(report['gates'])}; " + "; ".join(where))
        raise_for_failed_gates(report["gates"])


def _print_summary(report: dict[str, Any], run_dir: Path) -> None:
    from rich.table import Table

    base = report["baseline"]["metric"]
    out.print(f"[bold]{report['recipe']}[/bold]: baseline {base['name']} {base['value']:.4f} (PyTorch)")
    table = Table("artifact", "role", "runtime", "metric", "SQNR dB", "p50 ms", "p90 ms", "speedup",
                  "low-prec ops", "bytes")
    for a in report["artifacts"]:
        m, p, lat, prec = a.get("metric"), a.get("parity") or {}, a.get("latency_ms") or {}, a.get("precision")
        sq = p.get("sqnr_db")
        if a.get("not_run"):  # its runtime cannot run on this machine (reason below the table)
            table.add_row(a["name"], a["role"], a["runtime"], *(["not run here"] + ["-"] * 5), f"{a['bytes']:,}")
            continue
        table.add_row(a["name"], a["role"], a["runtime"], f"{m['value']:.4f}" if m else "-",
                      "identical" if sq is None and p else (f"{sq:.1f}" if sq is not None else "-"),
                      f"{lat.get('p50', 0):.3f}", f"{lat.get('p90', 0):.3f}",
                      f"{a['speedup']:.2f}x" if a.get("speedup") else "-",
                      f"{prec['low_precision_op_fraction']:.2f}" if prec else "-", f"{a['bytes']:,}")
    out.print(table)
    for a in report["artifacts"]:
        if a.get("not_run"):
            out.print(f"{escape(a['name'])}: not run on this machine: {escape(a['not_run'])}")
    for g in report["gates"]:
        color = "yellow" if g.get("skipped") else ("green" if g["passed"] else "red")
        word = "SKIP" if g.get("skipped") else ("PASS" if g["passed"] else "FAIL")
        where = escape(f"[{g['artifact']}]") if g.get("artifact") else ""
        out.print(f"[{color}]{word}[/{color}] {g['name']}{where}: value {g['value']} limit {g['limit']}")
    out.print(f"report: {run_dir / 'report.html'}  ({'passed' if report['passed'] else 'FAILED'})")


# ----------------------------------------------------------------------------- single stages
@app.command()
def finetune(ckpt: Path = typer.Argument(..., help="Stage checkpoint directory."),
             output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write."),
             steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
             lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
             batch_size: Optional[int] = typer.Option(None, help="Batch size."),
             distill: bool = typer.Option(False, help="Distill from the checkpoint's own model."),
             seed: int = typer.Option(0, help="Seed."),
             trust_pickle: bool = typer.Option(False, "--trust-pickle")) -> None:
    """Train (or distill into) a checkpoint's model with the shared training loop."""
    from edgeprep.recipe import DistillConfig, FinetuneConfig, TrainOverrides
    from edgeprep.single_stage import apply_stage

    cfg = FinetuneConfig(train=TrainOverrides(steps=steps, lr=lr, batch_size=batch_size),
                         distill=DistillConfig() if distill else None)
    entry = apply_stage(ckpt, output, cfg, seed=seed, trust_pickle=trust_pickle)
    out.print(f"finetune: {entry['metric']['name']} {entry['metric']['value']:.4f} -> {output}")


@app.command()
def prune(ckpt: Path = typer.Argument(..., help="Stage checkpoint directory."),
          output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write."),
          ratio: float = typer.Option(..., "--ratio", help="Fraction of params (or MACs) to remove, e.g. 0.5."),
          budget: str = typer.Option("params", help="What the ratio counts: params | macs."),
          allocation: str = typer.Option("adaptive", help="Per-layer sparsity: adaptive | uniform | erk."),
          schedule: str = typer.Option("incremental", help="incremental (prune/train stages) | one-shot."),
          importance: str = typer.Option("taylor", help="Unit scores: taylor | magnitude | random."),
          units: Optional[list[str]] = typer.Option(None, "--units", help="Repeat: heads, mlp, channels (default: all)."),
          ratio_per_stage: float = typer.Option(0.05, help="Incremental: share removed per stage."),
          steps: Optional[int] = typer.Option(None, help="Training steps in total, split over the stages."),
          steps_per_stage: Optional[int] = typer.Option(None, help="Training steps after each stage (overrides --steps)."),
          lr: Optional[float] = typer.Option(None, help="Peak learning rate of the recovery training."),
          amplitude: float = typer.Option(0.02, help="Adaptive amplitude A (0 = uniform)."),
          distill: bool = typer.Option(True, help="Distill from the unpruned model while training."),
          seed: int = typer.Option(0, help="Seed."),
          trust_pickle: bool = typer.Option(False, "--trust-pickle")) -> None:
    """Prune heads / MLP neurons / conv channels physically (Adapt-Pruner), with recovery training."""
    from edgeprep.recipe import PruneConfig, parse_stage_options
    from edgeprep.single_stage import apply_stage

    cfg = parse_stage_options(PruneConfig, {
        "pruning_ratio": ratio, "budget": budget, "allocation": allocation, "schedule": schedule,
        "importance": importance, "units": units or None, "ratio_per_stage": ratio_per_stage,
        "steps_per_stage": steps_per_stage, "amplitude": amplitude,
        "train": {k: v for k, v in {"steps": steps, "lr": lr}.items() if v is not None},
        "distill": {} if distill else None}, where="edgeprep prune")
    if not distill:
        cfg = cfg.model_copy(update={"distill": None})
    entry = apply_stage(ckpt, output, cfg, seed=seed, trust_pickle=trust_pickle)
    note = entry["notes"][-1] if entry["notes"] else ""
    out.print(f"prune: {note}; {entry['metric']['name']} {entry['metric']['value']:.4f} -> {output}")


@app.command()
def reparam(ckpt: Path = typer.Argument(..., help="Stage checkpoint directory."),
            output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write."),
            norm: str = typer.Option("prepbn", help="LayerNorm replacement: prepbn | repbn | bn."),
            attention: str = typer.Option("keep", help="Attention: keep | sla (Simplified Linear Attention)."),
            warmup_steps: Optional[int] = typer.Option(None, help="Steps of pure LayerNorm (default: 10%)."),
            decay_steps: Optional[int] = typer.Option(None, help="Steps for lam 1 -> 0 (default: 50%)."),
            steps: int = typer.Option(300, help="Training steps."),
            lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
            hidden_loss: float = typer.Option(1.0, help="Weight of the block-output MSE to the teacher."),
            seed: int = typer.Option(0, help="Seed."),
            trust_pickle: bool = typer.Option(False, "--trust-pickle")) -> None:
    """PRepBN (LayerNorm -> BatchNorm, folded away at export) and optional SLA, distilled from the checkpoint."""
    from edgeprep.recipe import ReparamConfig, parse_stage_options
    from edgeprep.single_stage import apply_stage

    cfg = parse_stage_options(ReparamConfig, {
        "norm": norm, "attention": attention, "warmup_steps": warmup_steps, "decay_steps": decay_steps,
        "steps": steps, "hidden_loss": hidden_loss, "train": {"lr": lr} if lr is not None else {}},
        where="edgeprep reparam")
    entry = apply_stage(ckpt, output, cfg, seed=seed, trust_pickle=trust_pickle)
    notes = "; ".join(entry["notes"])
    out.print(f"reparam: {notes}; {entry['metric']['name']} {entry['metric']['value']:.4f} -> {output}")


@app.command()
def qat(ckpt: Path = typer.Argument(..., help="Stage checkpoint directory."),
        output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write."),
        weights: str = typer.Option("int8", help="Weight precision: int8 | int4 | ternary."),
        activations: str = typer.Option("int8", help="Activation precision: int8 | none."),
        intervention: str = typer.Option("gradual", help="Teacher Intervention: none | m | c | o | gradual."),
        intervention_steps: Optional[int] = typer.Option(None, help="Steps with intervention (default: 10%)."),
        steps: int = typer.Option(300, help="Training steps in total."),
        lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
        label_loss: float = typer.Option(0.0, help="Weight of the ground-truth loss (0: distillation only)."),
        smoothing: Optional[float] = typer.Option(
            None, help="SmoothQuant migration strength in (0, 1] for int8 Linear inputs (e.g. 0.85 for BERT)."),
        embeddings: str = typer.Option("float", help="Embedding tables: float | int8 (per-row int8 weights)."),
        target_cpu: str = typer.Option(
            "portable", help="CPU family the int8 artifact ships to: portable | x86-avx2 | x86-vnni | x86-sse4 | "
                             "arm64 (portable / x86-avx2: int8 weights on [-63, 63], exact on every family)."),
        seed: int = typer.Option(0, help="Seed."),
        trust_pickle: bool = typer.Option(False, "--trust-pickle")) -> None:
    """Quantization-aware training with Teacher Intervention, distilled from the checkpoint's model."""
    from edgeprep.recipe import QatConfig, parse_stage_options
    from edgeprep.single_stage import apply_stage

    cfg = parse_stage_options(QatConfig, {
        "weights": weights, "activations": activations, "intervention": intervention,
        "intervention_steps": intervention_steps, "steps": steps, "label_loss": label_loss,
        "smoothing": smoothing, "embeddings": embeddings, "target_cpu": target_cpu,
        "train": {"lr": lr} if lr is not None else {}},
        where="edgeprep qat")
    entry = apply_stage(ckpt, output, cfg, seed=seed, trust_pickle=trust_pickle)
    note = entry["notes"][-1] if entry["notes"] else ""
    out.print(f"qat: {note}; {entry['metric']['name']} {entry['metric']['value']:.4f} -> {output}")


@app.command()
def binarize(ckpt: Path = typer.Argument(..., help="Stage checkpoint directory."),
             output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write."),
             activations: str = typer.Option("binary", help="Activation precision: binary | int8 | none."),
             estimator_rank: int = typer.Option(1, help="Rank of the residual estimators (0: off)."),
             intervention: str = typer.Option("none", help="Teacher Intervention: none | m | c | o | gradual."),
             steps: int = typer.Option(300, help="Training steps."),
             lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
             label_loss: float = typer.Option(0.0, help="Weight of the ground-truth loss (0: distillation only)."),
             seed: int = typer.Option(0, help="Seed."),
             trust_pickle: bool = typer.Option(False, "--trust-pickle")) -> None:
    """BiPFT binarization (binary weights and activations, residual estimators), distilled from the checkpoint."""
    from edgeprep.recipe import BinarizeConfig, parse_stage_options
    from edgeprep.single_stage import apply_stage

    cfg = parse_stage_options(BinarizeConfig, {
        "activations": activations, "estimator_rank": estimator_rank, "intervention": intervention,
        "steps": steps, "label_loss": label_loss, "train": {"lr": lr} if lr is not None else {}},
        where="edgeprep binarize")
    entry = apply_stage(ckpt, output, cfg, seed=seed, trust_pickle=trust_pickle)
    note = entry["notes"][-1] if entry["notes"] else ""
    out.print(f"binarize: {note}; {entry['metric']['name']} {entry['metric']['value']:.4f} -> {output}")


@app.command()
def export(ckpt: Path = typer.Argument(..., help="Stage checkpoint directory."),
           target: str = typer.Option(..., "--target", "-t", help="Export target, e.g. onnx."),
           output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write."),
           opset: int = typer.Option(20, help="ONNX opset (>= 18)."),
           optimize: str = typer.Option("extended", help="ORT graph optimization level."),
           mobile: bool = typer.Option(False, help="Also write ORT's .ort format."),
           static_batch: int = typer.Option(1, min=1, help="Batch the edge targets (executorch, litert, coreml, "
                                                          "tensorrt) are built for."),
           coreml_weights: str = typer.Option("auto", help="coreml: auto (the model's own compression), fp16, fp32, "
                                                          "int8, palettize4, palettize2 or int4-block."),
           coreml_target: Optional[str] = typer.Option(None, help="coreml: iOS16, iOS17 or iOS18 (default: the "
                                                                  "lowest the weights allow)."),
           dynamic_sequence: bool = typer.Option(False, "--dynamic-sequence",
                                                 help="onnx: token models take any sequence length (axis 1)."),
           int8_weights: str = typer.Option(
               "s8", help="onnx: int8 Gemm/MatMul weights as trained (s8) or as uint8 + zero point 128 (u8: same "
                          "numbers, exact on AVX2 x86 kernels for full-range weights, slower on VNNI)."),
           u8_weight_layer: list[str] = typer.Option(
               [], "--u8-weight-layer", help="onnx: store only this Linear's int8 weights as uint8 (repeatable); "
                                             "the fix a failed parity check names."),
           min_sqnr_db: float = typer.Option(
               40.0, help="The export's self-check (ONNX Runtime vs the PyTorch model, on this machine) must "
                          "reach this SQNR, else exit 1; recorded in the manifest for `validate`."),
           trust_pickle: bool = typer.Option(False, "--trust-pickle"),
           as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Export a checkpoint to one target (artifact dir with manifest and reference data)."""
    from edgeprep.single_stage import export_checkpoint

    options: dict[str, Any] = {"target": target, "opset": opset, "optimize": optimize, "mobile": mobile,
                               "static_batch": static_batch}
    if target == "coreml":
        options.update(coreml_weights=coreml_weights, coreml_target=coreml_target)
    if dynamic_sequence:
        options["dynamic_sequence"] = True
    if int8_weights != "s8" or u8_weight_layer:
        options.update(int8_weights=int8_weights, u8_weight_layers=list(u8_weight_layer))
    art = export_checkpoint(ckpt, output, options, trust_pickle=trust_pickle, min_sqnr_db=min_sqnr_db)
    check = art.info.get("check_sqnr_db")  # the exporter's own run on this machine's runtime (ONNX)
    if as_json:
        _emit_json({"name": art.name, "target": art.target, "path": str(art.path), "bytes": art.size_bytes,
                    "sha256": art.sha256, "check_sqnr_db": check,
                    "passed": check is None or check >= min_sqnr_db})
    else:
        out.print(f"exported {art.target}: {art.path} ({art.size_bytes:,} bytes, sha256 {art.sha256[:12]})"
                  + (f"; self-check {check:.1f} dB" if check is not None else ""))
    if check is not None and check < min_sqnr_db:  # a failed self-check is a failure, never a silent pass
        err.print(f"[red]error:[/red] {escape(str(output))}: the export's self-check on this machine reached SQNR "
                  f"{check:.2f} dB, below the {min_sqnr_db:g} dB expected; the artifact is kept for inspection: "
                  f"`edgeprep validate {escape(str(output))}` names the first diverging layer and the fix",
                  soft_wrap=True)
        raise typer.Exit(EXIT_GATE_FAILED)


# ----------------------------------------------------------------------------- judge artifacts
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
        _emit_json({"artifact": str(art.path), "runtime": art.runtime, **entry})
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
        _emit_json({"artifact": str(art.path), "runtime": art.runtime, **entry})
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
        _emit_json({"artifact": str(art.path), "runtime": art.runtime, "latency_ms": stats.to_report()})
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
        _emit_json({"artifact": str(art.path), **entry, "passed": not failures})
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
          as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """CI gate: compare a report with a baseline report; exit 1 on regression."""
    from edgeprep.check import compare, load_report, write_junit

    result = compare(load_report(report), load_report(baseline), latency_tolerance=latency_tolerance,
                     metric_tolerance=metric_tolerance, sqnr_tolerance_db=sqnr_tolerance_db,
                     size_tolerance=size_tolerance)
    if junit:
        write_junit(result, junit)
    if as_json:
        _emit_json(result.to_dict())
    else:
        for c in result.cases:
            color = "yellow" if c.skipped else ("green" if c.passed else "red")
            word = "SKIP" if c.skipped else ("PASS" if c.passed else "FAIL")
            out.print(f"[{color}]{word}[/{color}] {escape(c.message)}")  # the message starts with the case name
    if not result.passed:
        raise GateFailedError(result.summary())


# ----------------------------------------------------------------------------- listings
@app.command()
def recipes(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the bundled recipes."""
    from edgeprep.recipes_index import bundled_recipes

    rows = bundled_recipes()
    if as_json:
        _emit_json(rows)
        return
    for r in rows:
        out.print(f"[bold]{escape(r['name'])}[/bold]  {escape(r['description'])}  ({escape(r['path'])})")


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the built-in model zoo."""
    from rich.markup import escape

    from edgeprep.models import list_models

    rows = list_models()
    if as_json:
        _emit_json(rows)
        return
    for r in rows:
        shape = f", input {tuple(r['input_shape'])}" if r["input_shape"] is not None else ""
        out.print(f"[bold]{r['name']}[/bold]  {r['params']:,} params{shape}, data {r['data']}: "
                  f"{escape(r['description'])}")  # escape: "[batch, 2, sequence]" is not rich markup


devices_app = typer.Typer(no_args_is_help=True, help="Emulated CPU families for emu:// devices (QEMU user mode).")
app.add_typer(devices_app, name="devices")


@devices_app.command("list")
def devices_list(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """The emulated CPU families, the ISA flags each exposes, and whether it is prepared here."""
    from edgeprep.remote.emu_cache import status
    from edgeprep.remote.emulate import FAMILIES, cache_dir

    rows = [status(f) for f in FAMILIES.values()]
    if as_json:
        _emit_json(rows)
        return
    from rich.table import Table

    table = Table("device", "QEMU -cpu", "ISA flags on", "off", "runtimes", "prepared")
    for r in rows:
        table.add_row(r["url"], r["qemu_cpu"], " ".join(k for k, v in r["isa"].items() if v),
                      " ".join(k for k, v in r["isa"].items() if not v) or "-", ", ".join(r["runtimes"]),
                      f"yes (QEMU {r['qemu_version']})" if r["prepared"] else "no")
    out.print(table)
    out.print(f"cache: {cache_dir()} (set EDGEPREP_CACHE to move it); prepare with `edgeprep devices setup`")


@devices_app.command("setup")
def devices_setup(families: Optional[list[str]] = typer.Argument(None, help="Families to prepare (default: all)."),
                  as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Fetch QEMU's set-up for emulated families into the cache (Debian packages, PyPI wheels), once."""
    from importlib.util import find_spec

    from edgeprep.remote.emu_cache import prepare
    from edgeprep.remote.emulate import FAMILIES, family_from_url

    chosen = [family_from_url(f if f.startswith("emu://") else f"emu://{f}") for f in (families or FAMILIES)]
    log = (lambda m: None) if as_json else (lambda m: err.print(f"[dim]›[/dim] {escape(m)}"))
    rows = []
    for fam in chosen:
        # LiteRT too when this host has it: its aarch64 wheel is ~100 MB, so only for those who use it
        runtimes = ["onnxruntime"] + (["litert"] if fam.arch == "aarch64" and find_spec("ai_edge_litert") else [])
        for rt in runtimes:
            p = prepare(fam, rt, log)
        rows.append({"family": fam.name, "qemu": str(p.qemu), "qemu_version": p.qemu_version, "isa": p.isa,
                     "runtimes": runtimes})
        if not as_json:
            out.print(f"{fam.url}: ready (QEMU {p.qemu_version} -cpu {fam.qemu_cpu}; "
                      f"{' '.join(k for k, v in p.isa.items() if v)}; {', '.join(runtimes)})")
    if as_json:
        _emit_json(rows)


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Which runtimes and extras are installed, their versions, and whether they run here."""
    from edgeprep.doctor import diagnose

    rows = diagnose()
    if as_json:
        _emit_json(rows)
        return
    from rich.table import Table

    table = Table("component", "installed", "version", "usable here", "note")
    for r in rows:
        table.add_row(r["name"], "yes" if r["installed"] else "no", r["version"] or "-",
                      "[green]yes[/green]" if r["usable"] else "[red]no[/red]", escape(r["note"]))
    out.print(table)


# ----------------------------------------------------------------------------- entry point
def main(argv: Optional[list[str]] = None) -> None:
    from typer.exceptions import TyperException

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"  # the global option comes before the command
    try:
        code = app(args=argv, prog_name="edgeprep", standalone_mode=False)
    except EdgeprepError as exc:
        if debug:
            raise
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        code = exc.exit_code
    except TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        if debug:
            raise
        err.print(f"[red]error:[/red] {escape(' '.join(exc.format_message().split()))} (see `edgeprep --help`)",
                  soft_wrap=True)
        code = getattr(exc, "exit_code", EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        err.print("error: interrupted; completed stages are kept, continue with `edgeprep run --resume`")
        code = 130
    except Exception as exc:  # a bug or an unexpected library failure: still one line by default
        if debug:
            raise
        err.print(f"[red]error:[/red] unexpected {type(exc).__name__}: {escape(' '.join(str(exc).split())[:300])} "
                  "(rerun with --debug for the traceback)", soft_wrap=True)
        code = EXIT_RUNTIME
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
