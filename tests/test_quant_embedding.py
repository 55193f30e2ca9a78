"""Per-row int8 embeddings (qat ``embeddings: int8``): the grid, training, replay and the ONNX form."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from conftest import tiny_bert_classifier
from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.quant.convert import quantize_model, replay_qat
from edgeprep.quant.embedding import QuantEmbedding
from edgeprep.stages.qat import calibrate

transformers = pytest.importorskip("transformers")


def _table() -> nn.Embedding:
    torch.manual_seed(0)
    emb = nn.Embedding(40, 16)
    with torch.no_grad():
        emb.weight[7] *= 50  # one row far larger than the rest: a per-tensor scale would crush the others
        emb.weight[3] = 0  # an all-zero row must stay exactly zero
    return emb


def test_per_row_grid_is_exact_and_trains_through_the_rounding():
    emb = _table()
    q = QuantEmbedding.from_embedding(emb)
    codes, scales = q.integer_weight()
    assert codes.dtype == torch.int8 and scales.shape == (40,)
    assert torch.equal(codes.float() * scales[:, None], q.quantized_weight().detach())
    nonzero = [r for r in range(40) if r != 3]
    assert codes[nonzero].abs().amax(dim=1).eq(127).all()  # every row spans its own full range
    assert codes[3].eq(0).all() and q.quantized_weight()[3].eq(0).all()
    # error per element at most half a step of that row's own scale (the large row 7 does not widen row 0's)
    err = (q.quantized_weight() - emb.weight).abs().detach()
    assert bool((err <= scales[:, None] / 2 + 1e-7).all())
    assert float(scales[0]) < float(scales[7]) / 20
    ids = torch.tensor([[0, 7, 3], [5, 5, 39]])
    out = q(ids)
    assert torch.equal(out, nn.functional.embedding(ids, q.quantized_weight()))
    out.sum().backward()  # straight-through: each looked-up row gets its count as gradient
    assert q.weight.grad[5].eq(2).all() and q.weight.grad[1].eq(0).all()


def _bert():
    return tiny_bert_classifier(vocab_size=300)


class _Logits(nn.Module):
    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids).logits


def test_int8_embeddings_replay_and_export_as_an_int8_gather(tmp_path):
    from edgeprep.exporters import get_exporter
    from edgeprep.exporters.onnx import OnnxOptions

    ids = torch.randint(0, 300, (6, 12), generator=torch.Generator().manual_seed(0))
    model = _Logits(_bert())
    decision = quantize_model(model, "int8", "int8", embeddings="int8")
    tables = [f"bert.bert.embeddings.{n}_embeddings" for n in ("word", "position", "token_type")]
    assert decision["embeddings"] == tables
    calibrate(model, ids)
    rebuilt = replay_qat(_Logits(_bert()), decision)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        expected = model(ids)
        assert torch.equal(rebuilt(ids), expected)

    exporter = get_exporter("onnx")
    artifact = exporter.export(model, (ids,), tmp_path / "int8", OnnxOptions())
    summary = artifact.info["quantization"]
    # 3 tables; q k v o fc1 fc2 per layer + pooler + classifier; their inputs + Q K V probs per layer
    counts = (summary["int8_embeddings"], summary["quantized_linears"], summary["activation_quantizers"])
    assert counts == (3, 2 * 6 + 2, 2 * (6 + 4) + 2)
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    tables = {i.name: (i.data_type, list(i.dims)) for i in graph.initializer if list(i.dims) == [300, 32]}
    assert list(tables.values()) == [(onnx.TensorProto.INT8, [300, 32])]  # no fp32 copy of the table left

    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp_path / "int8" / "model.onnx")).run(None, {"ids": ids.numpy()})[0]
    assert np.abs(got - expected.numpy()).max() < 1e-4

    plain = _Logits(_bert())
    quantize_model(plain, "int8", "int8")
    calibrate(plain, ids)
    exporter.export(plain, (ids,), tmp_path / "float", OnnxOptions())

    def weight_bytes(name: str) -> int:
        graph = onnx.load(str(tmp_path / name / "model.onnx")).graph
        return sum(onnx.numpy_helper.to_array(i).nbytes for i in graph.initializer)

    # the word table: 4 -> 1 byte per entry, plus one fp32 scale per row
    assert weight_bytes("float") - weight_bytes("int8") >= 300 * 32 * 3 - 300 * 4


def test_int8_embeddings_need_an_embedding():
    with pytest.raises(BadInputError, match="has no nn.Embedding"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int8", "int8", embeddings="int8")
    with pytest.raises(BadInputError, match="embeddings 'int4' is not one of float, int8"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int8", "int8", embeddings="int4")
