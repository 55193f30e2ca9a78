"""`edgeprep run`: a recipe end to end, its summary table, and the failure line that names
where parity broke."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from edgeprep.cli.app import JSON_HELP, app, emit_json, err, out
from edgeprep.errors import GateFailedError


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
        emit_json(report)
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

    from edgeprep.measure.memory import load_and_run_bytes

    base = report["baseline"]["metric"]
    out.print(f"[bold]{report['recipe']}[/bold]: baseline {base['name']} {base['value']:.4f} (PyTorch)")
    table = Table("artifact", "role", "runtime", "metric", "SQNR dB", "p50 ms", "p90 ms", "speedup",
                  "low-prec ops", "load+run MiB*", "bytes")
    for a in report["artifacts"]:
        m, p, lat, prec = a.get("metric"), a.get("parity") or {}, a.get("latency_ms") or {}, a.get("precision")
        sq = p.get("sqnr_db")
        if a.get("not_run"):  # its runtime cannot run on this machine (reason below the table)
            table.add_row(a["name"], a["role"], a["runtime"], *(["not run here"] + ["-"] * 6), f"{a['bytes']:,}")
            continue
        table.add_row(a["name"], a["role"], a["runtime"], f"{m['value']:.4f}" if m else "-",
                      "identical" if sq is None and p else (f"{sq:.1f}" if sq is not None else "-"),
                      f"{lat.get('p50', 0):.3f}", f"{lat.get('p90', 0):.3f}",
                      f"{a['speedup']:.2f}x" if a.get("speedup") else "-",
                      f"{prec['low_precision_op_fraction']:.2f}" if prec else "-",
                      "-" if (added := load_and_run_bytes(a.get("memory"))) is None else f"{added / 2**20:.1f}",
                      f"{a['bytes']:,}")
    out.print(table)
    out.print("* load+run MiB: memory the artifact's load and inference add to a fresh process of its own "
              "(a subprocess per artifact: its peak RSS minus its RSS before the load)")
    for a in report["artifacts"]:
        if a.get("not_run"):
            out.print(f"{escape(a['name'])}: not run on this machine: {escape(a['not_run'])}")
    for g in report["gates"]:
        color = "yellow" if g.get("skipped") else ("green" if g["passed"] else "red")
        word = "SKIP" if g.get("skipped") else ("PASS" if g["passed"] else "FAIL")
        where = escape(f"[{g['artifact']}]") if g.get("artifact") else ""
        out.print(f"[{color}]{word}[/{color}] {g['name']}{where}: value {g['value']} limit {g['limit']}")
    out.print(f"report: {run_dir / 'report.html'}  ({'passed' if report['passed'] else 'FAILED'})")


