"""Bundled recipes (the repo's recipes/ folder, installed as the ``edgeprep.recipes`` package)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from edgeprep.errors import RecipeError


def _recipes_dir() -> Path:
    return Path(str(resources.files("edgeprep.recipes")))


def bundled_recipes() -> list[dict[str, Any]]:
    rows = []
    for path in sorted(_recipes_dir().glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        desc = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        rows.append({"name": path.stem, "description": desc, "path": str(path)})
    return rows


def resolve_recipe(name_or_path: str) -> Path:
    """A path to a recipe file, or the name of a bundled recipe (``quickstart``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = _recipes_dir() / f"{name_or_path}.yaml"
    if path.suffix == "" and candidate.is_file():
        return candidate
    names = ", ".join(r["name"] for r in bundled_recipes())
    raise RecipeError(f"{name_or_path}: recipe file not found and not a bundled recipe (bundled: {names})")
