"""Hugging Face image classifiers (ViT, DeiT) from a local directory: loading, normalization,
pruning, QAT attention and PRepBN on transformers' layers, and a recipe through the CLI.

No pretrained ViT / DeiT weights exist offline, so the directories are small configs initialised
under a fixed seed and saved with ``save_pretrained`` (exactly what a user's fine-tuned model
directory holds); the recipes train them on digits first.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from conftest import error_lines, finished_run, run_cli

from edgeprep.errors import BadInputError
from edgeprep.models import load_model
from edgeprep.recipe import ModelConfig

tf = pytest.importorskip("transformers", reason="extra hf: pip install 'edgeprep[hf]'")

# 8x8 one-channel digits, patch 2 -> 16 patches + CLS (+ distillation token for DeiT)
TINY = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=3,
            num_attention_heads=4, intermediate_size=128, num_labels=10)
DEIT_MEAN, DEIT_STD = 0.45, 0.22


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save(model: torch.nn.Module, out: Path) -> Path:
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return _save(tf.ViTForImageClassification(tf.ViTConfig(**TINY)), tmp_path_factory.mktemp("hf") / "tiny-vit")


@pytest.fixture(scope="module")
def deit_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = _save(tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**TINY)),
                tmp_path_factory.mktemp("hf") / "tiny-deit")
    tf.DeiTImageProcessor(image_mean=[DEIT_MEAN], image_std=[DEIT_STD]).save_pretrained(str(out))
    return out


def _hf(path: Path) -> torch.nn.Module:
    return tf.AutoModelForImageClassification.from_pretrained(str(path), attn_implementation="eager").eval()


def pixels(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # edgeprep's [-1, 1]


# ----------------------------------------------------------------------------- loading
def test_vit_directory_loads_as_a_classifier(vit_dir):
    handle = load_model(ModelConfig(source=str(vit_dir)))
    assert (handle.input_shape, handle.num_classes, handle.data, handle.tokenizer) == ((1, 8, 8), 10, None, None)
    assert handle.module.identity  # ViT's default normalization (0.5 / 0.5) is edgeprep's pixel convention
    x = pixels()
    with torch.no_grad():
        assert torch.equal(handle.module(x), _hf(vit_dir)(pixel_values=x).logits)


def test_deit_normalization_from_preprocessor_config(deit_dir):
    module = load_model(ModelConfig(source=str(deit_dir))).module
    assert not module.identity
    x = pixels()
    hf = _hf(deit_dir)
    with torch.no_grad():
        expected = hf(pixel_values=((x + 1) / 2 - DEIT_MEAN) / DEIT_STD).logits  # what DeiTImageProcessor feeds
        got = module(x)
        assert (got - expected).abs().max().item() < 1e-5
        assert (got - hf(pixel_values=x).logits).abs().max().item() > 1e-2  # so the affine is not a no-op


def test_bad_preprocessor_config_is_one_clear_error(vit_dir, tmp_path):
    bad = tmp_path / "three-channel-mean"
    _hf(vit_dir).save_pretrained(str(bad))
    (bad / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5] * 3}))
    with pytest.raises(BadInputError, match=r"preprocessor_config.json: image_mean / image_std must have 1 values"):
        load_model(ModelConfig(source=str(bad)))
    (bad / "config.json").write_text("{not json")
    (tmp_path / "r.yaml").write_text(f"name: bad\nmodel: {{source: {bad}}}\ndata: {{source: digits}}\n"
                                     "export: [{target: onnx}]\n")
    proc = run_cli("run", "r.yaml", "--out", "run", cwd=tmp_path)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "config.json: cannot read it as JSON" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- layers
def test_head_and_neuron_pruning_equal_masked_transformers(vit_dir):
    """Removing heads equals transformers' own head_mask zeroing them; removing intermediate neurons
    equals zeroing their rows of intermediate.dense and their columns of output.dense."""
    from edgeprep.pruning.bert import is_bert_layer, prune_bert_heads, prune_bert_mlp
    from edgeprep.pruning.groups import find_groups

    model = load_model(ModelConfig(source=str(vit_dir))).module
    layers = [n for n, m in model.named_modules() if is_bert_layer(m)]
    assert layers == [f"model.vit.encoder.layer.{i}" for i in range(3)]
    groups = find_groups(model)
    assert [(g.block, g.unit, g.family) for g in groups] == [(n, u, "bert") for n in layers for u in ("heads", "mlp")]

    x = pixels()
    head_mask = torch.ones(3, 4)
    head_mask[1, [0, 2]] = 0
    reference = _hf(vit_dir)
    keep_neurons = [i for i in range(128) if i % 3]
    with torch.no_grad():
        dead = [i for i in range(128) if i not in keep_neurons]
        layer2 = reference.vit.encoder.layer[2]
        layer2.intermediate.dense.weight[dead] = 0
        layer2.intermediate.dense.bias[dead] = 0
        layer2.output.dense.weight[:, dead] = 0
        expected = reference(pixel_values=x, head_mask=head_mask).logits
        prune_bert_heads(model, layers[1], [1, 3])
        prune_bert_mlp(model, layers[2], keep_neurons)
        got = model(x)
    assert model.model.vit.encoder.layer[1].attention.attention.query.out_features == 32
    # GELU(0) = 0, so a zeroed neuron contributes nothing: equal up to float summation order
    assert (got - expected).abs().max().item() < 1e-5


def test_tapped_attention_equals_transformers_and_qat_replays(vit_dir):
    """The QAT attention module on a ViT layer: without quantizers it IS the float layer; with int8
    it swaps every attention and Linear, and the checkpoint decision rebuilds it exactly."""
    from edgeprep.quant.attention import QatHFViTSelfAttention
    from edgeprep.quant.convert import quantize_model, replay_qat, tap_model
    from edgeprep.quant.fake import forward_in_batches

    x = pixels()
    model = load_model(ModelConfig(source=str(vit_dir))).module
    with torch.no_grad():
        before = model(x)
        tap_model(model)
        assert sum(isinstance(m, QatHFViTSelfAttention) for m in model.modules()) == 3
        assert torch.equal(model(x), before)

    student = load_model(ModelConfig(source=str(vit_dir))).module
    decision = quantize_model(student, "int8", "int8")
    assert decision["attentions"] == [f"model.vit.encoder.layer.{i}.attention.attention" for i in range(3)]
    assert len(decision["linears"]) == 3 * 6 + 1  # q, k, v, out, fc1, fc2 per layer + classifier
    for m in student.modules():
        if hasattr(m, "observing"):
            m.observing = True
    forward_in_batches(student, pixels(64, seed=2), 16)
    for m in student.modules():
        if hasattr(m, "observing"):
            m.observing = False
    with torch.no_grad():
        quantized = student(x)
        rebuilt = replay_qat(load_model(ModelConfig(source=str(vit_dir))).module, decision)
        rebuilt.load_state_dict(student.state_dict())
        assert torch.equal(rebuilt(x), quantized)
    sqnr = 10 * torch.log10(before.pow(2).mean() / (quantized - before).pow(2).mean())
    assert sqnr.item() > 25  # calibrated int8 of a random-init tiny ViT, no training


def test_prepbn_plan_folds_layer_norms_into_query_key_value_and_fc1(deit_dir):
    from edgeprep.reparam.surgery import norm_plan

    plan = norm_plan(load_model(ModelConfig(source=str(deit_dir))).module)
    for i in range(3):
        layer = f"model.deit.encoder.layer.{i}"
        qkv = [f"{layer}.attention.attention.{p}" for p in ("query", "key", "value")]
        assert plan[f"{layer}.layernorm_before"] == qkv
        assert plan[f"{layer}.layernorm_after"] == [f"{layer}.intermediate.dense"]
    assert plan["model.deit.layernorm"] == []  # feeds two heads through token slices: stays an affine


# ----------------------------------------------------------------------------- recipes
def recipe(name: str, path: Path, stages: str) -> str:
    """A recipe on ``path`` trained on digits first (finetune), then ``stages``, exported to ONNX."""
    return f"""
