"""PRepBN / RepBN / SLA modules, their folding, and the lam schedule (unit level, no pipeline)."""
from __future__ import annotations

import collections
import copy

import numpy as np
import pytest
import torch
from torch import nn

from edgeprep.models.vit import ViT
from edgeprep.recipe import TrainConfig
from edgeprep.reparam.fold import (
    ReparamNotFinishedError,
    export_form,
    fold_into_linear_input,
    fold_into_output,
    fold_reparam,
    replay_fold,
)
from edgeprep.reparam.norms import MaskedBatchNorm, PRepBN, RepBN, advance_all, lam_at
from edgeprep.reparam.sla import SimplifiedLinearAttention, SLAInference, linear_attention
from edgeprep.reparam.surgery import reparam_model, replay_reparam
from edgeprep.train import train


def _small_vit(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(image_size=16, patch_size=2, dim=32, depth=2, heads=2)  # 64 patch tokens + cls


def _randomize_bn(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BN statistics and affine, so a fold that ignores any of them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MaskedBatchNorm):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g))
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(0.2 + torch.rand(c, generator=g))
            if isinstance(m, RepBN) and isinstance(m.alpha, nn.Parameter):
                m.alpha.fill_(0.7)
            if isinstance(m, SimplifiedLinearAttention):  # the zero-initialised parts, made live
                m.pos.normal_(0, 0.1, generator=g)
                m.dwc.weight.normal_(0, 0.1, generator=g)
                m.dwc.bias.normal_(0, 0.1, generator=g)


# ----------------------------------------------------------------------------- lam schedule
def test_lam_values():
    assert [lam_at(s, 2, 4) for s in range(8)] == [1, 1, 1, 0.75, 0.5, 0.25, 0, 0]
    assert lam_at(0, 0, 0) == 0.0 and lam_at(5, 10, 0) == 1.0 and lam_at(10, 10, 0) == 0.0


class _Split:
    def __init__(self, n: int = 96, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 16, 16, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)


def test_lam_follows_optimizer_steps_not_forward_calls():
    """Gradient accumulation (3 forwards per step) and evaluation passes must not move lam."""
    model = _small_vit()
    reparam_model(model, "prepbn", "keep", warmup_steps=2, decay_steps=4)
    norms = [m for m in model.modules() if isinstance(m, PRepBN)]
    seen: list[float] = []
    cfg = TrainConfig(steps=8, batch_size=8, grad_accum_steps=3, lr=1e-3, warmup_steps=0, eval_every=1)

    def record(step: int, m: nn.Module) -> None:  # runs after advance: lam for the next step
        seen.append(norms[0].lam)

    train(model, _Split(), cfg, step_callbacks=[lambda s, m: advance_all(m), record],
          eval_fn=lambda m: {"acc": 0.0}, progress=False)
    assert all(int(n.steps_done) == 8 for n in norms)
    assert seen == [lam_at(s, 2, 4) for s in range(1, 9)]


def test_schedule_survives_save_and_load():
    """The step count is in the state dict: a reloaded model continues the schedule."""
    full = _small_vit()
    decision = reparam_model(full, "prepbn", "sla", warmup_steps=1, decay_steps=6)
    part = copy.deepcopy(full)
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=0)
    train(part, _Split(), cfg, step_callbacks=[lambda s, m: advance_all(m)], progress=False)
    state = part.state_dict()
    assert any(k.endswith("steps_done") for k in state)

    resumed = replay_reparam(_small_vit(seed=5), decision)
    resumed.load_state_dict(state)
    norms = [m for m in resumed.modules() if isinstance(m, PRepBN)]
    assert all(int(n.steps_done) == 3 for n in norms) and norms[0].lam == pytest.approx(lam_at(3, 1, 6))
    train(resumed, _Split(seed=1), cfg, step_callbacks=[lambda s, m: advance_all(m)], progress=False)
    assert all(int(n.steps_done) == 6 for n in norms) and norms[0].lam == pytest.approx(1 / 6)


