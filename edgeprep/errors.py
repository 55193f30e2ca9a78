"""Typed errors. Each carries the CLI exit code documented in the README ("Exit codes").

Exit codes: 0 ok, 1 a gate or check failed, 2 bad input, 3 export or runtime failure,
4 missing optional dependency. The CLI prints ``str(error)`` as one line; messages should say
what is wrong, where, and how to fix it.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 3
EXIT_MISSING_DEPENDENCY = 4


class EdgeprepError(Exception):
    """Base class; never raised directly."""

    exit_code: int = EXIT_BAD_INPUT

    def __str__(self) -> str:  # always one line, whatever the caller passed
        return " ".join(super().__str__().split())


class BadInputError(EdgeprepError):
    """A recipe, path, option or file given by the user is wrong (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class RecipeError(BadInputError):
    """The recipe does not parse or does not validate (exit 2)."""


class UnsafePickleError(BadInputError):
    """A pickle that needs arbitrary code execution was refused (exit 2)."""


class GateFailedError(EdgeprepError):
    """A recipe gate or a `check` comparison failed (exit 1)."""

    exit_code = EXIT_GATE_FAILED


class ExportError(EdgeprepError):
    """An exporter could not produce an artifact (exit 3)."""

    exit_code = EXIT_RUNTIME


class RuntimeFailure(EdgeprepError):
    """A runtime could not load or run an artifact (exit 3)."""

    exit_code = EXIT_RUNTIME


class IntegrityError(RuntimeFailure):
    """An artifact on disk does not match its manifest (sha256 / size) (exit 3)."""


class TrainingDivergedError(RuntimeFailure):
    """The loss became NaN or inf; the last good checkpoint is kept (exit 3)."""


class MissingDependencyError(EdgeprepError):
    """An optional package is not installed (exit 4)."""

    exit_code = EXIT_MISSING_DEPENDENCY

    def __init__(self, package: str, extra: str | None = None, purpose: str = ""):
        self.package = package
        self.extra = extra
        fix = f"pip install 'edgeprep[{extra}]'" if extra else f"pip install {package}"
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(f"missing optional dependency '{package}'{what}: install it with {fix}")
