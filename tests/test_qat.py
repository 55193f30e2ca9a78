"""QAT with Teacher Intervention: quantized modules, taps and intervention, schedule, export numerics."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgeprep.errors import BadInputError
from edgeprep.models.vit import ViT
from edgeprep.quant.convert import attention_sites, quantize_model, replay_qat, tap_model
from edgeprep.quant.export import exporting
from edgeprep.quant.fake import LsqQuantizer
from edgeprep.quant.intervention import InterventionSchedule, TeacherInterventionModel
from edgeprep.quant.linear import QuantLinear
from edgeprep.quant.onnx_passes import weight_only_bits
from edgeprep.stages.qat import calibrate


def _vit(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(image_size=8, patch_size=2, dim=32, depth=2, heads=2, mlp_ratio=2.0).eval()


def _x(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- schedule
def test_gradual_schedule_switches_at_s_over_6_and_s_over_3():
    sched = InterventionSchedule("gradual", 60)
    modes = [sched.mode(t) for t in range(80)]
    assert modes[:10] == ["o"] * 10  # steps < s/6 = 10
    assert modes[10:20] == ["c"] * 10  # steps < s/3 = 20
    assert modes[20:60] == ["m"] * 40
    assert modes[60:] == [None] * 20  # step 2: plain KD-QAT
    assert [InterventionSchedule("c", 5).mode(t) for t in (0, 4, 5)] == ["c", "c", None]
    assert InterventionSchedule("none", 0).mode(0) is None
    with pytest.raises(BadInputError):
        InterventionSchedule("x", 3)


# ----------------------------------------------------------------------------- weights
def test_ternary_linear_uses_three_values_and_exports_the_same_weights():
    lin = torch.nn.Linear(64, 16)
    q = QuantLinear.from_linear(lin, weights="ternary", activations="none")
    w = q.quantized_weight().detach()
    a = lin.weight.detach().abs()
    delta = 0.7 * a.mean()
    alpha = a[a > delta].mean()
    assert torch.allclose(torch.unique(w.abs()), torch.stack([torch.tensor(0.0), alpha]))
    assert torch.equal(w != 0, a > delta)  # TWN threshold
    codes, scales = q.integer_weight()
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(codes.float() * scales[:, None], w)


@pytest.mark.parametrize("mode,qmax", [("int8", 127), ("int4", 7)])
def test_integer_weights_times_scales_equal_the_fake_quant_weights(mode, qmax):
    torch.manual_seed(0)
    q = QuantLinear.from_linear(torch.nn.Linear(48, 24), weights=mode, activations="none")
    codes, scales = q.integer_weight()
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == qmax  # max|w| lands on qmax per row
    assert torch.equal(codes.float() * scales[:, None], q.quantized_weight().detach())


def test_quantize_model_swaps_every_linear_and_attention_and_replays():
    model = _vit()
    decision = quantize_model(model, "int8", "int8")
    linears = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert sorted(linears) == sorted(decision["linears"]) and len(linears) == 2 * 4 + 1  # qkv, proj, fc1, fc2 + head
    assert len(decision["attentions"]) == 2
    assert sum(isinstance(m, LsqQuantizer) for m in model.modules()) == len(linears) + 2 * 4  # + Q, K, V, probs
    calibrate(model, _x(16))
    rebuilt = replay_qat(_vit(seed=5), decision)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(_x()), model.eval()(_x()))
    with pytest.raises(BadInputError, match="no nn.Linear"):
        quantize_model(_vit(), "int8", "int8", targets=["nothing.here"])


def test_calibration_sets_max_abs_scales_and_quantization_changes_the_output_a_little():
    model = _vit()
    ref = model(_x()).detach()
    quantize_model(model, "int8", "int8")
    x = _x(16)
    assert calibrate(model, x) == sum(isinstance(m, LsqQuantizer) for m in model.modules())
    first = model.blocks[0].attn.qkv.act  # input of the first qkv: norm1(tokens)
    with torch.no_grad():
        tokens = model.blocks[0].norm1(torch.cat([model.cls_token.expand(16, -1, -1), model.patch_embed(x)], 1)
                                       + model.pos_embed)
    assert first.step_size() == pytest.approx(float(tokens.abs().max()) / 127, rel=1e-5)
    with torch.no_grad():
        out = model(_x())
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())
    assert 20 < sqnr < 80  # int8 noise is there, and small (measured ~35 dB)


# ----------------------------------------------------------------------------- intervention
def _pair(perturb: str):
    """(teacher, student) ViTs with tapped attention and no quantization; the student's ``perturb``
    weights scrambled so only an intervention can make its output equal the teacher's."""
    teacher = _vit()
    student = copy.deepcopy(teacher)
    tap_model(teacher)
    tap_model(student)
    with torch.no_grad():
        for block in student.blocks:
            qkv = block.attn.qkv.weight
            d = qkv.shape[1]
            if perturb in ("qk", "qkv", "attn"):
                qkv[:2 * d] = torch.randn_like(qkv[:2 * d])
            if perturb in ("qkv", "attn"):
                qkv[2 * d:] = torch.randn_like(qkv[2 * d:])
            if perturb == "attn":
                block.attn.proj.weight.normal_()
    return teacher, student