def test_fold_refused_while_lam_positive():
    model = _small_vit()
    reparam_model(model, "prepbn", "keep", warmup_steps=1, decay_steps=2)
    advance_all(model, 2)  # lam 0.5
    with pytest.raises(ReparamNotFinishedError, match=r"lam 0.5 after 2 of the 3 .*train 1 more steps"):
        export_form(model)
    advance_all(model, 1)
    assert not any(isinstance(m, PRepBN) for m in export_form(model).modules())


# ----------------------------------------------------------------------------- BatchNorm pieces
def test_masked_batchnorm_matches_batchnorm1d_and_skips_masked_rows():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 6) * 3 + 1
    ours, ref = MaskedBatchNorm(6), nn.BatchNorm1d(6)
    for _ in range(3):
        torch.testing.assert_close(ours(x), ref(x.reshape(-1, 6)).reshape(x.shape), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)

    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[:, :3] = True  # positions 3.. are padding
    padded = x.clone()
    padded[:, 3:] = 1000.0  # what padding is must not matter
    masked = MaskedBatchNorm(6)
    masked.token_mask = mask
    out = masked(padded)
    plain = MaskedBatchNorm(6)
    torch.testing.assert_close(out[:, :3], plain(x[:, :3].reshape(-1, 6)).reshape(4, 3, 6))
    torch.testing.assert_close(masked.running_mean, plain.running_mean)


