"""Classification readers: digits (scikit-learn), fashion-mnist (IDX files), imagefolder (PIL), npz.

Each returns a :class:`Dataset` of uint8 (N, H, W, C) images with seeded splits; the order of
samples is fixed (sorted file names) so the same source and seed always give the same bytes.
"""

from __future__ import annotations

import gzip
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from scalelab.config.specs import DataSpec
from scalelab.data.dataset import Dataset, Split, stratified_split
from scalelab.errors import DataError

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------- splits and shapes


def split_arrays(
    spec: DataSpec, x: np.ndarray, y: np.ndarray, test: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, Split]:
    """Seeded stratified train/val/test split; a dataset's own test split is kept when given."""
    if len(x) != len(y):
        raise DataError(f"{len(x)} images but {len(y)} labels: x and y lengths must match")
    if len(np.unique(y)) < 2:
        raise DataError(f"dataset {spec.name!r} has a single class; classification needs at least two")
    if test is None:
        fractions = (spec.test_fraction, spec.val_fraction)
        test_idx, val_idx, train_idx = stratified_split(y, fractions, spec.split_seed)
        test = (x[test_idx], y[test_idx])
    else:
        val_idx, train_idx = stratified_split(y, (spec.val_fraction,), spec.split_seed)
    return {
        "train": Split(x[train_idx], y[train_idx]),
        "val": Split(x[val_idx], y[val_idx]),
        "test": Split(*test),
    }