name: {name}
seed: 0
model: {{source: {path}}}
data: {{source: digits, calibration_samples: 64}}
train: {{steps: 250, batch_size: 64, lr: 0.003, warmup_steps: 25}}
stages:
  - kind: finetune
{stages}
export:
  - target: onnx
validate:
  split: test
  profile: {{warmup: 3, iters: 10, threads: 1, batch: 1}}
"""


VIT_STAGES = """  - {kind: prune, pruning_ratio: 0.3, train: {steps: 90}}
  - {kind: qat, weights: int8, activations: int8, intervention: gradual, steps: 90,
     train: {lr: 0.0003, warmup_steps: 10}}"""


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, vit_dir) -> Path:
    return finished_run(tmp_path_factory, "hf-vit", recipe("hf-vit", vit_dir, VIT_STAGES))


def test_vit_recipe_prunes_quantizes_and_matches_on_onnxruntime(vit_run):
    report = json.loads((vit_run / "run" / "report.json").read_text())
    assert report["baseline"]["metric"]["value"] >= 0.9  # the finetune stage trained it on digits
    prune = next(s for s in report["stages"] if s["kind"] == "prune")["details"]["pruning"]
    assert abs(prune["removed"]["params"] - 0.3) <= 0.03
    assert {entry["block"] for entry in prune["layers"]} == {f"model.vit.encoder.layer.{i}" for i in range(3)}
    qat_metric = next(s for s in report["stages"] if s["kind"] == "qat")["metric"]["value"]
    (art,) = [a for a in report["artifacts"] if a["name"] == "onnx"]
    assert art["parity"]["top1_agreement"] >= 0.99 and art["parity"]["sqnr_db"] >= 30
    samples = art["metric"]["samples"]
    assert abs(art["metric"]["value"] - qat_metric) <= 2 / samples  # the runtime keeps the QAT accuracy
    assert art["metric"]["value"] >= 0.8
    assert art["precision"]["low_precision_op_fraction"] >= 0.9  # all but the patch-embedding Conv
    assert art["info"]["quantization"]["quantized_linears"] == 3 * 6 + 1
    graph = onnx.load(str(vit_run / "run" / "artifacts" / "onnx" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["pixel_values"]


def test_pruned_deit_folds_prepbn_and_lowers_to_executorch_xnnpack(deit_dir, tmp_path):
    """A head-pruned DeiT (normalization affine, distillation token and head) with PRepBN at lam 0:
    the folded model has no norm left, equals the PRepBN model, and lowers to XNNPACK with every
    LayerNorm gone from the portable-kernel side."""
    pytest.importorskip("executorch", reason="extra executorch: pip install 'edgeprep[executorch]'")
    from edgeprep.exporters.executorch import ExecuTorchExporter, ExecuTorchOptions, ExecuTorchRuntime
    from edgeprep.pruning.bert import prune_bert_heads
    from edgeprep.reparam.fold import export_form
    from edgeprep.reparam.norms import PRepBN
    from edgeprep.reparam.surgery import reparam_model

    model = load_model(ModelConfig(source=str(deit_dir))).module
    prune_bert_heads(model, "model.deit.encoder.layer.0", [0, 3])
    reparam_model(model, "prepbn", "keep", 0, 0)  # lam = 0 at once: the folded form exists
    model.train()
    with torch.no_grad():
        for seed in range(4):  # BatchNorm running statistics from a few batches
            model(pixels(32, seed=10 + seed))
    model.eval()
    x = pixels(1)
    folded = export_form(model, (x,))
    assert not [m for m in folded.modules() if isinstance(m, (torch.nn.LayerNorm, PRepBN))]
    assert sum(isinstance(m, PRepBN) for m in model.modules()) == 3 * 2 + 1
    with torch.no_grad():
        expected = model(x)
        assert (folded(x) - expected).abs().max().item() < 1e-4
    artifact = ExecuTorchExporter().export(folded, (x,), tmp_path / "et", ExecuTorchOptions())
    outside = artifact.info["xnnpack"]["ops_outside_delegates"]
    # the matmuls, the patch Conv and the softmax run in XNNPACK; the token expands and the CLS /
    # distillation selects stay on portable kernels, and with PRepBN folded no LayerNorm does
    assert "native_layer_norm" not in outside, outside
    assert not [op for op in outside if any(k in op for k in ("linear", "mm", "conv", "softmax", "gelu"))], outside
    got = ExecuTorchRuntime().load(artifact, threads=1).run([x.numpy()])[0]
    assert float(abs(got - expected.numpy()).max()) < 1e-4
