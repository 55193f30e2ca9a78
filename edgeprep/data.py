"""Datasets for classification: built-in digits (8x8 and 32x32), ``.npz`` files, image folders.

Every source ends up as one ``DataBundle`` with deterministic train / val / test splits and a
calibration subset. Splits come from ``stratified_order``: a seeded permutation in which every
prefix holds each class in about its overall proportion, so taking the first ``n_test`` rows as
test and the next ``n_val`` as val gives exact split sizes *and* class-balanced splits, and any
prefix of a split (e.g. ``validate.max_samples``) is balanced too.

Bad input is always a one-line ``BadInputError`` naming what is wrong, where, and the fix.
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from edgeprep.errors import BadInputError
from edgeprep.recipe import DataConfig

BUILTIN_SOURCES = ("digits", "digits32")
SPLIT_NAMES = ("train", "val", "test")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".pgm", ".ppm", ".pbm"})
# PIL modes whose pixels carry one intensity channel.
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
_PRESPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


@dataclass
class Split:
    x: torch.Tensor  # float32 [N, *input_shape] (text: int64 [N, 2, seq], see edgeprep.text_data)
    y: torch.Tensor  # int64 [N] class labels (task "embedding": float32 [N, dim] teacher embeddings)
    # applied by the train loop to each training batch of x (text: drop all-padding columns)
    trim: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DataBundle:
    name: str
    task: str  # "classification" | "embedding" (edgeprep.text_data)
    num_classes: int
    input_shape: tuple[int, ...]  # per sample, e.g. (1, 8, 8)
    train: Split
    val: Split
    test: Split
    calib: torch.Tensor  # x only: calibration rows taken from train (seeded, class-stratified)

    def split(self, name: str) -> Split:
        if name not in SPLIT_NAMES:
            raise BadInputError(f"unknown data split {name!r}; valid splits: {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)


# ----------------------------------------------------------------------------- public entry point
def load_data(cfg: DataConfig, base_dir: Path | None = None, default_source: str | None = None) -> DataBundle:
    """Load ``cfg.source``; relative paths are resolved against ``base_dir`` (the recipe's folder).

    ``default_source`` stands in for an unset ``cfg.source``: the model's own data set
    (``ModelHandle.data``, e.g. "digits32" for vit-bench).
    """
    source = cfg.source if cfg.source is not None else default_source
    if source is None:
        raise BadInputError("data.source is not set and the model has no default data set; set data.source "
                            "to 'digits', 'digits32', a .npz file or an image folder")
    if source != cfg.source:
        cfg = cfg.model_copy(update={"source": source})
    if source in BUILTIN_SOURCES:
        if cfg.image_size is not None:
            raise BadInputError(f"data.image_size applies to image folders only, not to {source!r}; "
                                "remove it (use 'digits32' for 32x32 digits)")
        x, y = _digits(upsample_to=32 if source == "digits32" else None)
        return _bundle(source, x, y, cfg)

    path = Path(source).expanduser()
    if not path.is_absolute():
        path = (Path(base_dir) if base_dir is not None else Path.cwd()) / path
    if not path.exists():
        raise BadInputError(f"data source {cfg.source!r}: nothing at {path}; use 'digits', 'digits32', "
                            "a .npz file (x, y) or an image folder (one subfolder per class)")
    if path.is_dir():
        x, y = _image_folder(path, cfg.image_size)
        return _bundle(str(cfg.source), x, y, cfg)
    if cfg.image_size is not None:
        raise BadInputError(f"{path}: data.image_size applies to image folders only; remove it")
    if path.suffix.lower() == ".npz":
        return _npz(path, cfg)
    raise BadInputError(f"{path}: unsupported data file type {path.suffix or '(no suffix)'!r}; "
                        "use a .npz file with arrays x and y, or an image folder")


# ----------------------------------------------------------------------------- splitting
def stratified_order(y: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(len(y))`` whose every prefix is about class-balanced.

    Each sample gets the key ``(rank within its class + 0.5) / class size`` under a seeded shuffle;
    sorting by key interleaves the classes in proportion. Ties (equal class sizes) are broken by
    the shuffle itself, so the result depends only on ``y`` and ``seed`` (identical across processes).
    """
    n = len(y)
    perm = np.random.default_rng(seed).permutation(n)
    keys = np.empty(n, dtype=np.float64)
    y_perm = y[perm]
    for c in np.unique(y):
        pos = np.flatnonzero(y_perm == c)
        keys[perm[pos]] = (np.arange(len(pos), dtype=np.float64) + 0.5) / len(pos)
    shuffle_rank = np.empty(n, dtype=np.int64)
    shuffle_rank[perm] = np.arange(n)
    return np.lexsort((shuffle_rank, keys))  # last key is primary


def _round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def _split_indices(y: np.ndarray, cfg: DataConfig, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(y)
    n_test = max(1, _round_half_up(n * cfg.test_fraction))
    n_val = _round_half_up(n * cfg.val_fraction)
    if n - n_test - n_val < 1:
        raise BadInputError(f"{where}: {n} samples are too few for test_fraction={cfg.test_fraction} and "
                            f"val_fraction={cfg.val_fraction}; add samples or lower the fractions")
    order = stratified_order(y, cfg.split_seed)
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


def _bundle(name: str, x: torch.Tensor, y: np.ndarray, cfg: DataConfig) -> DataBundle:
    train_i, val_i, test_i = _split_indices(y, cfg, name)
    yt = torch.from_numpy(y.astype(np.int64))
    pick = lambda idx: Split(x[torch.from_numpy(idx)].contiguous(), yt[torch.from_numpy(idx)].contiguous())  # noqa: E731
    return _assemble(name, pick(train_i), pick(val_i), pick(test_i), int(y.max()) + 1, cfg)


def _assemble(name: str, train: Split, val: Split, test: Split, num_classes: int, cfg: DataConfig) -> DataBundle:
    # A different seed stream from the split so the calibration rows are not simply train's prefix.
    k = min(cfg.calibration_samples, len(train))  # a small dataset calibrates on all of train
    calib_idx = stratified_order(train.y.numpy(), cfg.split_seed + 1)[:k]
    calib = train.x[torch.from_numpy(calib_idx)].contiguous()
    return DataBundle(name=name, task="classification", num_classes=num_classes,
                      input_shape=tuple(train.x.shape[1:]), train=train, val=val, test=test, calib=calib)


def _normalize_unit(x01: torch.Tensor) -> torch.Tensor:
    """Fixed normalisation of [0, 1] pixels to [-1, 1]: deterministic, no dataset statistics."""
    return (x01 - 0.5) / 0.5


# ----------------------------------------------------------------------------- digits
def _digits(upsample_to: int | None) -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no network

    d = load_digits()
    x01 = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [1797, 1, 8, 8]
    if upsample_to is not None:
        x01 = torch.nn.functional.interpolate(x01, size=(upsample_to, upsample_to), mode="bilinear",
                                              align_corners=False)
    return _normalize_unit(x01).contiguous(), d.target.astype(np.int64)


# ----------------------------------------------------------------------------- .npz
def _npz(path: Path, cfg: DataConfig) -> DataBundle:
    try:
        # allow_pickle=False: an object array in the file must not run code on load.
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            arrays = {k: z[k] for k in z.files}
    except BadInputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        raise BadInputError(f"{path}: cannot read as .npz ({type(exc).__name__}: {exc}); "
                            "write it with numpy.savez(path, x=..., y=...)") from None

    if any(k in arrays for k in _PRESPLIT_KEYS):
        return _npz_presplit(path, arrays, cfg)
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise BadInputError(f"{path}: .npz has no array {' or '.join(map(repr, missing))} (found: "
                            f"{', '.join(sorted(arrays)) or 'nothing'}); save it with numpy.savez(path, x=..., y=...)")
    x = _x_to_tensor(arrays["x"], path, "x")
    y = _check_labels(arrays["y"], len(x), path, "y")
    return _bundle(str(cfg.source), x, y, cfg)


def _npz_presplit(path: Path, arrays: dict[str, np.ndarray], cfg: DataConfig) -> DataBundle:
    """Use the file's own x_train/y_train, x_test/y_test (and x_val/y_val, else carved from train)."""
    for part in ("train", "val", "test"):
        have = [k for k in (f"x_{part}", f"y_{part}") if k in arrays]
        if len(have) == 1:
            other = f"y_{part}" if have[0].startswith("x") else f"x_{part}"
            raise BadInputError(f"{path}: .npz has {have[0]} but no {other}; store both or neither")
    for part in ("train", "test"):
        if f"x_{part}" not in arrays:
            raise BadInputError(f"{path}: a pre-split .npz needs x_{part}/y_{part} (found: "
                                f"{', '.join(sorted(arrays))}); add them or store plain x and y")
    splits: dict[str, Split] = {}
    for part in ("train", "val", "test"):
        if f"x_{part}" in arrays:
            x = _x_to_tensor(arrays[f"x_{part}"], path, f"x_{part}")
            y = _check_labels(arrays[f"y_{part}"], len(x), path, f"y_{part}")
            splits[part] = Split(x, torch.from_numpy(y))
    shapes = {p: tuple(s.x.shape[1:]) for p, s in splits.items()}
    if len(set(shapes.values())) > 1:
        raise BadInputError(f"{path}: per-sample shapes differ between splits ({shapes}); store one shape")
    if "val" not in splits:  # carve val out of train with the recipe's val_fraction
        tr = splits["train"]
        n_val = _round_half_up(len(tr) * cfg.val_fraction)
        if len(tr) - n_val < 1:
            raise BadInputError(f"{path}: x_train has too few rows to carve val_fraction={cfg.val_fraction}")
        order = torch.from_numpy(stratified_order(tr.y.numpy(), cfg.split_seed))
        splits["val"] = Split(tr.x[order[:n_val]].contiguous(), tr.y[order[:n_val]].contiguous())
        splits["train"] = Split(tr.x[order[n_val:]].contiguous(), tr.y[order[n_val:]].contiguous())
    num_classes = max(int(s.y.max()) + 1 for s in splits.values() if len(s))
    return _assemble(str(cfg.source), splits["train"], splits["val"], splits["test"], num_classes, cfg)


def _x_to_tensor(x: np.ndarray, path: Path, key: str) -> torch.Tensor:
    """float arrays are used as given (already preprocessed); uint8 images are scaled like digits."""
    if x.ndim < 2 or x.shape[0] == 0:
        raise BadInputError(f"{path}: array {key} has shape {x.shape}; it must be [N, ...] with N >= 1")
    if x.dtype == np.uint8:
        if x.ndim == 3:  # [N, H, W] grayscale
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # NHWC images -> NCHW
        return _normalize_unit(torch.from_numpy(x.astype(np.float32) / 255.0)).contiguous()
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise BadInputError(f"{path}: array {key} contains NaN or inf; clean the data first")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    raise BadInputError(f"{path}: array {key} has dtype {x.dtype}; use float (preprocessed) or uint8 (images)")


def _check_labels(y: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise BadInputError(f"{path}: labels {key} have dtype {y.dtype}; store integer class indices 0..C-1 "
                            f"(e.g. {key}.astype('int64'))")
    if y.ndim != 1:
        raise BadInputError(f"{path}: labels {key} have shape {y.shape}; they must be 1-D [N]")
    if len(y) != n:
        raise BadInputError(f"{path}: {len(y)} labels in {key} but {n} samples in x{key[1:]}; "
                            "store one label per sample")
    if n and int(y.min()) < 0:
        raise BadInputError(f"{path}: labels {key} contain {int(y.min())}; class indices must be 0..C-1")
    return y.astype(np.int64)


# ----------------------------------------------------------------------------- image folder
def _image_folder(root: Path, image_size: list[int] | None) -> tuple[torch.Tensor, np.ndarray]:
    from PIL import Image

    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        raise BadInputError(f"data.image_size is {image_size}; give [height, width] in pixels, both >= 1")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise BadInputError(f"{root}: image folder has no class subfolders; put each class's images "
                            "in its own subfolder (root/<class>/<image>.png)")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not found:
            raise BadInputError(f"{root / name}: class folder has no images "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder")
        files += [(p, label) for p in found]

    images = []
    for p, _ in files:
        try:
            with Image.open(p) as im:
                im.load()
                images.append(im.copy())
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise BadInputError(f"{p}: cannot decode image ({type(exc).__name__}: {exc}); "
                                "replace or remove the file") from None

    gray = all(im.mode in _GRAY_MODES for im in images)
    if image_size is None:
        sizes = {im.size for im in images}  # PIL sizes are (width, height)
        if len(sizes) > 1:
            (w0, h0), (w1, h1) = sorted(sizes)[:2]
            first = next(p for (p, _), im in zip(files, images) if im.size == (w0, h0))
            other = next(p for (p, _), im in zip(files, images) if im.size == (w1, h1))
            raise BadInputError(f"{root}: images have different sizes ({first.name} is {h0}x{w0}, "
                                f"{other.name} is {h1}x{w1}); set data.image_size: [H, W] to resize them")
    arrays = []
    for im in images:
        im = im.convert("L" if gray else "RGB")
        if image_size is not None:
            im = im.resize((image_size[1], image_size[0]), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[None] if gray else a.transpose(2, 0, 1))  # -> [C, H, W]
    x01 = torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)
    return _normalize_unit(x01).contiguous(), np.array([lbl for _, lbl in files], dtype=np.int64)
