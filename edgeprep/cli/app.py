"""The Typer app every command module registers on, its two consoles and the shared option texts.

Stdout carries results (tables, --json); stderr carries progress and the one-line errors.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console

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


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