def test_repbn_affine_equals_eval_forward():
    torch.manual_seed(0)
    norm = RepBN(8)
    _randomize_bn(nn.ModuleList([norm]))
    with torch.no_grad():
        norm.alpha.fill_(0.3)
    norm.eval()
    x = torch.randn(3, 5, 8)
    a, b = norm.affine()
    torch.testing.assert_close(norm(x), x * a + b, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- folding
def test_fold_before_linear_exact():
    torch.manual_seed(0)
    lin = nn.Linear(8, 5)
    a, b = torch.rand(8) + 0.5, torch.randn(8)
    x = torch.randn(10, 8)
    ref = lin(x * a + b)
    fold_into_linear_input(lin, a, b)
    assert float((lin(x) - ref).detach().abs().max()) < 1e-5


def test_conv_fold_with_biased_conv_is_exact_and_needs_the_alpha_bias_term():
    """RepBN after a biased conv: a * (Wx + c) + b. Dropping alpha * c (the reference code's
    formula) is wrong by a lot; ours is exact."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.bias.normal_(0, 1.0)
    norm = RepBN(6)
    _randomize_bn(nn.ModuleList([norm]))
    with torch.no_grad():
        norm.alpha.fill_(0.9)
    norm.eval()
    x = torch.randn(2, 3, 9, 9)
    ref = norm(conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # BN over channels
    a, b = norm.affine()
    folded = copy.deepcopy(conv)
    fold_into_output(folded, a, b)
    assert float((folded(x) - ref).abs().max()) < 1e-5
    # the reference code's formula: bias' = gamma/std * c + b, without alpha * c
    bn = norm.bn
    gamma_std = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    wrong = copy.deepcopy(conv)
    with torch.no_grad():
        wrong.weight.mul_(a.reshape(-1, 1, 1, 1))
        wrong.bias.copy_(gamma_std * conv.bias + b)
    assert float((wrong(x) - ref).abs().max()) > 0.1


@pytest.mark.parametrize("attention", ["keep", "sla"])
def test_folded_vit_equals_unfolded_and_replays(attention):
    model = _small_vit()
    decision = reparam_model(model, "prepbn", attention, warmup_steps=0, decay_steps=0)
    _randomize_bn(model)
    model.eval()
    x = torch.randn(5, 1, 16, 16)
    ref = model(x)
    folded = copy.deepcopy(model)
    fold_decision = fold_reparam(folded, check_inputs=(x,))
    assert float((folded(x) - ref).abs().max()) <= 1e-5
    assert not any(isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, PRepBN)) for m in folded.modules())
    assert fold_decision["folded"] == {"blocks.0.norm1": ["blocks.0.attn.qkv"], "blocks.0.norm2": ["blocks.0.mlp.fc1"],
                                       "blocks.1.norm1": ["blocks.1.attn.qkv"], "blocks.1.norm2": ["blocks.1.mlp.fc1"],
                                       "norm": ["head"]}
    # checkpoint replay: the same structure from the decisions, then the weights
    rebuilt = replay_fold(replay_reparam(_small_vit(seed=3), decision), fold_decision)
    rebuilt.load_state_dict(folded.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), folded(x))


# ----------------------------------------------------------------------------- SLA
def test_linear_attention_orders_agree_and_match_the_definition():
    g = torch.Generator().manual_seed(0)
    q = torch.relu(torch.randn(2, 3, 50, 16, generator=g))
    k = torch.relu(torch.randn(2, 3, 50, 16, generator=g))
    v = torch.randn(2, 3, 50, 16, generator=g)
    kv, qk = linear_attention(q, k, v, "kv_first"), linear_attention(q, k, v, "qk_first")
    assert float((kv - qk).abs().max()) < 1e-5
    i = 7  # O_i = sum_j (q_i . k_j) v_j / (q_i . sum_j k_j + 1e-6), written out for one token
    w = (q[..., i:i + 1, :] * k).sum(-1, keepdim=True)  # [2, 3, 50, 1]
    direct = (w * v).sum(-2) / ((q[..., i, :] * k.sum(-2)).sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(kv[..., i, :], direct, rtol=1e-4, atol=1e-5)


def test_sla_module_orders_agree_and_class_token_gets_no_conv():
    model = _small_vit()
    reparam_model(model, "prepbn", "sla", 0, 0)
    _randomize_bn(model)
    sla = model.blocks[0].attn
    assert isinstance(sla, SimplifiedLinearAttention) and sla.grid == (8, 8) and sla.prefix_tokens == 1
    x = torch.randn(3, 65, 32)
    sla.order = "kv_first"
    a = sla(x)
    sla.order = "qk_first"
    b = sla(x)
    assert float((a - b).abs().max()) < 1e-5
    v = torch.randn(2, 65, 32)  # [B, N, heads * head_dim]
    local = sla._local(v).detach()
    assert float(local[:, 0].abs().max()) == 0.0 and float(local[:, 1:].abs().max()) > 0
    # the same as running each head through the shared [head_dim] depthwise conv separately
    for h in range(2):
        grid = v[:, 1:, h * 16:(h + 1) * 16].transpose(1, 2).reshape(2, 16, 8, 8)
        per_head = sla.dwc(grid).flatten(2).transpose(1, 2).detach()
        torch.testing.assert_close(local[:, 1:, h * 16:(h + 1) * 16], per_head, rtol=1e-5, atol=1e-6)


def _live_sla(tokens: int, grid, prefix: int, order: str = "auto") -> SimplifiedLinearAttention:
    torch.manual_seed(3)
    sla = SimplifiedLinearAttention(32, 2, 16, tokens, grid=grid, prefix_tokens=prefix, order=order)
    with torch.no_grad():  # a trained layer: conv and positional term non-zero
        sla.dwc.weight.normal_(0, 0.2)
        sla.dwc.bias.normal_(0, 0.2)
        sla.pos.normal_(0, 0.5)
    return sla.eval()


@pytest.mark.parametrize("tokens,grid,prefix", [(65, (8, 8), 1), (64, (8, 8), 0), (12, None, 0), (40, None, 2)])
@pytest.mark.parametrize("order", ["kv_first", "qk_first"])
def test_sla_inference_form_is_the_same_function(tokens, grid, prefix, order):
    sla = _live_sla(tokens, grid, prefix, order)
    fast = SLAInference(sla).eval()
    x = torch.randn(3, tokens, 32)
    with torch.no_grad():
        ref, got = sla(x), fast(x)
    assert float(ref.abs().max()) > 0.1
    assert float((got - ref).abs().max()) < 1e-5
    if prefix:  # the class token's output has no conv term in either form
        with torch.no_grad():
            sla.dwc.weight.zero_()
            sla.dwc.bias.zero_()
        no_conv = SLAInference(sla)(x).detach()
        torch.testing.assert_close(no_conv[:, :prefix], got[:, :prefix], rtol=0, atol=1e-6)
        assert float((no_conv[:, prefix:] - got[:, prefix:]).abs().max()) > 1e-3


def test_sla_inference_form_has_no_layout_copies_on_ort(tmp_path):
    """Its point: ORT runs it with no Transpose / Split node (the softmax layer needs four transposes)."""
    pytest.importorskip("onnxruntime")
    from edgeprep.exporters import get_exporter
    from edgeprep.exporters.onnx import OnnxOptions
    from edgeprep.exporters.onnxruntime_rt import optimized_graph

    fast = SLAInference(_live_sla(64, (8, 8), 0)).eval()
    art = get_exporter("onnx").export(fast, (torch.randn(2, 64, 32),), tmp_path / "sla", OnnxOptions())
    ops = collections.Counter(n.op_type for n in optimized_graph(art.dir / "model.onnx", "extended").graph.node)
    assert ops["Transpose"] == ops["Split"] == ops["ReduceSum"] == 0, ops
    assert ops["Conv"] == 1 and ops["Relu"] == 2


def test_sla_starts_from_the_original_weights():
    model = _small_vit()
    attn = model.blocks[0].attn
    sla = SimplifiedLinearAttention.from_attention(attn, tokens=65, grid=(8, 8), prefix_tokens=1)
    torch.testing.assert_close(sla.qkv.weight, attn.qkv.weight)
    torch.testing.assert_close(sla.proj.bias, attn.proj.bias)
    assert float(sla.pos.abs().max()) == 0.0 and float(sla.dwc.weight.abs().max()) == 0.0


def test_sla_cost_is_linear_in_tokens():
    """Multiply-accumulates of the kv-first order grow linearly with N (counted by the profiler's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(tokens: int) -> int:
        side = int(np.sqrt(tokens))
        sla = SimplifiedLinearAttention(32, 2, 16, tokens, grid=(side, side))
        with FlopCounterMode(display=False) as counter:
            sla(torch.randn(1, tokens, 32))
        return counter.get_total_flops()

    f256, f1024 = flops(256), flops(1024)
    assert 3.9 < f1024 / f256 < 4.1  # 4x tokens -> 4x work (softmax attention: ~16x for the N^2 part)


# ----------------------------------------------------------------------------- BERT (post-LN)
@pytest.mark.parametrize("wrapped", [False, True])
def test_bert_prepbn_folds_to_affines_and_padding_does_not_move_bn_statistics(wrapped):
    """``wrapped``: the BertModel inside edgeprep's sentence-encoder wrapper (one packed input), as
    the recipe sees all-MiniLM-L6-v2: the padding mask must still reach the BatchNorms."""
    transformers = pytest.importorskip("transformers")
    from edgeprep.models.hf import PackedTokens, SentenceEncoder, pack
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=16,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    top = PackedTokens(SentenceEncoder(model)) if wrapped else model
    decision = reparam_model(top, "prepbn", "keep", warmup_steps=0, decay_steps=0)
    assert len(decision["norms"]) == 5 and all(v == [] for v in decision["norms"].values())  # all feed residuals
    ids = torch.randint(1, 50, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    other_top = copy.deepcopy(top)
    other_pad = next(m for m in other_top.modules() if isinstance(m, transformers.BertModel))
    other = ids.clone()
    other[mask == 0] = 7  # different padding tokens, same real tokens
    for net, tokens in ((top, ids), (other_top, other)):
        net.train()(pack(tokens, mask)) if wrapped else net.train()(input_ids=tokens, attention_mask=mask)
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, MaskedBatchNorm)]
    bns2 = [m for m in other_pad.modules() if isinstance(m, MaskedBatchNorm)]
    assert len(bns) == 5
    for (n, m), m2 in zip(bns, bns2):
        torch.testing.assert_close(m.running_mean, m2.running_mean, msg=n)
        torch.testing.assert_close(m.running_var, m2.running_var, msg=n)
    _randomize_bn(model)
    top.eval()

    def run() -> torch.Tensor:
        return top(pack(ids, mask)) if wrapped else top(input_ids=ids, attention_mask=mask).last_hidden_state

    ref = run()
    fold = fold_reparam(top)
    assert set(fold["affine"]) == set(decision["norms"]) and not fold["folded"]
    err = float((run() - ref).detach().abs().max())
    assert err <= 1e-6 * float(ref.abs().max())  # relative: random BN statistics make activations ~100
    assert not any(isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)) for m in model.modules())
