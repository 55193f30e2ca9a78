"""One stage on a checkpoint (one command per registered stage kind: `finetune`, `prune`, ...) and
`export`: the commands for chaining the pipeline by hand. A stage command's options are generated
from its config model (``edgeprep.cli.options``), so they are the recipe stage's keys."""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from edgeprep.cli.app import JSON_HELP, app, emit_json, err, out
from edgeprep.cli.options import config_options, parameters, values_to_config
from edgeprep.errors import EXIT_GATE_FAILED
from edgeprep.registry import StageSpec, stage_specs, target_specs

_COMMON = [
    inspect.Parameter("ckpt", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="Stage checkpoint directory (or a run's stages/<i>-<kind>).")),
    inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                      default=typer.Option(..., "-o", "--output", help="Checkpoint directory to write.")),
]
_TAIL = [
    inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, annotation=int, default=typer.Option(0, help="Seed.")),
    inspect.Parameter("trust_pickle", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--trust-pickle", help="Allow a full-pickle model source.")),
]


def _register_stage_command(spec: StageSpec) -> None:
    options = config_options(spec.config, skip=spec.cli_skip, extra_flags=spec.cli_flags)

    def command(ckpt: Path, **given: Any) -> None:
        from edgeprep.recipe import parse_stage_options
        from edgeprep.single_stage import apply_stage

        output, seed, trust_pickle = given.pop("output"), given.pop("seed"), given.pop("trust_pickle")
        cfg = parse_stage_options(spec.config, values_to_config(options, given), where=f"edgeprep {spec.kind}")
        entry = apply_stage(ckpt, output, cfg, seed=seed, trust_pickle=trust_pickle)
        notes = "; ".join(entry["notes"])
        out.print(f"{spec.kind}: {escape(notes) + '; ' if notes else ''}"
                  f"{entry['metric']['name']} {entry['metric']['value']:.4f} -> {output}")

    command.__signature__ = inspect.Signature([*_COMMON, *parameters(options), *_TAIL])  # type: ignore[attr-defined]
    command.__doc__ = spec.help or (spec.config.__doc__ or "").strip()
    app.command(name=spec.kind)(command)


for _spec in stage_specs().values():
    _register_stage_command(_spec)


def _export_options() -> list:
    """Every registered target's options, each once; its help names the targets that take it."""
    merged: dict[str, Any] = {}
    users: dict[str, list[str]] = {}
    for spec in target_specs().values():
        for opt in config_options(spec.options, extra_flags=spec.cli_flags):
            merged.setdefault(opt.param, opt)
            users.setdefault(opt.param, []).append(spec.name)
    return [dataclasses.replace(o, help=f"{o.help} (targets: {', '.join(users[o.param])})") for o in merged.values()]


def _register_export_command() -> None:
    options = _export_options()

    def export(ckpt: Path, **given: Any) -> None:
        """Export a checkpoint to one target (artifact dir with manifest and reference data)."""
        from edgeprep.single_stage import export_checkpoint

        target, output, min_sqnr_db = given.pop("target"), given.pop("output"), given.pop("min_sqnr_db")
        trust_pickle, as_json = given.pop("trust_pickle"), given.pop("as_json")
        chosen = {"target": target, **values_to_config(options, given)}
        art = export_checkpoint(ckpt, output, chosen, trust_pickle=trust_pickle, min_sqnr_db=min_sqnr_db)
        check = art.info.get("check_sqnr_db")  # the exporter's own run on this machine's runtime (ONNX)
        if as_json:
            emit_json({"name": art.name, "target": art.target, "path": str(art.path), "bytes": art.size_bytes,
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

    export.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        _COMMON[0],
        inspect.Parameter("target", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option(..., "--target", "-t", help="Export target: "
                                               + ", ".join(target_specs()) + ".")),
        inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                          default=typer.Option(..., "-o", "--output", help="Artifact directory to write.")),
        *parameters(options),
        inspect.Parameter("min_sqnr_db", inspect.Parameter.KEYWORD_ONLY, annotation=float, default=typer.Option(
            40.0, help="The export's self-check (ONNX Runtime vs the PyTorch model, on this machine) must reach "
                       "this SQNR, else exit 1; recorded in the manifest for `validate`.")),
        _TAIL[1],
        inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--json", help=JSON_HELP)),
    ])
    app.command()(export)


_register_export_command()
