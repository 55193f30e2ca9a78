"""edgeprep.data: built-in digits, .npz, image folders; exact split sizes, determinism, errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from edgeprep.data import load_data, stratified_order
from edgeprep.errors import BadInputError
from edgeprep.recipe import DataConfig


def one_line_error(excinfo, *needles: str) -> str:
    """The error is one line and names every needle (path, key, fix)."""
    text = str(excinfo.value)
    assert "\n" not in text and text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


@pytest.fixture(scope="module")
def digits():
    return load_data(DataConfig(source="digits"))


def ids_npz(tmp_path, n=200, classes=4, name="ids.npz"):
    """An .npz whose x[i] == i, so every split row says which sample it is."""
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    y = (np.arange(n) % classes).astype(np.int64)
    path = tmp_path / name
    np.savez(path, x=x, y=y)
    return path


def row_ids(split) -> set[int]:
    return set(split.x[:, 0].long().tolist())


# ----------------------------------------------------------------------------- digits
def test_digits_exact_sizes_shapes_and_labels(digits):
    # 1797 images; test = val = round(0.15 * 1797) = 270; train = the rest.
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1257, 270, 270)
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10 and digits.task == "classification"
    for split in (digits.train, digits.val, digits.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[1:] == (1, 8, 8)
        assert set(split.y.tolist()) == set(range(10))
    # (x/16 - 0.5) / 0.5 maps pixel 0 -> -1 and 16 -> 1
    assert digits.train.x.min().item() == -1.0 and digits.train.x.max().item() == 1.0
    assert digits.split("val") is digits.val


def test_digits_splits_are_stratified(digits):
    overall = torch.bincount(torch.cat([digits.train.y, digits.val.y, digits.test.y]), minlength=10).double()
    for split in (digits.val, digits.test):
        expected = overall * len(split) / overall.sum()
        counts = torch.bincount(split.y, minlength=10).double()
        assert (counts - expected).abs().max().item() <= 1.0


def test_calibration_subset_is_stratified_from_train(digits):
    assert digits.calib.shape == (128, 1, 8, 8)
    # every calibration row is a train row (bitwise)
    train_rows = {tuple(r.flatten().tolist()) for r in digits.train.x}
    assert all(tuple(r.flatten().tolist()) in train_rows for r in digits.calib)


def test_same_seed_same_split_across_processes(digits):
    code = ("from edgeprep.data import load_data; from edgeprep.recipe import DataConfig; import hashlib; "
            "b = load_data(DataConfig(source='digits')); "
            "print(hashlib.sha256(b.test.x.numpy().tobytes() + b.train.y.numpy().tobytes()"
            " + b.calib.numpy().tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    here = hashlib.sha256(digits.test.x.numpy().tobytes() + digits.train.y.numpy().tobytes()
                          + digits.calib.numpy().tobytes()).hexdigest()
    assert out == here


def test_digits32_is_bilinear_upsample_of_digits(digits):
    big = load_data(DataConfig(source="digits32"))
    assert big.input_shape == (1, 32, 32) and big.name == "digits32"
    # same split (labels only decide it); bilinear weights sum to 1, so it commutes with the affine normalisation
    assert torch.equal(big.test.y, digits.test.y)
    ref = torch.nn.functional.interpolate(digits.test.x, size=(32, 32), mode="bilinear", align_corners=False)
    assert (big.test.x - ref).abs().max().item() < 1e-6


def test_default_source_fills_unset_source():
    b = load_data(DataConfig(source=None, calibration_samples=4), default_source="digits")
    assert b.name == "digits" and b.calib.shape == (4, 1, 8, 8)
    with pytest.raises(BadInputError) as ei:
        load_data(DataConfig(source=None))
    one_line_error(ei, "data.source")


# ----------------------------------------------------------------------------- .npz
def test_npz_splits_disjoint_cover_all_and_deterministic(tmp_path):
    path = ids_npz(tmp_path)
    cfg = DataConfig(source=str(path), val_fraction=0.1, test_fraction=0.2, calibration_samples=16)
    a, b = load_data(cfg), load_data(cfg)
    assert (len(a.train), len(a.val), len(a.test)) == (140, 20, 40)
    tr, va, te = row_ids(a.train), row_ids(a.val), row_ids(a.test)
    assert not (tr & va) and not (tr & te) and not (va & te) and tr | va | te == set(range(200))
    assert all(torch.equal(getattr(a, s).x, getattr(b, s).x) for s in ("train", "val", "test"))
    assert torch.equal(a.calib, b.calib) and set(a.calib[:, 0].long().tolist()) <= tr
    assert torch.bincount(a.test.y).tolist() == [10, 10, 10, 10]
    assert a.num_classes == 4 and a.input_shape == (1,)
    other = load_data(cfg.model_copy(update={"split_seed": 1}))
    assert row_ids(other.test) != te


def test_npz_relative_path_resolves_against_base_dir(tmp_path):
    ids_npz(tmp_path, name="d.npz")
    b = load_data(DataConfig(source="d.npz"), base_dir=tmp_path)
    assert len(b.train) + len(b.val) + len(b.test) == 200


def test_npz_uint8_images_scaled_and_channels_first(tmp_path):
    gray = np.zeros((20, 5, 6), dtype=np.uint8)
    gray[:, 0, 0] = 255
    np.savez(tmp_path / "g.npz", x=gray, y=np.arange(20) % 2)
    b = load_data(DataConfig(source=str(tmp_path / "g.npz")))
    assert b.input_shape == (1, 5, 6)
    assert b.train.x[:, 0, 0, 0].eq(1.0).all() and b.train.x[:, 0, 1, 1].eq(-1.0).all()

    rgb = np.zeros((20, 5, 6, 3), dtype=np.uint8)
    rgb[..., 2] = 51  # 51/255 = 0.2 -> (0.2 - 0.5) / 0.5 = -0.6
    np.savez(tmp_path / "c.npz", x=rgb, y=np.arange(20) % 2)
    c = load_data(DataConfig(source=str(tmp_path / "c.npz")))
    assert c.input_shape == (3, 5, 6)
    assert torch.allclose(c.train.x[:, 2], torch.full_like(c.train.x[:, 2], -0.6), atol=1e-6)


def test_npz_presplit_keys_are_used(tmp_path):
    def part(lo, n):
        return np.arange(lo, lo + n, dtype=np.float32)[:, None], np.arange(n) % 3

    (xtr, ytr), (xva, yva), (xte, yte) = part(0, 30), part(100, 6), part(200, 9)
    np.savez(tmp_path / "s.npz", x_train=xtr, y_train=ytr, x_val=xva, y_val=yva, x_test=xte, y_test=yte)
    b = load_data(DataConfig(source=str(tmp_path / "s.npz"), calibration_samples=500))
    assert row_ids(b.val) == set(range(100, 106)) and row_ids(b.test) == set(range(200, 209))
    assert row_ids(b.train) == set(range(30)) and b.calib.shape == (30, 1)  # capped at len(train)

    np.savez(tmp_path / "nv.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    nv = load_data(DataConfig(source=str(tmp_path / "nv.npz"), val_fraction=0.2))
    assert (len(nv.train), len(nv.val)) == (24, 6) and row_ids(nv.train) | row_ids(nv.val) == set(range(30))


@pytest.mark.parametrize("arrays, needles", [
    ({"x": np.zeros((4, 2), np.float32)}, ["no array 'y'", "numpy.savez"]),
    ({"x": np.zeros((4, 2), np.float32), "y": np.zeros(3, np.int64)}, ["3 labels", "4 samples"]),
    ({"x": np.zeros((4, 2), np.float32), "y": np.zeros(4, np.float32)}, ["dtype float32", "integer class"]),
    ({"x": np.zeros((4, 2), np.int32), "y": np.zeros(4, np.int64)}, ["dtype int32", "uint8"]),
    ({"x": np.full((4, 2), np.nan, np.float32), "y": np.zeros(4, np.int64)}, ["NaN"]),
    ({"x": np.zeros((4, 2), np.float32), "y": -np.ones(4, np.int64)}, ["contain -1"]),
    ({"x_train": np.zeros((4, 2), np.float32), "y_train": np.zeros(4, np.int64)}, ["x_test/y_test"]),
])
def test_npz_bad_content_is_one_line_bad_input(tmp_path, arrays, needles):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(BadInputError) as ei:
        load_data(DataConfig(source=str(path)))
    one_line_error(ei, str(path), *needles)
    assert ei.value.exit_code == 2


def test_npz_object_array_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, np.int64))
    with pytest.raises(BadInputError) as ei:
        load_data(DataConfig(source=str(path)))
    one_line_error(ei, str(path), "allow_pickle")


@pytest.mark.parametrize("make, needles", [
    (lambda p: None, ["nothing at", "digits32"]),
    (lambda p: p.write_text("a,b\n"), ["unsupported data file type '.csv'"]),
])
def test_missing_or_unsupported_file(tmp_path, make, needles):
    path = tmp_path / "data.csv"
    make(path)
    with pytest.raises(BadInputError) as ei:
        load_data(DataConfig(source=str(path)))
    one_line_error(ei, *needles)


def test_corrupt_npz_and_bad_split_name(tmp_path, digits):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(BadInputError) as ei:
        load_data(DataConfig(source=str(path)))
    one_line_error(ei, str(path), "cannot read as .npz")
    with pytest.raises(BadInputError) as ei:
        digits.split("dev")
    one_line_error(ei, "'dev'", "train, val, test")
    with pytest.raises(BadInputError) as ei:
        load_data(DataConfig(source="digits", image_size=[4, 4]))
    one_line_error(ei, "image_size")


# ----------------------------------------------------------------------------- image folders
def write_images(root, classes=("cat", "dog", "eel"), per_class=6, size=(6, 5), mode="L"):
    for c_idx, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            value = 40 * c_idx + i
            color = value if mode == "L" else (value, 0, 255)
            Image.new(mode, size, color).save(root / name / f"{i:02d}.png")


def test_image_folder_grayscale_labels_and_values(tmp_path):
    write_images(tmp_path / "imgs")
    b = load_data(DataConfig(source="imgs", test_fraction=0.2, val_fraction=0.0), base_dir=tmp_path)
    assert b.input_shape == (1, 5, 6) and b.num_classes == 3  # PIL size (w=6, h=5) -> [1, 5, 6]
    assert (len(b.train), len(b.val), len(b.test)) == (14, 0, 4) and b.val.x.shape == (0, 1, 5, 6)
    # each image is constant: value 40 * class + i, normalised as (v/255 - 0.5) / 0.5
    for x, y in zip(b.train.x, b.train.y):
        i = round(((x[0, 0, 0].item() * 0.5 + 0.5) * 255) - 40 * y.item())
        assert 0 <= i < 6


def test_image_folder_rgb_and_resize(tmp_path):
    write_images(tmp_path / "rgb", mode="RGB")
    b = load_data(DataConfig(source=str(tmp_path / "rgb"), image_size=[4, 3]))
    assert b.input_shape == (3, 4, 3)
    assert b.train.x[:, 2].eq(1.0).all() and b.train.x[:, 1].eq(-1.0).all()


def test_image_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError) as ei:
        load_data(DataConfig(source=str(empty)))
    one_line_error(ei, str(empty), "no class subfolders")

    write_images(tmp_path / "mixed", per_class=3)
    Image.new("L", (9, 9)).save(tmp_path / "mixed" / "cat" / "big.png")
    with pytest.raises(BadInputError) as ei:
        load_data(DataConfig(source=str(tmp_path / "mixed")))
    one_line_error(ei, "different sizes", "image_size")
    assert load_data(DataConfig(source=str(tmp_path / "mixed"), image_size=[5, 6])).input_shape == (1, 5, 6)

    write_images(tmp_path / "corrupt", per_class=3)
    (tmp_path / "corrupt" / "dog" / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(BadInputError) as ei:
        load_data(DataConfig(source=str(tmp_path / "corrupt")))
    one_line_error(ei, "bad.png", "cannot decode")

    write_images(tmp_path / "hole", per_class=3)
    (tmp_path / "hole" / "zebra").mkdir()
    with pytest.raises(BadInputError) as ei:
        load_data(DataConfig(source=str(tmp_path / "hole")))
    one_line_error(ei, "zebra", "no images")


def test_stratified_order_prefixes_are_balanced():
    y = np.repeat(np.arange(3), [50, 30, 20])
    order = stratified_order(y, seed=7)
    assert sorted(order.tolist()) == list(range(100))
    counts = np.bincount(y[order[:10]], minlength=3)
    assert counts.tolist() == [5, 3, 2]
    assert np.array_equal(order, stratified_order(y, seed=7))
    assert not np.array_equal(order, stratified_order(y, seed=8))
