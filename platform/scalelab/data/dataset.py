"""The canonical in-memory dataset: uint8 images + int labels, split, with metadata.

Every catalog entry (digits, Fashion-MNIST, imagefolder, npz, ...) is turned into this form by
``scalelab data prepare`` and written to ``data/<name>/`` as ``{train,val,test}.npz`` +
``metadata.json``; training only ever reads that prepared form.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.errors import DataError

SPLITS = ("train", "val", "test")


BOX_FIELDS = ("boxes", "box_labels", "box_image_index")


@dataclass
class Split:
    x: np.ndarray  # (N, H, W, C) uint8
    y: np.ndarray  # (N,) int64; for detection: objects per image
    # Detection only (all three or none): M boxes over the N images, flat, in image order.
    boxes: np.ndarray | None = None  # (M, 4) float32 x1, y1, x2, y2 in pixels (x2, y2 exclusive)
    box_labels: np.ndarray | None = None  # (M,) int64 class index
    box_image_index: np.ndarray | None = None  # (M,) int64 index of the image holding each box

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.x.dtype != np.uint8:
            raise DataError(f"images must be uint8 (N, H, W, C), got {self.x.dtype} {self.x.shape}")
        if len(self.x) != len(self.y):
            raise DataError(f"{len(self.x)} images but {len(self.y)} labels: lengths must match")
        given = [f for f in BOX_FIELDS if getattr(self, f) is not None]
        if given and len(given) != len(BOX_FIELDS):
            raise DataError(f"detection splits need all of {BOX_FIELDS}, got only {given}")
        if given:
            m = len(self.boxes)
            if self.boxes.shape != (m, 4) or len(self.box_labels) != m or len(self.box_image_index) != m:
                raise DataError(
                    f"boxes must be (M, 4) with M box_labels and box_image_index entries, got "
                    f"{self.boxes.shape}, {len(self.box_labels)}, {len(self.box_image_index)}"
                )
            if m and (self.box_image_index.min() < 0 or self.box_image_index.max() >= len(self.x)):
                raise DataError(f"box_image_index must lie in 0..{len(self.x) - 1}")

    @property
    def has_boxes(self) -> bool:
        return self.boxes is not None

    def box_arrays(self) -> dict[str, np.ndarray]:
        """The detection arrays in their canonical dtypes (empty for classification splits)."""
        if not self.has_boxes:
            return {}
        return {
            "boxes": self.boxes.astype(np.float32),
            "box_labels": self.box_labels.astype(np.int64),
            "box_image_index": self.box_image_index.astype(np.int64),
        }

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataVersion:
    """Exactly which data a run saw: dataset name, DVC content hash, git revision, remote."""

    name: str
    content_hash: str  # DVC's md5 of the prepared folder ("<md5>.dir"), as dvc.lock records it
    rev: str | None = None  # git revision whose dvc.lock records content_hash (None: not committed)
    remote: str | None = None  # URL of the DVC remote the data is pushed to
    path: str | None = None  # prepared folder, relative to the DVC repository root
    repo: str | None = None  # DVC repository (local root or git URL) to read ``rev`` from
    # how training reads it, not which bytes (so not part of equality): "memory" or "stream", and why
    format: str | None = field(default=None, compare=False)
    format_reason: str | None = field(default=None, compare=False)

    @property
    def status(self) -> str:
        """``versioned`` when DVC records these bytes in a git commit (``rev``), else ``unversioned``:
        a content hash alone pins the bytes but nobody can fetch them again."""
        return "versioned" if self.rev else "unversioned"

    def as_tags(self) -> dict[str, str]:
        return {
            "data.status": self.status,
            "data.name": self.name,
            "data.hash": self.content_hash,
            "data.rev": self.rev or "",
            "data.remote": self.remote or "",
            "data.path": self.path or "",
            **({"data.format": self.format} if self.format else {}),
            **({"data.format_reason": self.format_reason} if self.format_reason else {}),
        }

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Dataset:
    """Prepared splits plus what training and serving must agree on (classes, mean/std, shape)."""

    name: str
    splits: dict[str, Split]
    classes: list[str]
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    task: str = "classification"
    hflip_ok: bool = True
    version: DataVersion | None = None
    source_report: dict[str, Any] = field(default_factory=dict)  # e.g. skipped files, resize target

    def __post_init__(self) -> None:
        if not self.mean:
            self.mean, self.std = channel_stats(self.splits["train"].x)

    @property
    def channels(self) -> int:
        return int(self.splits["train"].x.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.splits["train"].x.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def metadata(self) -> dict[str, Any]:
        tr = self.splits["train"].x
        return {
            "name": self.name,
            "task": self.task,
            "classes": self.classes,
            "num_classes": self.num_classes,
            "shape": list(tr.shape[1:]),
            "image_size": self.image_size,
            "channels": self.channels,
            "mean": self.mean,
            "std": self.std,
            "hflip_ok": self.hflip_ok,
            "split_sizes": {k: len(v) for k, v in self.splits.items()},
            **({"source": self.source_report} if self.source_report else {}),
        }


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 images, in [0, 1] units."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    return flat.mean(0).round(6).tolist(), np.maximum(flat.std(0), 1e-6).round(6).tolist()


def stratified_split(y: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split indices so each part keeps the class proportions; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        cuts = np.cumsum([round(f * len(idx)) for f in fractions])
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks (sha256 for checksums; md5 as DVC hashes)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_npz_deterministic(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez`` but byte-identical for identical arrays (fixed zip timestamps).

    ``np.savez`` stamps each member with the current time, so preparing the same data twice would
    give a new DVC hash each time; fixed timestamps make the content hash a function of the data.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def write_prepared(ds: Dataset, out_dir: str | Path) -> Path:
    """Write the canonical form atomically: a temp folder renamed into place when complete."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    checksums = {}
    for name, split in ds.splits.items():
        path = tmp / f"{name}.npz"
        save_npz_deterministic(path, x=split.x, y=split.y.astype(np.int64), **split.box_arrays())
        checksums[path.name] = sha256_file(path)
    meta = {**ds.metadata(), "checksums": checksums}
    (tmp / "metadata.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def read_prepared(path: str | Path, verify: bool = True) -> Dataset:
    """Read ``data/<name>/``; with ``verify`` each file's checksum must match metadata.json."""
    root = Path(path)
    meta_path = root / "metadata.json"
    if not meta_path.is_file():
        raise DataError(
            f"no prepared dataset at {root} (metadata.json missing); run "
            f"`scalelab data prepare <recipe>` or `dvc pull` / `dvc checkout` first"
        )
    meta = json.loads(meta_path.read_text())
    splits = {}
    for name in SPLITS:
        f = root / f"{name}.npz"
        if not f.is_file():
            raise DataError(f"{f} is missing; run `scalelab data prepare` or `dvc checkout`")
        if verify and meta.get("checksums", {}).get(f.name) not in (None, sha256_file(f)):
            raise DataError(
                f"{f} does not match its checksum in {meta_path}: the file changed after preparing; "
                f"run `dvc checkout {root}` or `scalelab data prepare` again"
            )
        with np.load(f, allow_pickle=False) as z:
            splits[name] = Split(z["x"], z["y"], **{k: z[k] for k in BOX_FIELDS if k in z})
    return Dataset(splits=splits, **metadata_fields(meta))


def metadata_fields(meta: dict) -> dict:
    """The :class:`Dataset` fields a prepared dataset's ``metadata.json`` holds (either form)."""
    return {
        "name": meta["name"],
        "classes": list(meta["classes"]),
        "mean": meta["mean"],
        "std": meta["std"],
        "task": meta.get("task", "classification"),
        "hflip_ok": meta.get("hflip_ok", True),
        "source_report": meta.get("source", {}),
    }
