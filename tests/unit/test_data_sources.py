"""Catalog readers: fashion-mnist (IDX), imagefolder (PIL), npz -- and every bad input they refuse."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scalelab.config.specs import DataSpec
from scalelab.data import prepare, read_prepared, read_raw
from scalelab.data.sources import FASHION_MNIST_CLASSES, read_idx
from scalelab.errors import DataError


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def fake_fashion_mnist(root: Path, n_train: int = 200, n_test: int = 50) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for prefix, n, gz in (("train", n_train, True), ("t10k", n_test, False)):  # both encodings
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return root


def save_png(path: Path, size: tuple[int, int], mode: str, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, colour).save(path)


def imagefolder(root: Path, per_class: int = 6) -> Path:
    """Two classes, images of several sizes, grey and colour."""
    sizes = [(16, 16), (16, 16), (20, 16), (16, 24), (32, 32), (16, 16)]
    for c, cls in enumerate(("cat", "dog")):
        for i in range(per_class):
            mode = "RGB" if i % 2 else "L"
            save_png(root / cls / f"{i:02d}.png", sizes[i % len(sizes)], mode, 40 + 100 * c + i)
    return root


def spec(**kw) -> DataSpec:
    return DataSpec(**{"name": "t", "val_fraction": 0.2, "test_fraction": 0.2, **kw})


# ----------------------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_reads_gz_and_plain_idx_and_keeps_own_test_split(tmp_path: Path):
    root = fake_fashion_mnist(tmp_path / "fm")
    ds = read_raw(spec(kind="fashion-mnist", source=str(root), val_fraction=0.1))
    assert ds.classes == FASHION_MNIST_CLASSES and ds.hflip_ok
    assert len(ds.splits["test"]) == 50  # the dataset's own t10k split, untouched
    assert len(ds.splits["train"]) + len(ds.splits["val"]) == 200
    assert ds.splits["train"].x.shape[1:] == (28, 28, 1) and ds.splits["train"].x.dtype == np.uint8


def test_fashion_mnist_resize_and_rgb(tmp_path: Path):
    root = fake_fashion_mnist(tmp_path / "fm")
    ds = read_raw(spec(kind="fashion-mnist", source=str(root), image_size=16, channels=3))
    assert ds.splits["test"].x.shape[1:] == (16, 16, 3)


def test_fashion_mnist_missing_says_how_to_install(tmp_path: Path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        read_raw(spec(kind="fashion-mnist", source=str(tmp_path / "nowhere")))


def test_idx_bad_magic_and_truncation(tmp_path: Path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 3, 3)), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")


# ----------------------------------------------------------------------------- imagefolder


def test_imagefolder_mixed_sizes_and_modes(tmp_path: Path):
    root = imagefolder(tmp_path / "imgs")
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    ds = read_raw(spec(kind="imagefolder", source=str(root)))
    assert ds.classes == ["cat", "dog"]
    x = ds.splits["train"].x
    assert x.shape[1:] == (16, 16, 3)  # most common shorter side; RGB because some images are colour
    assert sum(len(s) for s in ds.splits.values()) == 12
    assert ds.source_report["skipped_count"] == 0


def test_imagefolder_fixed_size_and_grey(tmp_path: Path):
    root = imagefolder(tmp_path / "imgs")
    ds = read_raw(spec(kind="imagefolder", source=str(root), image_size=12, channels=1))
    assert ds.splits["test"].x.shape[1:] == (12, 12, 1)


def test_imagefolder_corrupt_file_is_named(tmp_path: Path):
    root = imagefolder(tmp_path / "imgs")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"dog/broken\.png.*on_bad_file=skip"):
        read_raw(spec(kind="imagefolder", source=str(root)))


def test_imagefolder_truncated_file_is_caught(tmp_path: Path):
    root = imagefolder(tmp_path / "imgs")
    good = root / "cat" / "00.png"
    Image.new("L", (64, 64), 7).save(root / "cat" / "big.png")
    (root / "cat" / "big.png").write_bytes((root / "cat" / "big.png").read_bytes()[:40])
    assert good.exists()
    with pytest.raises(DataError, match="big.png"):
        read_raw(spec(kind="imagefolder", source=str(root)))


def test_imagefolder_skip_policy_counts_and_reports(tmp_path: Path):
    root = imagefolder(tmp_path / "imgs")
    (root / "dog" / "broken.png").write_bytes(b"garbage")
    (root / "cat" / "bad.jpg").write_bytes(b"")
    ds = read_raw(spec(kind="imagefolder", source=str(root), on_bad_file="skip"))
    assert ds.source_report["skipped_count"] == 2
    assert sorted(ds.source_report["skipped"]) == ["cat/bad.jpg", "dog/broken.png"]
    assert sum(len(s) for s in ds.splits.values()) == 12
    out = prepare(
        spec(kind="imagefolder", source=str(root), on_bad_file="skip", data_dir=str(tmp_path / "d"))
    )
    assert read_prepared(out).source_report["skipped_count"] == 2  # recorded in metadata.json


def test_imagefolder_empty_class_folder(tmp_path: Path):
    root = imagefolder(tmp_path / "imgs")
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty has no images"):
        read_raw(spec(kind="imagefolder", source=str(root)))


def test_imagefolder_single_class(tmp_path: Path):
    root = tmp_path / "imgs"
    for i in range(4):
        save_png(root / "only" / f"{i}.png", (8, 8), "L", i)
    with pytest.raises(DataError, match="single class"):
        read_raw(spec(kind="imagefolder", source=str(root)))


def test_imagefolder_missing_root(tmp_path: Path):
    with pytest.raises(DataError, match="not a folder"):
        read_raw(spec(kind="imagefolder", source=str(tmp_path / "nope")))


# ----------------------------------------------------------------------------- npz


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_grey_images_and_arbitrary_labels(tmp_path: Path):
    rng = np.random.default_rng(0)
    f = write_npz(
        tmp_path / "d.npz", x=rng.integers(0, 256, (60, 10, 10), dtype=np.uint8), y=np.repeat([3, 7, 9], 20)
    )
    ds = read_raw(spec(kind="npz", source=str(f)))
    assert ds.classes == ["3", "7", "9"]
    assert ds.splits["train"].x.shape[1:] == (10, 10, 1)
    assert set(np.unique(ds.splits["train"].y)) == {0, 1, 2}


def test_npz_own_test_split_and_class_names(tmp_path: Path):
    f = write_npz(
        tmp_path / "d.npz",
        x=np.zeros((40, 6, 6, 3), np.uint8),
        y=np.arange(40) % 2,
        x_test=np.ones((10, 6, 6, 3), np.uint8),
        y_test=np.arange(10) % 2,
        classes=np.array(["no", "yes"]),
    )
    ds = read_raw(spec(kind="npz", source=str(f)))
    assert ds.classes == ["no", "yes"] and len(ds.splits["test"]) == 10 and ds.channels == 3


def test_npz_mismatched_lengths(tmp_path: Path):
    f = write_npz(tmp_path / "d.npz", x=np.zeros((10, 4, 4), np.uint8), y=np.arange(9) % 2)
    with pytest.raises(DataError, match="10 images but y has 9 labels"):
        read_raw(spec(kind="npz", source=str(f)))


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 4, 4), np.uint8)}, r"lacks array\(s\) \['y'\]"),
        ({"x": np.zeros((4, 4, 4), np.float32), "y": np.arange(4) % 2}, "must be uint8"),
        ({"x": np.zeros((4, 4), np.uint8), "y": np.arange(4) % 2}, "must be"),
        ({"x": np.zeros((4, 4, 4), np.uint8), "y": np.zeros(4)}, "1-D integer"),
        ({"x": np.zeros((4, 4, 4), np.uint8), "y": np.zeros(4, np.int64)}, "single class"),
    ],
)
def test_npz_bad_arrays(tmp_path: Path, arrays, message):
    f = write_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        read_raw(spec(kind="npz", source=str(f)))


def test_npz_not_a_zip(tmp_path: Path):
    (tmp_path / "d.npz").write_text("hello")
    with pytest.raises(DataError, match="cannot read"):
        read_raw(spec(kind="npz", source=str(tmp_path / "d.npz")))
