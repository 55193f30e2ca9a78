"""Exporters and runtimes, one module per target; installed as ``edgeprep.exporters`` (the repo's
top-level ``exporters/`` folder, mapped by pyproject.toml's ``package-dir``).

Which targets exist is the registry's business (``edgeprep.registry``, filled by
``edgeprep.builtin`` and plugins); these two lookups only read it. Heavy or optional packages are
imported inside the functions that need them.
"""
from __future__ import annotations

from edgeprep.errors import BadInputError
from edgeprep.exporters.base import Exporter, Runtime
from edgeprep.registry import runtimes, target_spec


def get_exporter(target: str) -> Exporter:
    return target_spec(target).exporter()


def get_runtime(name: str) -> Runtime:
    known = runtimes()
    if name not in known:
        raise BadInputError(f"unknown runtime {name!r}; valid runtimes: {', '.join(sorted(known))}")
    return known[name]()