def conform(x: np.ndarray, image_size: int | None, channels: int | None) -> np.ndarray:
    """Resize (square, bilinear) and set the channel count of a uint8 (N, H, W, C) batch."""
    if image_size is not None and x.shape[1:3] != (image_size, image_size):
        from PIL import Image

        x = np.stack([_fit_square(Image.fromarray(_squeeze(img)), image_size) for img in x])
        x = x[..., None] if x.ndim == 3 else x
    if channels == 3 and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    elif channels == 1 and x.shape[-1] == 3:  # ITU-R 601 luma, as PIL's convert("L")
        x = (x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round()
        x = np.clip(x, 0, 255).astype(np.uint8)[..., None]
    return np.ascontiguousarray(x)


def _squeeze(img: np.ndarray) -> np.ndarray:
    return img[..., 0] if img.shape[-1] == 1 else img


def _fit_square(img, size: int) -> np.ndarray:
    """Scale the shorter side to ``size`` and centre-crop: no distortion of the aspect ratio."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


# ----------------------------------------------------------------------------- digits


def read_digits(spec: DataSpec) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 16 grey levels scaled to 0-255)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    y = bunch.target.astype(np.int64)
    return Dataset(
        name=spec.name, splits=split_arrays(spec, x, y), classes=[str(c) for c in range(10)], hflip_ok=False
    )


# ----------------------------------------------------------------------------- fashion-mnist


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"{root / stem}[.gz] not found. Fashion-MNIST comes from the Debian package "
        f"dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`, files in {FASHION_MNIST_DIR}), "
        f"or set data.source to a folder with the four IDX files"
    )


def read_fashion_mnist(spec: DataSpec) -> Dataset:
    """Zalando's Fashion-MNIST: 60k train + 10k test 28x28 grey images; keeps its own test split."""
    root = Path(spec.source or FASHION_MNIST_DIR)
    if not root.is_dir():
        _idx_file(root, "train-images-idx3-ubyte")  # raises with the install hint
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if len(x) != len(y):
            raise DataError(f"{root}: {len(x)} {split} images but {len(y)} labels")
        arrays[split] = (conform(x.astype(np.uint8)[..., None], spec.image_size, spec.channels), y)
    splits = split_arrays(spec, *arrays["train"], test=arrays["test"])
    return Dataset(name=spec.name, splits=splits, classes=list(FASHION_MNIST_CLASSES), hflip_ok=True)


# ----------------------------------------------------------------------------- imagefolder


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"imagefolder root {root} is not a folder; set data.source to root/<class>/*.png")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no class folders; expected {root}/<class>/*.png (or .jpg, .bmp)")
    if len(folders) < 2:
        raise DataError(
            f"{root} has a single class folder ({folders[0].name}); classification needs at least two"
        )
    return folders


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _open_image(path: Path):
    """Decode fully (a truncated file fails here, not later); grey stays 'L', everything else RGB."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("L", "1", "I", "I;16", "F", "LA"):
            return img.convert("L")
        if img.mode == "P" and "transparency" not in img.info:
            rgb = img.convert("RGB")
            arr = np.asarray(rgb)
            grey = (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
            return rgb.convert("L") if grey else rgb
        return img.convert("RGB")


def read_imagefolder(spec: DataSpec) -> Dataset:
    """``source/<class>/*.{png,jpg,jpeg,bmp}``: any size, grey or colour, made square and uniform.

    Size: ``data.image_size``, or else the most common shorter side (shorter side scaled, then
    centre-cropped). Channels: ``data.channels``, or RGB as soon as one image is colour.
    Unreadable files stop with their name (``on_bad_file: error``) or are skipped and counted.
    """
    if not spec.source:
        raise DataError("data.source must point at the imagefolder root (root/<class>/*.png)")
    root = Path(spec.source)
    images, labels, skipped = [], [], []
    folders = _class_folders(root)
    for label, folder in enumerate(folders):
        files = _image_files(folder)
        if not files:
            raise DataError(
                f"class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); "
                f"add images or remove the folder"
            )
        kept = 0
        for path in files:
            try:
                images.append(_open_image(path))
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
                rel = path.relative_to(root)
                if spec.on_bad_file == "error":
                    raise DataError(
                        f"cannot read image {path}: {type(exc).__name__}: {exc}. Fix or delete the "
                        f"file, or set data.on_bad_file=skip to skip unreadable images"
                    ) from exc
                skipped.append(str(rel))
                log.warning("skipping unreadable image %s (%s)", path, exc)
                continue
            labels.append(label)
            kept += 1
        if kept == 0:
            raise DataError(f"class folder {folder}: every image was unreadable (all {len(files)} skipped)")

    size = spec.image_size or Counter(min(img.size) for img in images).most_common(1)[0][0]
    colour = spec.channels == 3 or (spec.channels is None and any(img.mode == "RGB" for img in images))
    mode = "RGB" if colour else "L"
    x = np.stack([_fit_square(img.convert(mode), size) for img in images])
    x = x if colour else x[..., None]  # (N, S, S, C)
    y = np.asarray(labels, dtype=np.int64)
    report = {
        "files": len(images) + len(skipped),
        "skipped_count": len(skipped),
        "skipped": skipped,
        "image_size": int(size),
        "original_sizes": len({img.size for img in images}),
    }
    return Dataset(
        name=spec.name,
        splits=split_arrays(spec, x, y),
        classes=[f.name for f in folders],
        source_report=report,
    )


# ----------------------------------------------------------------------------- npz


def read_npz(spec: DataSpec) -> Dataset:
    """An ``.npz`` with ``x`` (N, H, W[, C]) uint8 and ``y`` (N,) ints; optional ``classes``,
    and ``x_test``/``y_test`` for a test split of its own."""
    if not spec.source:
        raise DataError("data.source must point at an .npz file with arrays x and y")
    path = Path(spec.source)
    if not path.is_file():
        raise DataError(f"npz file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - zip/format errors
        raise DataError(f"cannot read {path} as .npz: {exc}") from exc
    missing = {"x", "y"} - arrays.keys()
    if missing:
        raise DataError(f"{path} lacks array(s) {sorted(missing)}; it has {sorted(arrays)}")

    x, y = _npz_images(path, arrays["x"], "x"), _npz_labels(path, arrays["y"], "y")
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} images but y has {len(y)} labels; lengths must match")
    test = None
    if "x_test" in arrays:
        xt, yt = _npz_images(path, arrays["x_test"], "x_test"), _npz_labels(path, arrays["y_test"], "y_test")
        if len(xt) != len(yt):
            raise DataError(f"{path}: x_test has {len(xt)} images but y_test has {len(yt)} labels")
        test = (xt, yt)

    values = np.unique(np.concatenate([y] + ([test[1]] if test else [])))
    classes = (
        [str(c) for c in arrays["classes"].tolist()] if "classes" in arrays else [str(v) for v in values]
    )
    if "classes" not in arrays:  # arbitrary label values -> 0..K-1 in sorted order
        y = np.searchsorted(values, y)
        test = (test[0], np.searchsorted(values, test[1])) if test else None
    elif values.min() < 0 or values.max() >= len(classes):
        raise DataError(
            f"{path}: labels span {values.min()}..{values.max()} but {len(classes)} classes given"
        )
    x = conform(x, spec.image_size, spec.channels)
    test = (conform(test[0], spec.image_size, spec.channels), test[1]) if test else None
    return Dataset(name=spec.name, splits=split_arrays(spec, x, y.astype(np.int64), test), classes=classes)


def _npz_images(path: Path, x: np.ndarray, key: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{path}: {key} must be (N, H, W) or (N, H, W, 1|3), got shape {x.shape}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.integer) or x.min() < 0 or x.max() > 255:
            raise DataError(f"{path}: {key} must be uint8 (0-255), got {x.dtype}; scale it before saving")
        x = x.astype(np.uint8)
    return x


def _npz_labels(path: Path, y: np.ndarray, key: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} must be a 1-D integer array, got {y.dtype} {y.shape}")
    return y.astype(np.int64)


def read_classification(spec: DataSpec) -> Dataset:
    """A classification dataset of any kind in :data:`CLASSIFICATION_READERS`."""
    if spec.kind not in CLASSIFICATION_READERS:
        raise DataError(
            f"{spec.kind!r} is not a classification dataset kind; known: "
            f"{', '.join(sorted(CLASSIFICATION_READERS))}"
        )
    return CLASSIFICATION_READERS[spec.kind](spec)


CLASSIFICATION_READERS = {
    "digits": read_digits,
    "fashion-mnist": read_fashion_mnist,
    "imagefolder": read_imagefolder,
    "npz": read_npz,
}
