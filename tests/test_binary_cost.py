"""BiPFT / BiT cost accounting on a randomly initialised bert-base config at 128 tokens.

Papers: 22.5 GFLOPs and 418 MB in full precision; W1A1 about 0.4 G (~56x) and ~15 MB (~28x).
Our convention (edgeprep.binary.cost) counts matmul work only: the full-precision FLOPs and both
memory figures land within 5% of the papers'; the W1A1 FLOPs come out 0.367 G (61x), 8% under the
papers' rounded 0.4 G, which evidently also counts some element-wise work (see BENCHMARKS.md).
"""
from __future__ import annotations

import pytest
import torch

from edgeprep.binary.convert import binarize_model
from edgeprep.binary.cost import count_ops, model_bytes

MIB = 2 ** 20


@pytest.fixture(scope="module")
def bert_base():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig()).eval()  # bert-base defaults
    example = {"input_ids": torch.randint(0, 30522, (1, 128)), "attention_mask": torch.ones(1, 128, dtype=torch.long)}
    fp_ops, fp_bytes = count_ops(model, example), model_bytes(model)
    binarize_model(model, "binary", estimator_rank=1)
    model.train()(**example)  # sets the binarizers' scales
    return fp_ops, fp_bytes, count_ops(model.eval(), example), model_bytes(model)


def test_full_precision_bert_base_matches_the_papers(bert_base):
    fp_ops, fp_bytes, _, _ = bert_base
    assert fp_ops["binary_macs"] == 0
    assert fp_ops["flops"] / 1e9 == pytest.approx(22.5, rel=0.05)
    assert fp_bytes["total_bytes"] / MIB == pytest.approx(418, rel=0.05)


def test_w1a1_bert_base_memory_matches_and_flops_follow_the_convention(bert_base):
    fp_ops, fp_bytes, ops, size = bert_base
    assert size["total_bytes"] / MIB == pytest.approx(15, rel=0.05)
    assert fp_bytes["total_bytes"] / size["total_bytes"] == pytest.approx(28, rel=0.05)
    # every encoder matmul is binary; what stays float is the classifier (768 x 2) and the estimators
    tokens, hidden, layers, heads = 128, 768, 12, 12
    encoder = layers * (tokens * (4 * hidden * hidden + 2 * hidden * 3072) + 2 * tokens * tokens * hidden)
    pooler = hidden * hidden  # binarized too: one token
    assert ops["binary_macs"] == encoder + pooler
    estimators = layers * (tokens * hidden * 5 + 3 * tokens * tokens + heads * tokens * tokens)
    assert ops["fp_macs"] == estimators + hidden * 2
    assert ops["flops"] / 1e9 == pytest.approx(0.367, abs=0.001)
    assert fp_ops["flops"] / ops["flops"] == pytest.approx(60.9, abs=0.1)
