"""edgeprep.checkpoint: pickle-free checkpoints, exact round trips, decision replay, atomic saves."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import edgeprep.checkpoint as ckpt_mod
from edgeprep.checkpoint import SCHEMA, load_checkpoint, save_checkpoint
from edgeprep.errors import BadInputError, UnsafePickleError
from edgeprep.models import load_model
from edgeprep.recipe import ModelConfig


def one_line_error(excinfo, *needles: str) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


def perturbed(model: nn.Module, seed: int = 1) -> nn.Module:
    """Weights unlike the seeded init, so a load that silently skipped them would be caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name, shape", [("vit-tiny-digits", (1, 8, 8)), ("cnn-bench", (1, 32, 32))])
def test_round_trip_is_exact(tmp_path, name, shape):
    cfg = ModelConfig(source=name)
    model = perturbed(load_model(cfg).module)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    if name == "cnn-bench":  # move BN running statistics away from their init, too
        model.train()
        with torch.no_grad():
            model(x)
    model.eval()
    meta = {"example_input_shape": [2, *shape], "metrics": {"accuracy": 0.5}}
    save_checkpoint(tmp_path / "ck", model, cfg, [], meta)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["checkpoint.json", "model.safetensors"]
    doc = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    assert doc["schema"] == SCHEMA and doc["model"]["source"] == name and doc["decisions"] == []
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.meta == meta and ck.model_cfg == cfg and not ck.model.training
    with torch.no_grad():
        assert max_abs(ck.model(x), model(x)) == 0


# A toy structural decision, as channel pruning would record it: keep some hidden units of an MLP.
def narrow_mlp(model: nn.Module, decision: dict) -> nn.Module:
    mlp = model.get_submodule(decision["module"])
    keep = torch.tensor(decision["keep"])
    fc1, fc2 = nn.Linear(mlp.fc1.in_features, len(keep)), nn.Linear(len(keep), mlp.fc2.out_features)
    with torch.no_grad():  # the stage slices the live weights; on replay they are overwritten anyway
        fc1.weight.copy_(mlp.fc1.weight[keep])
        fc1.bias.copy_(mlp.fc1.bias[keep])
        fc2.weight.copy_(mlp.fc2.weight[:, keep])
        fc2.bias.copy_(mlp.fc2.bias)
    mlp.fc1, mlp.fc2 = fc1, fc2
    return model


def test_decisions_are_replayed_before_weights_load(tmp_path, monkeypatch):
    from edgeprep import registry
    from edgeprep.recipe import FinetuneConfig

    registry.stage_specs()  # the built-ins first, so the test's kind is added to them
    spec = registry.StageSpec("test-narrow", FinetuneConfig, object, replayers={"test-narrow-mlp": narrow_mlp})
    monkeypatch.setitem(registry._STAGES, "test-narrow", spec)
    cfg = ModelConfig(source="vit-tiny-digits")
    decision = {"kind": "test-narrow-mlp", "module": "blocks.1.mlp", "keep": list(range(0, 128, 3))}
    model = perturbed(narrow_mlp(load_model(cfg).module, decision))
    save_checkpoint(tmp_path / "ck", model, cfg, [decision], {})
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.model.blocks[1].mlp.fc1.out_features == 43 and ck.decisions == [decision]
    x = torch.randn(3, 1, 8, 8)
    assert max_abs(ck.model(x), model(x)) == 0

    monkeypatch.delitem(registry._STAGES, "test-narrow")
    with pytest.raises(BadInputError) as ei:
        load_checkpoint(tmp_path / "ck")
    one_line_error(ei, "decisions.0", "unknown decision kind 'test-narrow-mlp'", "known kinds:")


TIED_MODULE = """
import torch
from torch import nn

class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4, bias=False)
        self.out = nn.Linear(4, 4, bias=False)
        self.out.weight = self.embed.weight          # one tensor under two names
        self.register_buffer("mix", torch.arange(12.0).reshape(3, 4).t())  # non-contiguous view

    def forward(self, x):
        return self.out(self.embed(x)) @ self.mix

def build():
    return Tied()
"""


