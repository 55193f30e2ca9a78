"""Adapt-Pruner engine: budget planning, allocation behaviour on real models, CNN channel surgery."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeprep.checkpoint import load_checkpoint, replay_decision, save_checkpoint
from edgeprep.errors import BadInputError
from edgeprep.measure.cost import count_macs, count_params
from edgeprep.models import load_model
from edgeprep.pruning import conv
from edgeprep.pruning.allocation import fit_offset, plan_removals
from edgeprep.pruning.engine import PruneSettings, prune_model
from edgeprep.pruning.groups import find_groups
from edgeprep.recipe import ModelConfig


class ImageCalibration:
    def __init__(self, shape, n=128, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, *shape, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def batch(self, i):
        idx = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(i))[:32]
        return self.x[idx], self.y[idx]

    def inputs(self, b):
        return b[0]

    def forward(self, m, b):
        return m(b[0])

    def loss(self, m, b):
        return F.cross_entropy(m(b[0]), b[1])


def zoo(name: str, seed: int = 0) -> nn.Module:
    model = load_model(ModelConfig(source=name, kwargs={"seed": seed})).module
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # weights unlike the init: zero biases and unit BN would hide slicing bugs
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def run_prune(model, shape, **kw):
    ex = (torch.zeros(1, *shape),)
    settings = PruneSettings(**{"ratio": 0.5, "inner_steps": 3, **kw})
    return prune_model(model, settings, ImageCalibration(shape), run_macs=lambda m: count_macs(m, ex))


# ----------------------------------------------------------------------------- planning maths
def test_fit_offset_leaves_equal_layers_alone_and_fixes_unequal_ones():
    s = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    assert torch.allclose(fit_offset(s, [1, 1, 1], 0.2), s, atol=1e-12)  # mean already 0.2: c = 0
    w = torch.tensor([1.0, 2.0, 7.0], dtype=torch.float64)
    out = fit_offset(s, w, 0.4)
    assert abs(float((out * w).sum() / w.sum()) - 0.4) < 1e-9
    assert torch.allclose(out - s, (out - s)[0].expand(3), atol=1e-12)  # one common shift
    clipped = fit_offset(torch.tensor([0.0, 0.95]), [1, 1], 0.9)  # the clip at 0.99 bites
    assert float(clipped.max()) == pytest.approx(0.99) and float(clipped.mean()) == pytest.approx(0.9)
    with pytest.raises(BadInputError):
        fit_offset(s, [1, 1, 1], 1.5)


def test_plan_hits_the_cost_target_within_half_a_fine_unit():
    # Two ViT-like blocks: 4 heads of cost 4144 and 128 neurons of cost 129 each.
    orig, cost = [4, 128, 4, 128], [4144.0, 129.0, 4144.0, 129.0]
    total = sum(o * c for o, c in zip(orig, cost))
    for sigma in (0.05, 0.2, 0.37, 0.5, 0.8):
        target = sigma * total
        removed = plan_removals(orig, orig, cost, [sigma] * 4, [0, 0, 1, 1], [True, False, True, False], target)
        got = sum(r * c for r, c in zip(removed, cost))
        assert abs(got - target) <= 129 / 2 + 1e-9, (sigma, removed)
        assert all(0 <= r <= o - 1 for r, o in zip(removed, orig))
    # Exactly half: two heads and 64 neurons per block, nothing moved by settling.
    assert plan_removals(orig, orig, cost, [0.5] * 4, [0, 0, 1, 1], [True, False, True, False], 0.5 * total) \
        == [2, 64, 2, 64]


def test_plan_is_one_way_and_respects_min_keep():
    removed = plan_removals([10, 10], [4, 10], [1.0, 1.0], [0.0, 0.0], [0, 1], [False, False], 0.0)
    assert removed[0] == 6  # 6 already gone stay gone even though the target asks for none
    assert plan_removals([10], [10], [1.0], [0.99], [0], [False], 100.0) == [9]  # at least one unit kept


def test_gradual_plan_does_not_lock_in_and_ends_exact():
    # 100 small steps of a uniform schedule to 52%: the last (exact) step must land on target even
    # though heads round in jumps and removals are one-way.
    orig, cost = [4, 128] * 3, [4144.0, 129.0] * 3
    block, coarse = [0, 0, 1, 1, 2, 2], [True, False] * 3
    total = sum(o * c for o, c in zip(orig, cost))
    current = list(orig)
    for t in range(1, 101):
        sigma = 0.52 * t / 100
        removed = plan_removals(orig, current, cost, [sigma] * 6, block, coarse, sigma * total, exact=t == 100)
        assert all(r >= o - c for r, o, c in zip(removed, orig, current))
        current = [o - r for o, r in zip(orig, removed)]
    got = sum((o - c) * u for o, c, u in zip(orig, current, cost))
    assert abs(got - 0.52 * total) <= 129 / 2
    assert current[0::2] == [2, 2, 2]  # 52% of 4 heads rounds to 2 removed in every block


# ----------------------------------------------------------------------------- engine on real models
@pytest.mark.parametrize("name,shape", [("vit-tiny-digits", (1, 8, 8)), ("cnn-bench", (1, 32, 32))])
@pytest.mark.parametrize("budget", ["params", "macs"])
def test_budget_is_met_within_two_percent(name, shape, budget):
    model = zoo(name)
    ex = (torch.zeros(1, *shape),)
    before = count_params(model) if budget == "params" else count_macs(model, ex)
    x = torch.randn(3, *shape)
    out = run_prune(model, shape, budget=budget, ratio=0.4, ratio_per_stage=0.2)
    after = count_params(model) if budget == "params" else count_macs(model, ex)
    assert abs((1 - after / before) - 0.4) <= 0.02
    assert model(x).shape == (3, 10)
    assert all(layer["kept"] >= 1 for layer in out.layers)
    assert len(out.history) == 2 and out.history[-1]["removed"] == pytest.approx(0.4, abs=0.02)


def test_zero_amplitude_prunes_exactly_like_uniform():
    a, b = zoo("vit-tiny-digits"), zoo("vit-tiny-digits")
    da = run_prune(a, (1, 8, 8), allocation="adaptive", amplitude=0.0).decisions
    db = run_prune(b, (1, 8, 8), allocation="uniform").decisions
    assert da == db
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_block_that_barely_changes_its_input_is_pruned_more():
    model = zoo("vit-tiny-digits")
    with torch.no_grad():  # block 1 adds almost nothing to the residual stream: cos(in, out) ~ 1
        model.blocks[1].attn.proj.weight.mul_(1e-3)
        model.blocks[1].attn.proj.bias.zero_()
        model.blocks[1].mlp.fc2.weight.mul_(1e-3)
        model.blocks[1].mlp.fc2.bias.zero_()
    sparsity = run_prune(model, (1, 8, 8), allocation="adaptive", ratio=0.3, ratio_per_stage=0.1,
                         inner_steps=5).history[-1]["block_sparsity"]
    assert sparsity[1] > sparsity[0] and sparsity[1] > sparsity[2]
    uniform = run_prune(zoo("vit-tiny-digits"), (1, 8, 8), allocation="uniform", ratio=0.3).history[-1]["block_sparsity"]
    assert max(uniform) - min(uniform) < 0.05  # uniform: every block near 30% (heads round)


def test_targets_and_ignore_pick_blocks():
    model = zoo("vit-tiny-digits")
    out = run_prune(model, (1, 8, 8), ratio=0.2, targets=("blocks.1", "re:blocks\\.2\\.mlp"), ignore=())
    pruned = {(layer["module"], layer["unit"]) for layer in out.layers}
    assert pruned == {("blocks.1.attn", "heads"), ("blocks.1.mlp", "mlp"), ("blocks.2.mlp", "mlp")}
    assert model.blocks[0].attn.num_heads == 4 and model.blocks[0].mlp.fc1.out_features == 128
    with pytest.raises(BadInputError, match="matches no prunable block"):
        find_groups(zoo("vit-tiny-digits"), targets=["blocks.7"])
    with pytest.raises(BadInputError, match="no channels units"):
        find_groups(zoo("vit-tiny-digits"), units=["channels"])
    with pytest.raises(BadInputError, match="prunable units hold only"):
        run_prune(zoo("vit-tiny-digits"), (1, 8, 8), ratio=0.9, units=("heads",))


def test_random_importance_depends_on_the_seed_only():
    a = run_prune(zoo("vit-tiny-digits"), (1, 8, 8), importance="random", seed=3).decisions
    b = run_prune(zoo("vit-tiny-digits"), (1, 8, 8), importance="random", seed=3).decisions
    c = run_prune(zoo("vit-tiny-digits"), (1, 8, 8), importance="random", seed=4).decisions
    assert a == b and a != c


# ----------------------------------------------------------------------------- CNN channels
def test_conv_channel_removal_equals_ignoring_the_channels_downstream():
    model = zoo("cnn-bench")
    x = torch.randn(2, 1, 32, 32)
    block = "stages.1.0"
    keep = [0, 3, 5, 8, 13, 21, 34, 55, 63]
    ref = copy.deepcopy(model)
    gone = [c for c in range(64) if c not in keep]
    with torch.no_grad():  # removing a channel == the consumer conv never reading it
        ref.get_submodule(block).conv2.weight[:, gone] = 0
        expected = ref(x)
    decision = conv.prune_conv_channels(model, block, keep)
    blk = model.get_submodule(block)
    assert (blk.conv1.out_channels, blk.bn1.num_features, blk.conv2.in_channels) == (9, 9, 9)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5, rtol=0)
    fresh = zoo("cnn-bench")
    replay_decision(fresh, decision)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(BadInputError):
        conv.prune_conv_channels(zoo("cnn-bench"), block, [0, 64])


@pytest.mark.slow
def test_pruned_cnn_checkpoint_replays_and_matches_onnx_runtime(tmp_path):
    import onnx
    import onnxruntime as ort

    from edgeprep.exporters import get_exporter

    model = zoo("cnn-bench")
    out = run_prune(model, (1, 32, 32), ratio=0.5, schedule="one-shot", inner_steps=2)
    cfg = ModelConfig(source="cnn-bench", kwargs={"seed": 0})
    save_checkpoint(tmp_path / "ck", model, cfg, out.decisions, {})
    ck = load_checkpoint(tmp_path / "ck")
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
        assert np.array_equal(ck.model(x).numpy(), ref)
    art = get_exporter("onnx").export(model, (x[:2],), tmp_path / "onnx", None)
    channels = {tuple(t.dims)[0] for t in onnx.load(str(art.path)).graph.initializer if len(t.dims) == 4}
    kept = {layer["kept"] for layer in out.layers}
    assert kept & channels  # the pruned widths are in the graph
    sess = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4
