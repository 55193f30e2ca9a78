"""Reading a JSON file a user handed us (a report, a baseline, a manifest, a checkpoint config, a
Hugging Face config) so that every way it can be wrong is one ``JsonFileError`` with a one-line
reason. Callers turn it into their own typed error with the path and the fix, so a broken file
never reaches the CLI's "unexpected" catch-all.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonFileError(ValueError):
    """The file cannot be read as JSON; ``str()`` says why in a few words."""


def read_json(path: Path) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise JsonFileError("not UTF-8 text") from None
    except OSError as exc:
        raise JsonFileError(f"cannot read it ({exc.strerror or type(exc).__name__})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JsonFileError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        # json's decoder recurses once per nesting level; thousands of levels is no file we write
        raise JsonFileError("nested too deeply to be a JSON document edgeprep reads") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """``read_json`` that also insists on a top-level object."""
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise JsonFileError(f"expected a JSON object, got {type(doc).__name__}")
    return doc