def test_tied_and_noncontiguous_tensors_and_factory_next_to_recipe(tmp_path, monkeypatch):
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    (recipe_dir / "ckpt_tied_models_q.py").write_text(TIED_MODULE)
    monkeypatch.setattr(sys, "path", list(sys.path))
    cfg = ModelConfig(source="ckpt_tied_models_q:build")
    model = perturbed(load_model(cfg, base_dir=recipe_dir).module)
    assert not model.mix.is_contiguous()
    save_checkpoint(tmp_path / "ck", model, cfg, [], {}, base_dir=recipe_dir)
    # a fresh process would not have the module imported, nor recipe_dir on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(recipe_dir.resolve())])
    monkeypatch.delitem(sys.modules, "ckpt_tied_models_q")
    ck = load_checkpoint(tmp_path / "ck")
    x = torch.randn(2, 4)
    assert max_abs(ck.model(x), model(x)) == 0
    assert ck.model.out.weight is ck.model.embed.weight  # still tied after loading


def test_file_source_made_absolute_and_guarded_by_sha256(tmp_path, monkeypatch):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    model = perturbed(load_model(ModelConfig(source="vit-tiny-digits")).module)
    x = torch.randn(2, 1, 8, 8)
    batch = ({0: torch.export.Dim("batch")},)  # a fixed-batch program is refused at load
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=batch), str(src_dir / "m.pt2"))
    cfg = ModelConfig(source="m.pt2")
    save_checkpoint(tmp_path / "ck", load_model(cfg, base_dir=src_dir).module, cfg, [], {}, base_dir=src_dir)
    doc = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    assert doc["model"]["source"] == str(src_dir / "m.pt2")
    monkeypatch.chdir(tmp_path)  # loads from anywhere
    assert max_abs(load_checkpoint(tmp_path / "ck").model(x), model(x)) == 0

    (src_dir / "m.pt2").write_bytes((src_dir / "m.pt2").read_bytes() + b"\0")
    with pytest.raises(BadInputError) as ei:
        load_checkpoint(tmp_path / "ck")
    one_line_error(ei, "changed since this checkpoint was written")


def test_checkpoint_never_grants_pickle_trust(tmp_path):
    model = load_model(ModelConfig(source="vit-tiny-digits")).module
    torch.save(model, tmp_path / "full.pt")
    cfg = ModelConfig(source=str(tmp_path / "full.pt"), trust_pickle=True)
    save_checkpoint(tmp_path / "ck", load_model(cfg).module, cfg, [], {})
    with pytest.raises(UnsafePickleError) as ei:
        load_checkpoint(tmp_path / "ck")
    one_line_error(ei, "--trust-pickle")
    x = torch.randn(2, 1, 8, 8)
    assert max_abs(load_checkpoint(tmp_path / "ck", trust_pickle=True).model(x), model(x)) == 0


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    cfg = ModelConfig(source="vit-tiny-digits")
    first = load_model(cfg).module
    save_checkpoint(tmp_path / "ck", first, cfg, [], {"n": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C between writing the weights and the json

    monkeypatch.setattr(ckpt_mod, "write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck", perturbed(load_model(cfg).module), cfg, [], {"n": 2})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "new", first, cfg, [], {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dirs, no half "new"
    ck = load_checkpoint(tmp_path / "ck")
    x = torch.randn(2, 1, 8, 8)
    assert ck.meta == {"n": 1} and max_abs(ck.model(x), first(x)) == 0


def test_bad_checkpoints_are_one_line_bad_input(tmp_path):
    cfg = ModelConfig(source="vit-tiny-digits")
    save_checkpoint(tmp_path / "good", load_model(cfg).module, cfg, [], {})
    doc = json.loads((tmp_path / "good" / "checkpoint.json").read_text())

    def variant(name, text=None, weights=True):
        d = tmp_path / name
        d.mkdir()
        if text is not None:
            (d / "checkpoint.json").write_text(text)
        if weights:
            (d / "model.safetensors").write_bytes((tmp_path / "good" / "model.safetensors").read_bytes())
        return d

    cases = [
        (tmp_path / "absent", ["checkpoint directory not found"]),
        (variant("nojson"), ["no checkpoint.json"]),
        (variant("badjson", "{not json"), ["not valid JSON"]),
        (variant("schema", json.dumps({**doc, "schema": "other/9"})), ["'other/9'", SCHEMA]),
        (variant("nomodel", json.dumps({**doc, "model": {"source": "x", "oops": 1}})), ["invalid 'model' at oops"]),
        (variant("noweights", json.dumps(doc), weights=False), ["no model.safetensors"]),
        (variant("wrongweights", json.dumps({**doc, "model": {"source": "cnn-bench"}})), ["missing keys"]),
    ]
    for path, needles in cases:
        with pytest.raises(BadInputError) as ei:
            load_checkpoint(path)
        one_line_error(ei, str(path), *needles)
