"""Reading ``edgeprep.report/1``: an older report.json as an ``edgeprep.report/2`` document.

``/2`` is ``/1`` with the same shape, written down as pydantic models (edgeprep/report_schema.py)
and validated when written. What differs is only what older ``/1`` writers left out, because the
field did not exist yet; ``upgrade_v1`` fills each in with what its absence meant:

- ``artifacts[].name``: the first schema had none; the target is unique per run when the name is
  absent, so it becomes the name (as the gates and the report views have always done).
- ``artifacts[].runtime_version`` and ``artifacts[].memory``: added later; absent means "not
  recorded" / "not measured", i.e. ``null``.
- ``machine.cpu``: added later; ``null`` (not recorded).

Everything else is kept as it is, and the result must then be a valid ``/2`` document: a ``/1``
file that lacks a field every ``/1`` writer wrote (``bytes``, ``parity.sqnr_db``, ...) is refused,
naming the field. ``parity.sqnr_db: null`` meant identical outputs in ``/1`` and still does.
"""
from __future__ import annotations

from typing import Any, Mapping

SCHEMA_V1 = "edgeprep.report/1"


def upgrade_v1(doc: Mapping[str, Any], schema: str) -> dict[str, Any]:
    """A ``/1`` document as a document labelled ``schema`` (a new dict; ``doc`` is not changed).

    The caller (``edgeprep.report_schema``, which owns the current label) passes ``"edgeprep.report/2"``:
    this module reads no name from report_schema, which imports it, so the two form no import cycle."""
    out = dict(doc)
    out["schema"] = schema
    machine = out.get("machine")
    if isinstance(machine, Mapping) and "cpu" not in machine:
        out["machine"] = {**machine, "cpu": None}
    arts = out.get("artifacts")
    if isinstance(arts, list):
        out["artifacts"] = [_artifact(a) if isinstance(a, Mapping) else a for a in arts]
    return out


def _artifact(art: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(art)
    if out.get("name") is None and out.get("target") is not None:
        out["name"] = out["target"]
    for key in ("runtime_version", "memory"):
        out.setdefault(key, None)
    return out
