"""Pruning primitives: allocation maths, importance scores, physical surgery, replay and export."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import edgeprep.pruning as P
from edgeprep.checkpoint import load_checkpoint, save_checkpoint
from edgeprep.errors import BadInputError
from edgeprep.models import load_model
from edgeprep.recipe import ModelConfig

CFG = ModelConfig(source="vit-tiny-digits")  # dim 64, depth 3, 4 heads of 16, MLP hidden 128


def vit() -> nn.Module:
    model = load_model(CFG).module
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights unlike the init (zero biases would hide bias-slicing bugs)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- allocation

def test_zero_amplitude_is_exactly_uniform():
    s = torch.tensor([0.0, 0.1, 0.37, 0.5], dtype=torch.float64)
    imp = torch.tensor([1.0, -1.0, 0.3, float("nan")])
    assert torch.equal(P.adaptive_step(s, imp, 0.02, a=0.0), s + 0.02)
    assert torch.equal(P.uniform_step(s, 0.02), s + 0.02)
    # 50 steps of D = target / 50 from zero end at the target in every layer
    u = torch.zeros(3, dtype=torch.float64)
    for _ in range(50):
        u = P.uniform_step(u, 0.5 / 50)
    assert torch.allclose(u, torch.full((3,), 0.5, dtype=torch.float64), atol=1e-12)
    assert len(set(u.tolist())) == 1


def test_lower_cosine_layer_gets_less_sparsity():
    # Block 0 rewrites its input (cos 0.2), block 2 barely touches it (cos 0.95).
    cos = torch.tensor([0.2, 0.6, 0.95])
    imp_hat = P.normalize_importance(-cos)
    s = torch.zeros(3, dtype=torch.float64)
    for _ in range(10):
        s = P.adaptive_step(s, imp_hat, 0.02, a=0.02)
    assert s[0] < s[1] < s[2]
    assert math.isclose(s.mean().item(), 0.2, abs_tol=1e-9)  # I^ has zero mean: the average step is D


def test_clipping_at_zero_and_max():
    s = P.adaptive_step([0.0, 0.985, 0.5], [1.0, -1.0, 0.0], d=0.01, a=0.5)
    assert s.tolist() == [0.0, 0.99, 0.51]


def test_normalize_importance():
    assert P.normalize_importance([1.0, 2.0, 3.0]).tolist() == [-1.0, 0.0, 1.0]
    assert P.normalize_importance([0.3, 0.3, 0.3]).tolist() == [0.0, 0.0, 0.0]
    out = P.normalize_importance([0.1, 0.5, 0.2, 0.9])
    assert out.abs().max() == 1 and abs(out.mean()) < 1e-12


def test_erk_hits_target_and_favours_small_layers():
    shapes = [(192, 64), (64, 192), (128, 64), (64, 128), (10, 64)]
    s = P.erk_sparsity(shapes, 0.5)
    n = torch.tensor([a * b for a, b in shapes], dtype=torch.float64)
    assert math.isclose(((1 - s) * n).sum().item(), 0.5 * n.sum().item(), rel_tol=1e-12)
    assert s[4] == 0  # the tiny classifier would exceed density 1: it is kept dense
    assert s[2] < s[0]  # (128+64)/(128*64) > (192+64)/(192*64): the smaller layer is denser
    dens = 1 - s[:4]
    ratio = dens / (torch.tensor([sum(x) for x in shapes[:4]]) / n[:4])
    assert torch.allclose(ratio, ratio[0].expand(4))  # density proportional to the ERK ratio
    assert torch.allclose(P.erk_sparsity([(8, 8), (8, 8)], 0.3), torch.full((2,), 0.3, dtype=torch.float64))


def test_keep_counts_and_lowest_units():
    assert P.block_keep_counts([4, 4, 4], [128, 128, 128], [0.0, 0.5, 0.99]) == [(4, 128), (2, 64), (1, 1)]
    assert P.keep_count(4, 0.3, current=2) == 2  # never grows back
    assert P.lowest_units([0.5, 0.1, 0.9, 0.1], 2) == [1, 3]
    assert P.keep_indices([0.5, 0.1, 0.9, 0.1], 2) == [0, 2]
    with pytest.raises(BadInputError):
        P.lowest_units([0.1, 0.2], 3)


# ----------------------------------------------------------------------------- importance

def test_taylor_on_toy_linear_matches_hand_computation():
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
        lin.bias.copy_(torch.tensor([0.5, -1.0]))
    x = torch.tensor([[1.0, 2.0]])
    lin(x).pow(2).sum().backward()  # dL/dy = 2y: y = [-2.5, 3.0] -> [-5, 6]
    # dW = dy^T x = [[-5, -10], [6, 12]], db = [-5, 6]
    # row 0: |1*-5| + |-2*-10| + |0.5*-5| = 5 + 20 + 2.5;  row 1: |3*6| + |0.5*12| + |-1*6| = 18 + 6 + 6
    assert P.linear_unit_scores(lin, "out", "taylor").tolist() == [27.5, 30.0]
    # columns (no bias): col 0: 5 + 18; col 1: 20 + 6
    assert P.linear_unit_scores(lin, "in", "taylor").tolist() == [23.0, 26.0]
    mag = P.linear_unit_scores(lin, "out", "magnitude")
    assert torch.allclose(mag, torch.tensor([math.sqrt(1 + 4 + 0.25), math.sqrt(9 + 0.25 + 1)], dtype=torch.float64))
    r = P.linear_unit_scores(lin, "out", "random", seed=3)
    assert torch.equal(r, P.linear_unit_scores(lin, "out", "random", seed=3))
    assert not torch.equal(r, P.linear_unit_scores(lin, "out", "random", seed=4))


def test_head_and_neuron_scores_cover_their_groups():
    model = vit()
    nn.functional.cross_entropy(model(images(8)), torch.arange(8) % 10).backward()
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    scores = P.head_scores(attn, "taylor")
    h, hd, dim = 2, attn.head_dim, attn.num_heads * attn.head_dim
    rows = [s * dim + h * hd + j for s in range(3) for j in range(hd)]
    cols = list(range(h * hd, (h + 1) * hd))

    def tw(p: torch.Tensor) -> torch.Tensor:  # elementwise |w * dL/dw|
        return (p.detach() * p.grad).abs().double()

    hand = tw(attn.qkv.weight)[rows].sum() + tw(attn.qkv.bias)[rows].sum() + tw(attn.proj.weight)[:, cols].sum()
    assert scores.shape == (4,) and math.isclose(scores[h].item(), hand.item(), rel_tol=1e-9)
    ns = P.neuron_scores(mlp, "taylor")
    hand = tw(mlp.fc1.weight)[7].sum() + tw(mlp.fc1.bias)[7] + tw(mlp.fc2.weight)[:, 7].sum()
    assert ns.shape == (128,) and math.isclose(ns[7].item(), hand.item(), rel_tol=1e-9)
    assert P.head_scores(attn, "magnitude").shape == (4,)
    model.zero_grad(set_to_none=True)
    with pytest.raises(BadInputError, match="backward"):
        P.neuron_scores(mlp, "taylor")


def test_layer_importance_is_negative_mean_cosine():
    model = vit()
    x = images(4)
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append(nn.functional.cosine_similarity(
        a[0].double(), o.double(), dim=-1).mean())) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for hk in hooks:
        hk.remove()
    imp = P.layer_importance(model.train(), x)
    assert model.training  # mode restored
    assert torch.allclose(imp, -torch.stack(seen))
    assert P.vit_block_paths(model) == ["blocks.0", "blocks.1", "blocks.2"]


# ----------------------------------------------------------------------------- surgery

def test_pruning_removes_exact_param_counts():
    model = vit()
    before = n_params(model)
    per_head, per_neuron = P.head_param_count(model.blocks[0].attn), P.neuron_param_count(model.blocks[0].mlp)
    assert per_head == 16 * (3 * 65 + 64) and per_neuron == 65 + 64
    d1 = P.prune_heads(model, "blocks.0", [3, 1])
    d2 = P.prune_mlp(model, "blocks.2", list(range(0, 128, 4)))
    assert d1 == {"kind": "vit_heads", "block": "blocks.0", "keep": [1, 3]}
    assert d2["kind"] == "vit_mlp" and len(d2["keep"]) == 32
    assert before - n_params(model) == 2 * per_head + 96 * per_neuron
    attn = model.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.qkv.out_features, attn.proj.in_features) == (2, 16, 96, 32)
    assert model(images(2)).shape == (2, 10)
    with pytest.raises(BadInputError):
        P.prune_heads(model, "blocks.0", [0, 2])  # only 2 heads left
    with pytest.raises(BadInputError):
        P.prune_mlp(model, "blocks.1", [])


def test_pruned_equals_original_with_removed_units_zeroed():
    model = vit()
    keep_h, keep_n = [0, 2], [i for i in range(128) if i % 3]
    attn, mlp = model.blocks[1].attn, model.blocks[0].mlp
    gone_h = [h for h in range(4) if h not in keep_h]
    gone_n = [i for i in range(128) if i not in keep_n]
    with torch.no_grad():  # silence the units that will go: the original model then ignores them
        attn.proj.weight[:, P.surgery.head_cols(16, gone_h)] = 0
        mlp.fc1.weight[gone_n] = 0
        mlp.fc1.bias[gone_n] = 0
        mlp.fc2.weight[:, gone_n] = 0
        ref = model(images(4))
    P.prune_heads(model, "blocks.1", keep_h)
    P.prune_mlp(model, "blocks.0", keep_n)
    with torch.no_grad():
        assert (model(images(4)) - ref).abs().max().item() <= 1e-6


def test_decisions_replay_through_checkpoint(tmp_path):
    from edgeprep.registry import replayers

    assert replayers()["vit_heads"].resolve() is P.apply_decision and replayers()["vit_mlp"].resolve() is P.apply_decision
    model = vit()
    decisions = [P.prune_heads(model, "blocks.0", [0, 3]), P.prune_mlp(model, "blocks.1", list(range(50))),
                 P.prune_heads(model, "blocks.0", [1]),  # incremental: indices relative to the pruned block
                 P.prune_mlp(model, "blocks.1.mlp", [0, 10, 49])]
    save_checkpoint(tmp_path / "ck", model, CFG, decisions, {})
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.model.blocks[0].attn.num_heads == 1 and ck.model.blocks[1].mlp.fc1.out_features == 3
    with torch.no_grad():
        assert torch.equal(ck.model(images(3)), model(images(3)))
    with pytest.raises(BadInputError):
        P.apply_decision(vit(), {"kind": "vit_heads", "block": "blocks.9", "keep": [0]})


@pytest.mark.slow
def test_pruned_vit_exports_to_onnx_with_smaller_shapes(tmp_path):
    import onnx
    import onnxruntime as ort

    from edgeprep.exporters import get_exporter

    model = vit()
    for i, b in enumerate(P.vit_block_paths(model)):
        P.prune_heads(model, b, [i % 4, 3] if i % 4 != 3 else [0])
        P.prune_mlp(model, b, list(range(0, 128, 2 + i)))
    x = images(2)
    art = get_exporter("onnx").export(model, (x,), tmp_path, None)
    shapes = {tuple(t.dims) for t in onnx.load(str(art.path)).graph.initializer}
    assert (64, 32) in shapes or (32, 64) in shapes  # blocks.0 proj / qkv slices of 2 heads x 16
    assert not any(64 * 3 in s for s in shapes)  # no full-width qkv (192 rows) survived
    sess = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(out - ref).max() <= 1e-4
