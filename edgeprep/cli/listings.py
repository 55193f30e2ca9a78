"""What is available: `recipes`, `models`, `devices list|setup` (emulated CPU families) and
`doctor`."""
from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.markup import escape

from edgeprep.cli.app import JSON_HELP, app, emit_json, err, out


@app.command()
def recipes(name: Optional[str] = typer.Argument(None, help="Print this bundled recipe's YAML (to copy and edit)."),
            as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the bundled recipes, or print one."""
    from edgeprep.recipes_index import bundled_recipes, recipe_text

    if name is not None:
        text = recipe_text(name)
        if as_json:
            emit_json({"name": name, "yaml": text})
        else:
            sys.stdout.write(text)  # raw: rich would re-wrap the YAML
        return
    rows = bundled_recipes()
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        out.print(f"[bold]{escape(r['name'])}[/bold]  {escape(r['description'])}", soft_wrap=True)  # one line each
    out.print("Run one: `edgeprep run NAME`; copy one to edit it: `edgeprep recipes NAME > my-recipe.yaml`.")


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the built-in model zoo."""
    from rich.markup import escape

    from edgeprep.models import list_models

    rows = list_models()
    if as_json:
        emit_json(rows)
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
        emit_json(rows)
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
        emit_json(rows)


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Which runtimes and extras are installed, their versions, and whether they run here."""
    from edgeprep.doctor import diagnose

    rows = diagnose()
    if as_json:
        emit_json(rows)
        return
    from rich.table import Table

    table = Table("component", "installed", "version", "usable here", "note")
    for r in rows:
        table.add_row(r["name"], "yes" if r["installed"] else "no", r["version"] or "-",
                      "[green]yes[/green]" if r["usable"] else "[red]no[/red]", escape(r["note"]))
    out.print(table)


