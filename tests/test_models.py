"""edgeprep.models: the zoo, every model source, and the pickle safety rule (with a real payload)."""
from __future__ import annotations

import pickle
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from edgeprep.errors import BadInputError, UnsafePickleError
from edgeprep.models import ZOO, build_zoo_model, list_models, load_model
from edgeprep.models.vit import Attention
from edgeprep.recipe import ModelConfig


def one_line_error(excinfo, *needles: str) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelConfig(source="vit-tiny-digits"))


@pytest.fixture(scope="module")
def x8():
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class Payload:
    """Unpickling this creates ``marker``: a real arbitrary-code pickle (it calls open(path, "w"))."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------- zoo
def test_zoo_param_counts_and_listing():
    rows = {r["name"]: r for r in list_models()}
    assert set(ZOO) == {"vit-tiny-digits", "vit-bench", "cnn-bench"}
    assert set(rows) == set(ZOO) | {"minilm-l6"}  # the hf extra is installed by make
    assert rows["minilm-l6"]["params"] == 22_713_216 and rows["minilm-l6"]["data"] == "docstrings"
    assert rows["vit-tiny-digits"]["params"] == 102_666  # ~0.1 M
    assert 2_500_000 < rows["vit-bench"]["params"] < 3_000_000  # measured 2,687,434
    assert 500_000 < rows["cnn-bench"]["params"] < 1_000_000  # measured 696,042
    assert rows["vit-bench"]["input_shape"] == [1, 32, 32] and rows["cnn-bench"]["data"] == "digits32"
    assert all(r["description"] for r in rows.values())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_forward_and_handle(name):
    h = load_model(ModelConfig(source=name))
    assert h.name == name and h.num_classes == 10 and h.data == ZOO[name].data
    assert h.input_shape == ZOO[name].input_shape and not h.module.training
    with torch.no_grad():
        out = h.module(torch.randn(2, *h.input_shape))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_zoo_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = build_zoo_model("vit-tiny-digits").module.state_dict()
    assert torch.equal(state, torch.get_rng_state())
    b = build_zoo_model("vit-tiny-digits").module.state_dict()
    c = build_zoo_model("vit-tiny-digits", {"seed": 1}).module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_zoo_kwargs_override_and_validation():
    h = load_model(ModelConfig(source="vit-tiny-digits", kwargs={"num_classes": 5, "image_size": 16}))
    assert h.num_classes == 5 and h.input_shape == (1, 16, 16)
    assert h.module(torch.randn(2, 1, 16, 16)).shape == (2, 5)
    cnn = load_model(ModelConfig(source="cnn-bench", kwargs={"in_chans": 3}))
    assert cnn.input_shape == (3, 32, 32)
    with pytest.raises(BadInputError) as ei:
        load_model(ModelConfig(source="vit-tiny-digits", kwargs={"widht": 3}))
    one_line_error(ei, "widht", "valid:", "mlp_ratio")
    with pytest.raises(BadInputError) as ei:
        load_model(ModelConfig(source="vit-tiny-digits", kwargs={"dim": 65}))
    one_line_error(ei, "not divisible")
    with pytest.raises(BadInputError) as ei:
        load_model(ModelConfig(source="vit-tiny-digits", input_shape=[1, 32, 32]))
    one_line_error(ei, "model.input_shape")


def test_attention_is_explicit_hookable_and_matches_sdpa():
    torch.manual_seed(0)
    attn = Attention(dim=64, num_heads=4).eval()
    assert (attn.num_heads, attn.head_dim) == (4, 16)
    seen = []
    attn.attn_probs.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 17, 64)
    out = attn(x)
    assert seen[0].shape == (2, 4, 17, 17)
    assert max_abs(seen[0].sum(-1), torch.ones(2, 4, 17)) < 1e-5
    q, k, v = attn.qkv(x).reshape(2, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)
    ref = attn.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 17, 64))
    assert max_abs(out, ref) < 1e-5  # measured ~1e-7


# ----------------------------------------------------------------------------- factory strings
def test_factory_string_with_kwargs():
    cfg = ModelConfig(source="edgeprep.models.cnn:ResNetSmall",
                      kwargs={"widths": [8, 16], "strides": [1, 2], "blocks_per_stage": 1}, input_shape=[1, 12, 12])
    h = load_model(cfg)
    assert h.input_shape == (1, 12, 12) and h.num_classes is None and h.data is None
    assert h.module(torch.randn(2, 1, 12, 12)).shape == (2, 10)
    again = load_model(cfg).module.state_dict()  # factories are seeded too: same recipe, same init
    assert all(torch.equal(v, again[k]) for k, v in h.module.state_dict().items())


def test_factory_module_next_to_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # undo the base_dir insertion afterwards
    (tmp_path / "recipe_local_models_xq.py").write_text(
        "from torch import nn\ndef build(width=4):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, width))\n"
        "def not_a_model():\n    return 42\n")
    h = load_model(ModelConfig(source="recipe_local_models_xq:build", kwargs={"width": 3}), base_dir=tmp_path)
    assert h.module(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(BadInputError) as ei:
        load_model(ModelConfig(source="recipe_local_models_xq:not_a_model"), base_dir=tmp_path)
    one_line_error(ei, "returned a int", "nn.Module")


def test_factory_only_with_weights_files():
    for source in ("vit-tiny-digits", "edgeprep.models.vit:ViT"):
        with pytest.raises(BadInputError) as ei:
            load_model(ModelConfig(source=source, factory="vit-tiny-digits"))
        one_line_error(ei, "model.factory", "remove")


@pytest.mark.parametrize("source, needles", [
    ("no_such_pkg_zz.models:build", ["cannot import 'no_such_pkg_zz.models'", "PYTHONPATH"]),
    ("edgeprep.models.vit:Nope", ["has no attribute 'Nope'"]),
    ("edgeprep.models.vit:ViT", ["raised ValueError", "not divisible"]),  # kwargs below break it
    ("vit-tiny", ["file not found", "vit-tiny-digits"]),  # a typo of a zoo name
])
def test_factory_and_name_errors(source, needles):
    with pytest.raises(BadInputError) as ei:
        load_model(ModelConfig(source=source, kwargs={"dim": 65} if source.endswith(":ViT") else {}))
    one_line_error(ei, *needles)


# ----------------------------------------------------------------------------- files
def test_torchscript_round_trip(tmp_path, tiny, x8):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices
        traced = torch.jit.trace(tiny.module, x8)
        traced.save(str(tmp_path / "m.ts"))
        traced.save(str(tmp_path / "m.pt"))  # a .pt that is a TorchScript archive, detected by content
        ts = load_model(ModelConfig(source="m.ts", input_shape=[1, 8, 8]), base_dir=tmp_path)
        pt = load_model(ModelConfig(source=str(tmp_path / "m.pt")))
    ref = tiny.module(x8)
    assert max_abs(ts.module(x8), ref) == 0 and max_abs(pt.module(x8), ref) == 0
    assert ts.input_shape == (1, 8, 8) and pt.input_shape is None and ts.name == "m.ts"


def test_exported_program_round_trip(tmp_path, tiny, x8):
    batch = ({0: torch.export.Dim("batch")},)
    torch.export.save(torch.export.export(tiny.module, (x8,), dynamic_shapes=batch), str(tmp_path / "m.pt2"))
    h = load_model(ModelConfig(source=str(tmp_path / "m.pt2")))
    assert h.input_shape == (1, 8, 8)  # read from the program's example inputs
    assert max_abs(h.module(x8), tiny.module(x8)) == 0
    assert max_abs(h.module(x8[:1]), tiny.module(x8[:1])) == 0  # any batch size runs
    h.module.train()  # mode switches stop at the wrapper instead of raising
    assert h.module.training and max_abs(h.module(x8), tiny.module(x8)) == 0


def test_safetensors_with_zoo_or_string_factory(tmp_path, x8):
    trained = build_zoo_model("vit-tiny-digits", {"seed": 5}).module  # differs from the seed-0 init
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    for factory in ("vit-tiny-digits", "edgeprep.models.vit:ViT"):
        h = load_model(ModelConfig(source="w.safetensors", factory=factory, input_shape=[1, 8, 8]),
                       base_dir=tmp_path)
        assert max_abs(h.module(x8), trained(x8)) == 0 and h.input_shape == (1, 8, 8)

    with pytest.raises(BadInputError) as ei:
        load_model(ModelConfig(source=str(tmp_path / "w.safetensors")))
    one_line_error(ei, "model.factory")
    with pytest.raises(BadInputError) as ei:
        load_model(ModelConfig(source=str(tmp_path / "w.safetensors"), factory="cnn-bench"))
    one_line_error(ei, "missing keys: ", "unexpected keys: ", "(+")
    with pytest.raises(BadInputError) as ei:
        load_model(ModelConfig(source=str(tmp_path / "w.safetensors"), factory="vit-tiny-digits",
                               kwargs={"num_classes": 3}))
    one_line_error(ei, "shape mismatch: head.weight [10, 64] vs model [3, 64], head.bias [10] vs model [3]")


def test_pt_state_dict_plain_and_nested(tmp_path, x8):
    trained = build_zoo_model("vit-tiny-digits", {"seed": 7}).module
    torch.save(trained.state_dict(), tmp_path / "sd.pt")
    torch.save({"epoch": 3, "state_dict": trained.state_dict()}, tmp_path / "nested.pth")
    for name in ("sd.pt", "nested.pth"):
        h = load_model(ModelConfig(source=str(tmp_path / name), factory="vit-tiny-digits"))
        assert max_abs(h.module(x8), trained(x8)) == 0


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil_raw.pth", "wb") as fh:
        pickle.dump(Payload(marker), fh, protocol=2)
    assert not marker.exists()
    for name in ("evil.pt", "evil_raw.pth"):
        with pytest.raises(UnsafePickleError) as ei:
            load_model(ModelConfig(source=str(tmp_path / name), factory="vit-tiny-digits"))
        assert not marker.exists(), "the payload ran"
        assert ei.value.exit_code == 2
        one_line_error(ei, name, "arbitrary code execution", "weights_only=True", "--trust-pickle", "io.open")


def test_full_module_pickle_needs_trust(tmp_path, tiny, x8):
    torch.save(tiny.module, tmp_path / "full.pt")
    with pytest.raises(UnsafePickleError) as ei:
        load_model(ModelConfig(source=str(tmp_path / "full.pt")))
    one_line_error(ei, "edgeprep.models.vit.ViT", "--trust-pickle")
    for cfg, flag in ((ModelConfig(source=str(tmp_path / "full.pt")), True),
                      (ModelConfig(source=str(tmp_path / "full.pt"), trust_pickle=True), False)):
        h = load_model(cfg, trust_pickle=flag)
        assert isinstance(h.module, nn.Module) and max_abs(h.module(x8), tiny.module(x8)) == 0


@pytest.mark.parametrize("name, content, needles, exc", [
    ("garbage.pt", bytes(range(256)) * 3, ["not a pickle or torch.save file"], BadInputError),
    ("empty.pt", b"", ["cannot read with torch.load"], BadInputError),
    ("list.pt", None, ["holds a list", "state_dict()"], BadInputError),
    ("bad.ts", b"not torchscript", ["cannot load as TorchScript"], BadInputError),
    ("bad.pt2", b"not an export", ["cannot load as a torch.export program"], BadInputError),
    ("bad.safetensors", b"\x00\x01", ["not a readable safetensors file"], BadInputError),
    ("model.onnx", b"x", ["unsupported model file type '.onnx'"], BadInputError),
    ("missing.pt", "absent", ["file not found"], BadInputError),
])
def test_bad_model_files(tmp_path, name, content, needles, exc):
    path = tmp_path / name
    if content is None:
        torch.save([torch.zeros(1)], path)
    elif content != "absent":
        path.write_bytes(content)
    with pytest.raises(exc) as ei:
        weights_file = path.suffix in (".pt", ".safetensors")
        load_model(ModelConfig(source=str(path), factory="vit-tiny-digits" if weights_file else None))
    assert type(ei.value) is exc  # a corrupted file is bad input, not an "unsafe pickle"
    one_line_error(ei, name, *needles)
