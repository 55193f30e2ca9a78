"""The `edgeprep` command line: parse -> call the library -> print. Errors -> one line + exit code.

One module per concept registers its commands on the shared app (``edgeprep.cli.app``); importing
them here, in this order, is what makes the commands exist (and orders ``edgeprep --help``).
"""
from __future__ import annotations

import sys
from typing import Optional

from rich.markup import escape

from edgeprep.cli.app import app, err
from edgeprep.errors import EXIT_BAD_INPUT, EXIT_RUNTIME, EdgeprepError

__all__ = ["app", "build_app", "main"]

# importing a command module registers its commands; this order is `edgeprep --help`'s order
COMMAND_MODULES = ("run", "stages", "judge", "listings")


def build_app():
    """The app with every command registered. The stage commands are generated from the registry,
    which imports plugins (EDGEPREP_PLUGINS): main() calls this inside its error handling, so a
    plugin that fails to import is one line, not a traceback."""
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"edgeprep.cli.{name}")
    return app


def main(argv: Optional[list[str]] = None) -> None:
    from typer.exceptions import TyperException

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"  # the global option comes before the command
    try:
        code = build_app()(args=argv, prog_name="edgeprep", standalone_mode=False)
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
