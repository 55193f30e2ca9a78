"""Recipe loading: the bundled recipes validate; cross-stage order rules."""
from __future__ import annotations

import pytest

from edgeprep.errors import RecipeError
from edgeprep.recipe import check_stage_order, load_recipe, parse_recipe
from edgeprep.recipes_index import bundled_recipes, resolve_recipe


def test_bundled_recipes_load():
    rows = bundled_recipes()
    assert "quickstart" in [r["name"] for r in rows]
    for r in rows:
        recipe = load_recipe(r["path"])
        assert recipe.name
        assert r["description"], f"{r['path']} needs a first-line '# description'"


def test_resolve_by_name_and_roundtrip():
    path = resolve_recipe("quickstart")
    recipe = load_recipe(path)
    again = parse_recipe(__import__("yaml").safe_load(recipe.to_yaml()))
    assert again == recipe
    assert recipe.stages[0].kind == "finetune"
    assert recipe.export[0].ptq == ["dynamic", "static"]


@pytest.mark.parametrize("kinds", [
    ["finetune", "prune", "finetune", "reparam", "qat", "finetune"],
    ["prune", "binarize"],
    ["reparam"],
    [],
])
def test_stage_order_accepts(kinds):
    check_stage_order(kinds)


@pytest.mark.parametrize("kinds,fragment", [
    (["qat", "prune"], "stage 1 (prune) must come before stage 0 (qat)"),
    (["reparam", "finetune", "prune"], "stage 2 (prune) must come before stage 0 (reparam)"),
    (["qat", "binarize"], "cannot both appear"),
])
def test_stage_order_rejects(kinds, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        check_stage_order(kinds)


def test_stage_override_resolution():
    recipe = parse_recipe({"name": "t", "model": {"source": "vit-tiny-digits"}, "train": {"steps": 50, "lr": 0.01},
                           "stages": [{"kind": "finetune", "train": {"steps": 7}}]})
    resolved = recipe.stages[0].train.resolve(recipe.train)
    assert (resolved.steps, resolved.lr) == (7, 0.01)


def test_error_path_drops_discriminator():
    with pytest.raises(RecipeError, match=r"stages\.0\.train\.bogus"):
        parse_recipe({"name": "t", "model": {"source": "x"}, "stages": [{"kind": "finetune", "train": {"bogus": 1}}]})