@pytest.mark.parametrize("mode,perturb", [("m", "none"), ("m", "qk"), ("c", "qkv"), ("o", "attn")])
def test_intervention_hands_the_student_the_teachers_tensor(mode, perturb):
    teacher, student = _pair(perturb)
    x = _x()
    with torch.no_grad():
        want = teacher(x)
    wrapper = TeacherInterventionModel(student, teacher, InterventionSchedule(mode, 10)).train()
    out = wrapper(x)
    assert torch.allclose(out, want, atol=1e-6, rtol=0)  # only the replaced tensor differed
    if perturb != "none":
        wrapper.step = 10  # past step 1: no intervention, the scrambled weights show
        assert not torch.allclose(wrapper(x), want, atol=1e-3)
    wrapper.close()


def test_under_intervention_q_and_k_inputs_are_detached():
    teacher, student = _pair("none")
    wrapper = TeacherInterventionModel(student, teacher, InterventionSchedule("m", 10)).train()
    wrapper(_x())
    score_loss = wrapper.losses(torch.zeros(6, 10), {"logits": 0, "hidden": 0, "attn_out": 0})["ti_scores"]
    # An exact copy has zero score loss; scramble Q/K through a second student to get a gradient.
    teacher, student = _pair("qk")
    wrapper = TeacherInterventionModel(student, teacher, InterventionSchedule("m", 10)).train()
    wrapper(_x())
    loss = wrapper.losses(torch.zeros(6, 10), {"logits": 0, "hidden": 0, "attn_out": 0})["ti_scores"]
    assert float(score_loss) == 0.0 and float(loss) > 0
    loss.backward()
    assert student.blocks[1].attn.qkv.weight.grad.abs().sum() > 0  # Q/K weights learn from the score loss
    assert student.patch_embed.proj.weight.grad is None  # ... without pushing it into earlier layers
    assert student.blocks[0].mlp.fc1.weight.grad is None
    wrapper.close()


def test_losses_cover_logits_scores_hidden_and_attention_outputs():
    teacher = _vit()
    student = copy.deepcopy(teacher)
    tap_model(teacher)
    quantize_model(student, "int8", "int8")
    calibrate(student, _x(16))
    wrapper = TeacherInterventionModel(student, teacher, InterventionSchedule("none", 0)).train()
    logits = wrapper(_x())
    terms = wrapper.losses(logits)
    assert set(terms) == {"ti_logits", "ti_scores", "ti_hidden", "ti_attn_out"}
    assert len(wrapper._hidden["student"]) == 1 + 2  # embeddings + each block
    assert all(float(v) > 0 for v in terms.values())  # quantization noise shows in every term
    wrapper.eval()
    with torch.no_grad():
        assert torch.equal(wrapper(_x()), student.eval()(_x()))  # eval: the student alone
    wrapper.close()
    assert all(getattr(m, "taps", None) is None for m in student.modules())


# ----------------------------------------------------------------------------- BERT
transformers = pytest.importorskip("transformers")


def _bert(attn: str):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=3,
                                  attn_implementation=attn, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_tapped_attention_matches_transformers_and_intervenes(attn):
    model = _bert(attn)
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 8:] = 0  # padding must be masked the same way
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    teacher = copy.deepcopy(model)
    tap_model(teacher)
    assert [s.family for s in attention_sites(teacher)] == ["bert", "bert"]
    with torch.no_grad():
        assert torch.allclose(teacher(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5)
    student = copy.deepcopy(model)
    tap_model(student)
    with torch.no_grad():
        for layer in student.bert.encoder.layer:
            layer.attention.self.query.weight.normal_()
            layer.attention.self.key.weight.normal_()
    wrapper = TeacherInterventionModel(student, teacher, InterventionSchedule("m", 5)).train()
    out = wrapper(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(out, want, atol=1e-5)
    assert set(wrapper.losses(out)) == {"ti_logits", "ti_scores", "ti_hidden", "ti_attn_out"}
    assert len(wrapper._hidden["student"]) == 3
    wrapper.close()


def test_bert_quantizes_and_exports_integer_matmuls(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _bert("eager")
    quantize_model(model, "int8", "int8")
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    calibrate(model, ids)
    with torch.no_grad():  # as training leaves them: query/key/value input scales no longer equal
        for layer in model.bert.encoder.layer:
            layer.attention.self.key.act.scale.mul_(1.01)
            layer.attention.self.value.act.scale.mul_(1.02)
        ref = model(input_ids=ids).logits.numpy()
    with exporting(model):
        program = torch.onnx.export(model, (ids,), dynamo=True, opset_version=18,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(str(tmp_path / "m.onnx"))
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    assert np.abs(out - ref).max() < 5e-3  # measured ~1e-4: integer kernels, the same integers
    import onnx

    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    # per layer: query, key, value, attention dense, intermediate, output (QGemm) + the two attention
    # matmuls; then the pooler and the classifier (QGemm)
    assert ops.count("QGemm") == 2 * 6 + 2
    assert ops.count("MatMulIntegerToFloat") + ops.count("QLinearMatMul") == 2 * 2
    assert not {"MatMul", "Gemm", "FusedMatMul", "FusedGemm"} & set(ops)


def test_only_weight_only_narrow_linears_go_to_nbits():
    model = _vit()
    quantize_model(model, "ternary", "none")
    bits = weight_only_bits(model)
    assert set(bits.values()) == {2} and "blocks.0.attn.qkv.qweight" in bits and len(bits) == 9
    model = _vit()
    quantize_model(model, "ternary", "int8")  # int8 activations: the codes stay on the int8 kernels
    assert weight_only_bits(model) == {}
