"""Text data for sentence-embedding models: the offline corpus, tokenized, with teacher targets.

A sentence encoder has no labels offline, so its task is ``embedding``: the target of each
sentence is the embedding the ORIGINAL fp32 model gives it (computed once, here, before any
stage). The metric is the mean cosine to those targets (``edgeprep.measure.metrics``), training
pulls the student's embeddings towards them (``edgeprep.train``), and a runtime's outputs are
judged against them the same way.

Inputs are packed (``edgeprep.models.hf.PackedTokens``): x is int64 [N, 2, seq_len] holding
input_ids and attention_mask. Splits are by position in the hash-ordered corpus (test first, then
val, then train), so test sentences never appear in training.
"""
from __future__ import annotations

import hashlib

import torch

from edgeprep.data import DataBundle, Split, _round_half_up
from edgeprep.errors import BadInputError
from edgeprep.recipe import DataConfig

TEXT_SOURCES = ("docstrings",)
DEFAULT_SEQ_LEN = 128
TARGET_BATCH = 128


def sentences_of(source: str) -> tuple[str, ...]:
    if source == "docstrings":
        from edgeprep.text_corpus import stdlib_sentences

        return stdlib_sentences()
    raise BadInputError(f"unknown text source {source!r}; valid: {', '.join(TEXT_SOURCES)}")


def load_text_data(cfg: DataConfig, handle) -> DataBundle:
    """``cfg.source`` tokenized with ``handle.tokenizer``; y = ``handle.module``'s embeddings."""
    from edgeprep.models.hf import pack, tokenize, trim_padding

    if handle.tokenizer is None:
        raise BadInputError(f"data source {cfg.source!r} is text and needs a text model with a tokenizer; "
                            f"model {handle.name} has none (use a Hugging Face model directory or minilm-l6)")
    if cfg.image_size is not None:
        raise BadInputError(f"data.image_size applies to image folders only, not to text {cfg.source!r}; remove it")
    seq_len = cfg.seq_len or DEFAULT_SEQ_LEN
    texts = sentences_of(cfg.source)
    n = len(texts)
    n_test = max(1, _round_half_up(n * cfg.test_fraction))
    n_val = _round_half_up(n * cfg.val_fraction)
    ids, mask = tokenize(handle.tokenizer, texts, seq_len)
    x = pack(ids, mask)
    # the split seed permutes the hash order; split_seed 0 keeps it (test = the first n_test hashes)
    order = torch.arange(n) if cfg.split_seed == 0 else \
        torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    x = x[order]
    y = _targets(handle.module, x)
    parts = [Split(x[a:b].contiguous(), y[a:b].contiguous(), trim=trim_padding)
             for a, b in ((n_test + n_val, n), (n_test, n_test + n_val), (0, n_test))]
    train = parts[0]
    k = min(cfg.calibration_samples, len(train))
    calib_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.split_seed + 1))[:k]
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    return DataBundle(name=f"{cfg.source}@{seq_len} ({n} sentences, sha256 {digest})", task="embedding",
                      num_classes=0, input_shape=tuple(x.shape[1:]), train=train, val=parts[1], test=parts[2],
                      calib=train.x[calib_idx].contiguous())


@torch.no_grad()
def _targets(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = [model(x[i:i + TARGET_BATCH]).float() for i in range(0, len(x), TARGET_BATCH)]
    return torch.cat(out).contiguous()
