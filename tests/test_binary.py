"""BiPFT binarizers and modules: value sets, straight-through masks, alpha gradients, estimator shapes."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edgeprep.binary.binarizers import ElasticBinarizer, binarize_weight, binary_sign, bwn_parts
from edgeprep.binary.modules import BinaryEmbedding, BinaryLinear, ResidualEstimators
from edgeprep.models.vit import Attention
from edgeprep.quant.attention import QatViTAttention


def test_binary_sign_never_zero():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0])
    assert binary_sign(x).tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]


def test_bwn_value_set_scale_and_identity_gradient():
    torch.manual_seed(0)
    w = torch.randn(6, 10) + 0.3
    w.requires_grad_(True)
    wb = binarize_weight(w)
    scale = w.detach().abs().mean()
    assert set(torch.unique(wb.detach()).tolist()) == {-float(scale), float(scale)}
    # the sign is taken after centring: an entry just above the mean is +, just below is -
    centred = (w.detach() - w.detach().mean())
    assert torch.equal(wb.detach() > 0, centred >= 0)
    g = torch.randn_like(w)
    wb.backward(g)
    assert torch.equal(w.grad, g)  # identity straight-through


def test_bwn_per_row_for_embeddings():
    torch.manual_seed(0)
    w = torch.randn(5, 8) * torch.arange(1, 6).float()[:, None]  # rows of very different scale
    signs, scale = bwn_parts(w, per_row=True)
    assert scale.shape == (5, 1)
    torch.testing.assert_close(scale.flatten(), w.abs().mean(1))
    emb = BinaryEmbedding.from_embedding(nn.Embedding.from_pretrained(w, freeze=False))
    out = emb(torch.tensor([[0, 4]]))
    for i, row in ((0, 0), (1, 4)):
        assert set(out[0, i].abs().unique().tolist()) == pytest.approx([float(scale[row])])


def test_signed_elastic_value_set_ste_mask_and_alpha_gradient():
    act = ElasticBinarizer(signed=True)
    x = torch.tensor([-9.0, -0.5, 0.0, 0.4, 2.0, 9.0], requires_grad=True)  # alpha = 2 mean|x| = 6.97
    y = act(x)
    alpha = float(act.alpha.detach())
    assert alpha == pytest.approx(2 * x.detach().abs().mean().item())  # initialised from the first batch
    assert set(y.detach().tolist()) <= {-alpha, alpha}
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y.backward(g)
    inside = (x.detach() / alpha).abs() <= 1
    assert torch.equal(x.grad, g * inside)  # zero where |x / alpha| > 1
    assert inside.tolist() == [False, True, True, True, True, False]
    expected = float((binary_sign(x.detach()) * g).sum()) / math.sqrt(x.numel())
    assert float(act.alpha.grad) == pytest.approx(expected)


def test_unsigned_elastic_value_set_ste_mask_and_alpha_gradient():
    act = ElasticBinarizer(signed=False)
    p = torch.tensor([0.0, 0.05, 0.2, 0.3, 0.45, 0.9])
    act.init_from(p)
    alpha = float(act.alpha.detach())
    assert alpha == pytest.approx(4 * p.mean().item())
    p = p.clone().requires_grad_(True)
    y = act(p)
    assert set(y.detach().tolist()) <= {0.0, alpha}
    q = p.detach() / alpha
    torch.testing.assert_close(y.detach(), torch.clamp(torch.round(q), 0, 1) * alpha)
    g = torch.ones_like(p)
    y.backward(g)
    inside = (q >= 0) & (q <= 1)
    assert torch.equal(p.grad, inside.float())
    step = torch.where(inside, torch.round(q) - q, (q > 1).float())
    assert float(act.alpha.grad) == pytest.approx(float(step.sum()) / math.sqrt(p.numel()), rel=1e-5)


def test_binary_linear_w1a1_is_a_sign_matmul():
    torch.manual_seed(0)
    src = nn.Linear(12, 4)
    lin = BinaryLinear.from_linear(src, "binary")
    with torch.no_grad():
        lin.move.bias.normal_(0, 0.1)
    x = torch.randn(3, 12)
    y = lin(x)
    alpha = float(lin.act.alpha.detach())
    signs, scale = bwn_parts(src.weight.detach())
    ref = (binary_sign(x + lin.move.bias.detach()) * alpha) @ (signs * scale).T + src.bias.detach()
    torch.testing.assert_close(y.detach(), ref)
    # the integer part really is a +-1 x +-1 product: divide out the two scales
    counts = (y.detach() - src.bias.detach()) / (alpha * float(scale))
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-4)
    assert float(counts.abs().max()) <= 12


@pytest.mark.parametrize("activations, act_type", [("int8", "LsqQuantizer"), ("none", "NoneType")])
def test_binary_linear_other_activation_modes(activations, act_type):
    lin = BinaryLinear.from_linear(nn.Linear(8, 3), activations)
    assert type(lin.act).__name__ == act_type and lin.move is None and not lin.w1a1


def test_estimator_shapes_and_what_they_add():
    torch.manual_seed(0)
    est = ResidualEstimators(hidden=16, rank=2)
    x = torch.randn(3, 7, 16)
    assert est.scores(x).shape == (3, 1, 7, 7) and est.value(x).shape == (3, 1, 7, 1)
    qp, kp, qm, km = est.q_p(x), est.k_p(x), est.q_m(x), est.k_m(x)
    ref = qm @ kp.transpose(1, 2) + qp @ km.transpose(1, 2) + qp @ kp.transpose(1, 2)
    torch.testing.assert_close(est.scores(x)[:, 0], ref)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        ResidualEstimators(16, 0)


def test_binary_attention_with_estimators_equals_the_formula():
    """S = [Qb Kb^T + estimator terms] / sqrt(d); context = Ab Vb + Ab v_p(X)."""
    torch.manual_seed(0)
    src = Attention(16, 2)
    attn = QatViTAttention(src, layer=0, quantize="binary")
    attn.estimators = ResidualEstimators(16, 1)
    x = torch.randn(2, 5, 16)
    out = attn(x)
    q, k, v = attn._split(src.qkv(x))
    qb, kb, vb = attn.q_quant(q), attn.k_quant(k), attn.v_quant(v)
    for t, b in ((q, attn.q_quant), (k, attn.k_quant), (v, attn.v_quant)):
        assert set(b(t).detach().abs().unique().tolist()) == pytest.approx([float(b.alpha.detach())])
    scores = (qb @ kb.transpose(-2, -1) + attn.estimators.scores(x)) * src.scale
    probs = attn.p_quant(scores.softmax(-1))
    assert set(probs.detach().unique().tolist()) <= {0.0, float(attn.p_quant.alpha.detach())}
    context = probs @ vb + probs @ attn.estimators.value(x)
    ref = src.proj(context.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert all(p.grad is not None for p in attn.estimators.parameters())


def test_binarize_vit_keeps_head_and_patch_conv_float_and_replays():
    from edgeprep.binary.convert import binarize_model, replay_binarize
    from edgeprep.models.vit import ViT

    torch.manual_seed(0)
    model = ViT(image_size=8, patch_size=2, dim=32, depth=2, heads=2)
    decision = binarize_model(model, "binary", estimator_rank=1)
    assert decision["head"] == "head" and "head" not in decision["linears"]
    assert len(decision["linears"]) == 2 * 4 and len(decision["attentions"]) == 2
    assert type(model.head) is nn.Linear and type(model.patch_embed.proj) is nn.Conv2d
    assert all(isinstance(model.get_submodule(n), BinaryLinear) for n in decision["linears"])
    x = torch.randn(4, 1, 8, 8)
    model.train()
    model(x)  # the first batch sets every binarizer's alpha
    model.eval()
    ref = model(x)
    rebuilt = replay_binarize(ViT(image_size=8, patch_size=2, dim=32, depth=2, heads=2), decision)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), ref)
    with pytest.raises(Exception, match="already quantized or binarized"):
        binarize_model(model)


def test_binarize_bert_binarizes_word_embeddings_and_pooler_not_positions():
    transformers = pytest.importorskip("transformers")
    from edgeprep.binary.convert import binarize_model

    cfg = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    decision = binarize_model(model, "binary", estimator_rank=1)
    assert decision["head"] == "classifier" and "bert.pooler.dense" in decision["linears"]
    assert decision["embeddings"] == ["bert.embeddings.word_embeddings"]
    assert type(model.bert.embeddings.position_embeddings) is nn.Embedding
    out = model(input_ids=torch.randint(0, 40, (2, 6)), attention_mask=torch.ones(2, 6, dtype=torch.long)).logits
    assert out.shape == (2, 3) and torch.isfinite(out).all()
