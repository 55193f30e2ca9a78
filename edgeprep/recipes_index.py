"""Bundled recipes (the repo's recipes/ folder, installed as the ``edgeprep.recipes`` package)."""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from edgeprep.errors import RecipeError


def _recipes_dir() -> Path:
    return Path(str(resources.files("edgeprep.recipes")))


def _leading_comment(path: Path) -> str:
    """The recipe's opening ``#`` block, joined into one paragraph."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(part for part in lines if part)


def _first_sentence(text: str) -> str:
    # a sentence ends at ". " followed by a capital: "32x32 digits, 64 tokens" or "(+ PT2E int8)" do not
    match = re.search(r"[.!?](?=\s+[A-Z])", text)
    return text[:match.end()] if match else text


def bundled_recipes() -> list[dict[str, Any]]:
    """name, summary (the first sentence of its opening comment), about (the whole comment) and path."""
    rows = []
    for path in sorted(_recipes_dir().glob("*.yaml")):
        about = _leading_comment(path)
        rows.append({"name": path.stem, "description": _first_sentence(about), "about": about, "path": str(path)})
    return rows


def recipe_text(name: str) -> str:
    """A bundled recipe's YAML, to copy and edit (``edgeprep recipes quickstart > mine.yaml``)."""
    path = _recipes_dir() / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(r["name"] for r in bundled_recipes())
        raise RecipeError(f"{name}: not a bundled recipe (bundled: {names}); `edgeprep recipes` describes them")
    return path.read_text(encoding="utf-8")


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
