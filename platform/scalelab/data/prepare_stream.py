"""Preparing an image folder (local or an S3 prefix) into shards, in parallel on Ray.

The driver lists the files (``root/<class>/<file>``), splits them (seeded, stratified, as the
in-memory path does) and hands chunks of files to Ray tasks; each task reads, validates, makes
square (``data.image_size``, ``data.channels``) and encodes its images (a JPEG/PNG already of that
size and mode keeps its original bytes; the rest become PNG), and returns them with the per-channel
sums for mean/std. The driver writes the shards as results arrive (at most a few
chunks in flight: bounded memory) and prints images/s and an ETA.

When ``image_size`` or ``channels`` is not given, a first pass reads every image to find the most
common shorter side and whether any is colour (set both in the recipe to skip that pass).

A COCO detection dataset (kind ``coco``: an annotations JSON, local or on S3, its images beside it)
goes the same way: the driver reads the JSON and resolves each image's object, tasks letterbox and
encode chunks of images with their boxes (scaled with the image), the driver writes detection
shards (:class:`~scalelab.data.shards.DetectionShardWriter`).
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.artifacts.preprocess import letterbox, to_channels
from scalelab.config.specs import DataSpec
from scalelab.data.dataset import SPLITS, stratified_split
from scalelab.data.scenes import coco_index
from scalelab.data.shards import FORMAT, DetectionShardWriter, ShardWriter, _finish, _start, encode_png
from scalelab.data.sources import IMAGE_SUFFIXES, _class_folders, _fit_square, _image_files, _open_image
from scalelab.errors import DataError

log = logging.getLogger(__name__)
CHUNK = 128  # files per Ray task
IN_FLIGHT = 8  # chunks submitted ahead of the writer


@dataclass
class SourceFiles:
    """The image files of an image folder: paths (for ``filesystem``), labels, class names."""

    where: str
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    filesystem: Any = None  # pyarrow S3FileSystem for s3:// sources, None for local files


def list_source(spec: DataSpec) -> SourceFiles:
    if not spec.source:
        raise DataError("data.source must point at the imagefolder root (root/<class>/*.png or s3://...)")
    if spec.source.startswith("s3://"):
        return _list_s3(spec)
    root = Path(spec.source)
    paths, labels = [], []
    folders = _class_folders(root)
    for label, folder in enumerate(folders):
        files = _image_files(folder)
        if not files:
            raise DataError(f"class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    return SourceFiles(str(root), paths, np.asarray(labels, np.int64), [f.name for f in folders])


def _list_s3(spec: DataSpec) -> SourceFiles:
    import pyarrow.fs

    from scalelab.data.remote import s3_filesystem

    fs, endpoint = s3_filesystem(spec.endpoint_url)
    prefix = spec.source[len("s3://") :].rstrip("/")
    where = f"{spec.source} (S3 endpoint {endpoint or 'AWS'})"
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(prefix, recursive=True))
    except FileNotFoundError as exc:
        bucket = prefix.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise DataError(f"{where}: bucket {bucket!r} does not exist") from exc
        raise DataError(
            f"{where} is empty (no objects under it); upload root/<class>/<image> objects or fix data.source"
        ) from exc
    except OSError as exc:
        if "NO_SUCH_BUCKET" in str(exc):
            raise DataError(f"{where}: bucket {prefix.split('/', 1)[0]!r} does not exist") from exc
        raise DataError(f"cannot list {where}: {exc}. Check the endpoint, bucket and credentials") from exc
    by_class: dict[str, list[str]] = {}
    for info in infos:
        if info.type != pyarrow.fs.FileType.File:
            continue
        rel = info.path[len(prefix) + 1 :].split("/")
        if len(rel) < 2 or any(p.startswith(".") for p in rel):
            continue
        if Path(rel[-1]).suffix.lower() in IMAGE_SUFFIXES:
            by_class.setdefault(rel[0], []).append(info.path)
    if not by_class:
        raise DataError(
            f"{where} holds no images under <class>/ folders ({', '.join(IMAGE_SUFFIXES)}); "
            f"upload root/<class>/<image> objects or fix data.source"
        )
    if len(by_class) < 2:
        raise DataError(f"{where} has a single class folder ({next(iter(by_class))}); need at least two")
    classes = sorted(by_class)
    paths = [p for c in classes for p in sorted(by_class[c])]
    labels = np.asarray([i for i, c in enumerate(classes) for _ in by_class[c]], np.int64)
    return SourceFiles(spec.source, paths, labels, classes, fs)


def _read_bytes(fs: Any, path: str) -> bytes:
    if fs is None:
        return Path(path).read_bytes()
    with fs.open_input_file(path) as f:
        return f.read()


def _read(fs: Any, path: str):
    return _open_image(io.BytesIO(_read_bytes(fs, path)))


def _as_is_format(raw: bytes, size: int, mode: str) -> str | None:
    """The file's format ("jpeg", "png") when it already is what a shard holds (square ``size`` px in
    ``mode``, decoded as such with no conversion), so its original bytes can be stored; else None."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as img:
        fmt = {"JPEG": "jpeg", "PNG": "png"}.get(img.format or "")
        return fmt if fmt and img.size == (size, size) and img.mode == mode else None


def _bad(path: str, exc: BaseException, on_bad_file: str) -> str:
    if on_bad_file == "error":
        raise DataError(
            f"cannot read image {path}: {type(exc).__name__}: {exc}. Fix or delete the file, or set "
            f"data.on_bad_file=skip to skip unreadable images"
        )
    log.warning("skipping unreadable image %s (%s)", path, exc)
    return path


def survey_chunk(fs: Any, paths: list[str], on_bad_file: str) -> list[tuple[int, bool] | None]:
    """(shorter side, is colour) of each image; None for a skipped unreadable one."""
    out: list[tuple[int, bool] | None] = []
    for p in paths:
        try:
            img = _read(fs, p)
            out.append((min(img.size), img.mode == "RGB"))
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            _bad(p, exc, on_bad_file)
            out.append(None)
    return out


def encode_chunk(
    fs: Any, paths: list[str], ids: list[int], labels: list[int], size: int, mode: str, on_bad_file: str
) -> dict[str, Any]:
    """Read, validate (decode fully) and square a chunk; rows ``(id, label, bytes, format)``,
    skipped files and channel sums (for mean/std). A JPEG/PNG that needs no change keeps its
    original bytes; the others are PNG-encoded."""
    rows, skipped, kept = [], [], 0
    c = 3 if mode == "RGB" else 1
    sums, sq, pixels = np.zeros(c), np.zeros(c), 0
    for p, i, y in zip(paths, ids, labels, strict=True):
        try:
            raw = _read_bytes(fs, p)
            arr = _fit_square(_open_image(io.BytesIO(raw)).convert(mode), size)
            fmt = _as_is_format(raw, size, mode)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001
            skipped.append(_bad(p, exc, on_bad_file))
            continue
        arr = arr if arr.ndim == 3 else arr[..., None]
        flat = arr.reshape(-1, c).astype(np.float64) / 255.0
        sums += flat.sum(0)
        sq += (flat**2).sum(0)
        pixels += len(flat)
        rows.append((i, y, raw, fmt) if fmt else (i, y, encode_png(arr), "png"))
        kept += fmt is not None
    return {"rows": rows, "skipped": skipped, "kept": kept, "sums": sums, "sq": sq, "pixels": pixels}


def _run_chunks(fn: Callable, args: list[tuple], progress: Callable[[int], None]) -> Any:
    """Run ``fn(*a)`` for every ``a`` as Ray tasks, at most IN_FLIGHT ahead; yields results in order."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(fn)
    pending: list[Any] = []
    for a in args:
        pending.append(task.remote(*a))
        if len(pending) >= IN_FLIGHT:
            out = ray.get(pending.pop(0))
            progress(len(a[1]))
            yield out
    for ref, a in zip(pending, args[len(args) - len(pending) :], strict=True):
        out = ray.get(ref)
        progress(len(a[1]))
        yield out


class _Progress:
    def __init__(self, what: str, total: int, stream=sys.stderr) -> None:
        self.what, self.total, self.done = what, total, 0
        self.start = self.last = time.perf_counter()
        self.stream = stream

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= 2.0 or self.done >= self.total:
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            self.stream.write(
                f"{self.what}: {self.done}/{self.total} images, {rate:,.0f} img/s, ETA {eta:.0f}s\n"
            )
            self.stream.flush()
            self.last = now


def prepare_imagefolder_shards(spec: DataSpec, out_dir: str | Path) -> Path:
    """``spec.source`` (local folder or s3:// prefix) -> shards in ``out_dir``, on Ray."""
    return _on_ray(_prepare, spec, list_source(spec), Path(out_dir))


def _on_ray(prepare, spec: DataSpec, files, out_dir: Path) -> Path:
    """``prepare(spec, files, out_dir)`` on the connected Ray, or on a local one started (and
    stopped) for it."""
    import ray

    from scalelab.cluster.session import connect_ray

    started = False if ray.is_initialized() else connect_ray()
    try:
        return prepare(spec, files, out_dir)
    finally:
        if started:
            ray.shutdown()


def _prepare(spec: DataSpec, files: SourceFiles, out_dir: Path) -> Path:
    fs, n = files.filesystem, len(files.paths)
    fs_ref = fs  # pyarrow filesystems pickle (endpoint and credentials travel with them)
    size, channels = spec.image_size, spec.channels
    skipped: list[str] = []
    kept = 0  # files stored as they are (original bytes); the others were re-encoded as PNG
    if size is None or channels is None:
        chunks = [(fs_ref, files.paths[i : i + CHUNK], spec.on_bad_file) for i in range(0, n, CHUNK)]
        seen = [s for out in _run_chunks(survey_chunk, chunks, _Progress("survey", n)) for s in out]
        ok = [s for s in seen if s is not None]
        if not ok:
            raise DataError(f"{files.where}: every image was unreadable")
        size = size or Counter(s[0] for s in ok).most_common(1)[0][0]
        channels = channels or (3 if any(s[1] for s in ok) else 1)
    mode = "RGB" if channels == 3 else "L"

    test_idx, val_idx, train_idx = stratified_split(
        files.labels, (spec.test_fraction, spec.val_fraction), spec.split_seed
    )
    out, tmp = _start(out_dir)
    index: dict[str, list[dict[str, Any]]] = {}
    stats = [np.zeros(channels), np.zeros(channels), 0]
    progress = _Progress("prepare", n)
    for name, idx in zip(SPLITS, (train_idx, val_idx, test_idx), strict=True):
        idx = idx[np.random.default_rng([spec.split_seed, SPLITS.index(name)]).permutation(len(idx))]
        writer = ShardWriter(tmp, name, int(spec.shard_mb * 1e6), spec.row_group_rows)
        chunks = [
            (
                fs_ref,
                [files.paths[i] for i in idx[c : c + CHUNK]],
                idx[c : c + CHUNK].tolist(),
                files.labels[idx[c : c + CHUNK]].tolist(),
                size,
                mode,
                spec.on_bad_file,
            )
            for c in range(0, len(idx), CHUNK)
        ]
        for res in _run_chunks(encode_chunk, chunks, progress):
            for row in res["rows"]:
                writer.add(*row)
            skipped += res["skipped"]
            kept += res["kept"]
            if name == "train":
                stats[0] += res["sums"]
                stats[1] += res["sq"]
                stats[2] += res["pixels"]
        index[name] = writer.close()
        if not index[name]:
            raise DataError(f"the {name} split of {files.where} is empty after skipping unreadable files")
    rel = [p[len(files.where.rstrip("/")) + 1 :] if p.startswith(files.where) else p for p in skipped]
    source = {
        "files": n,
        "skipped_count": len(skipped),
        "skipped": sorted(rel),
        "image_size": int(size),
        "kept_original_bytes": kept,
        "reencoded_png": n - len(skipped) - kept,
    }
    meta = shard_metadata(spec, "classification", files.classes, size, channels, stats, index, source)
    return _finish(tmp, out, meta)


def shard_metadata(
    spec: DataSpec,
    task: str,
    classes: list[str],
    size: int,
    channels: int,
    stats: list,
    index: dict[str, list[dict[str, Any]]],
    source: dict[str, Any],
) -> dict[str, Any]:
    """``metadata.json`` of a sharded dataset prepared on Ray (image folder or COCO): the per-channel
    mean/std from the train split's ``stats`` (pixel sums, squared sums, pixel count), the split
    sizes and shard index, and what the preparation kept or skipped (``source``)."""
    mean = stats[0] / max(stats[2], 1)
    std = np.sqrt(np.maximum(stats[1] / max(stats[2], 1) - mean**2, 0))
    return {
        "name": spec.name,
        "task": task,
        "classes": classes,
        "num_classes": len(classes),
        "shape": [size, size, channels],
        "image_size": int(size),
        "channels": int(channels),
        "mean": mean.round(6).tolist(),
        "std": np.maximum(std, 1e-6).round(6).tolist(),
        "hflip_ok": True,
        "split_sizes": {k: sum(s["rows"] for s in v) for k, v in index.items()},
        "source": source,
        "format": FORMAT,
        "shards": index,
        "row_group_rows": spec.row_group_rows,
    }


# ----------------------------------------------------------------------------- COCO detection


@dataclass
class CocoFiles:
    """A COCO detection dataset's images: each image's file (None: not found), its annotations
    (``[x, y, w, h]`` boxes, class indices) and the class names."""

    where: str
    images: list[dict[str, Any]]
    paths: list[str | None]
    boxes: list[list[list[float]]]
    labels: list[list[int]]
    classes: list[str]
    filesystem: Any = None  # pyarrow S3FileSystem for s3:// sources, None for local files


def list_coco(spec: DataSpec) -> CocoFiles:
    """``data.source``: a COCO JSON, local or ``s3://bucket/prefix/annotations.json``; image
    ``file_name``s resolve against its folder, or an ``images/`` folder beside it (as ``read_coco``)."""
    if not spec.source:
        raise DataError("kind 'coco' needs data.source: the path (or s3:// URL) of a COCO annotations JSON")
    fs, where = None, spec.source
    if spec.source.startswith("s3://"):
        fs, raw, base, existing, where = _read_s3_coco(spec)
        resolve = lambda name: next(  # noqa: E731
            (p for p in (f"{base}/{name}", f"{base}/images/{name}") if p in existing), None
        )
    else:
        path = Path(spec.source)
        if not path.is_file():
            raise DataError(f"COCO annotations file {path} does not exist")
        raw, base = path.read_bytes(), path.parent
        resolve = lambda name: next(  # noqa: E731
            (str(p) for p in (base / name, base / "images" / name) if p.is_file()), None
        )
    images, by_image, cat_index, classes = coco_index(raw, where)
    paths, boxes, labels = [], [], []
    for im in images:
        paths.append(resolve(im["file_name"]))
        anns = by_image.get(im["id"], [])
        boxes.append([[float(v) for v in a["bbox"]] for a in anns])
        labels.append([cat_index[a["category_id"]] for a in anns])
    return CocoFiles(where, images, paths, boxes, labels, classes, fs)


def _read_s3_coco(spec: DataSpec) -> tuple[Any, bytes, str, set[str], str]:
    """(filesystem, the JSON's bytes, its folder, every object path under that folder, where)."""
    import pyarrow.fs

    from scalelab.data.remote import s3_filesystem

    fs, endpoint = s3_filesystem(spec.endpoint_url)
    path = spec.source[len("s3://") :]
    base = path.rsplit("/", 1)[0]
    where = f"{spec.source} (S3 endpoint {endpoint or 'AWS'})"
    try:
        with fs.open_input_file(path) as f:
            raw = f.read()
        infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True))
    except FileNotFoundError as exc:
        raise DataError(f"COCO annotations file {where} does not exist; fix data.source") from exc
    except OSError as exc:
        if "NO_SUCH_BUCKET" in str(exc):
            raise DataError(f"{where}: bucket {path.split('/', 1)[0]!r} does not exist") from exc
        raise DataError(f"cannot read {where}: {exc}. Check the endpoint, bucket and credentials") from exc
    existing = {i.path for i in infos if i.type == pyarrow.fs.FileType.File}
    return fs, raw, base, existing, where


def encode_coco_chunk(
    fs: Any,
    paths: list[str],
    ids: list[int],
    boxes: list[list[list[float]]],
    labels: list[list[int]],
    size: int,
    channels: int,
    on_bad_file: str,
) -> dict[str, Any]:
    """Read, letterbox (as ``read_coco``: longer side to ``size``, padded right/bottom) and encode a
    chunk of COCO images; rows ``(id, objects, bytes, boxes (K, 4) xyxy px, labels (K,))``, skipped
    files and channel sums. An image already ``size`` square in the right mode keeps its bytes."""
    rows, skipped, kept = [], [], 0
    sums, sq, pixels = np.zeros(channels), np.zeros(channels), 0
    mode = "RGB" if channels == 3 else "L"
    for p, i, bxs, labs in zip(paths, ids, boxes, labels, strict=True):
        try:
            raw = _read_bytes(fs, p)
            img = _open_coco_image(raw)
            arr, scale = letterbox(to_channels(img, channels), size)
            fmt = _as_is_format(raw, size, mode)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            skipped.append(_bad(p, exc, on_bad_file))
            continue
        flat = arr.reshape(-1, channels).astype(np.float64) / 255.0
        sums += flat.sum(0)
        sq += (flat**2).sum(0)
        pixels += len(flat)
        kept_boxes = [(b, lab) for b, lab in zip(bxs, labs, strict=True) if b[2] > 0 and b[3] > 0]
        xyxy = np.array(
            [[x * scale, y * scale, (x + w) * scale, (y + h) * scale] for (x, y, w, h), _ in kept_boxes],
            np.float32,
        ).reshape(-1, 4)
        box_labels = np.array([lab for _, lab in kept_boxes], np.int64)
        rows.append((i, len(kept_boxes), raw if fmt else encode_png(arr), xyxy, box_labels))
        kept += fmt is not None
    return {"rows": rows, "skipped": skipped, "kept": kept, "sums": sums, "sq": sq, "pixels": pixels}


def _open_coco_image(raw: bytes) -> np.ndarray:
    """Decoded fully, as ``read_coco`` loads it: grey and RGB kept, anything else made RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as im:
        return np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)


def prepare_coco_shards(spec: DataSpec, out_dir: str | Path) -> Path:
    """``spec.source`` (a COCO JSON, local or on S3) -> detection shards in ``out_dir``, on Ray."""
    return _on_ray(_prepare_coco, spec, list_coco(spec), Path(out_dir))


def _prepare_coco(spec: DataSpec, files: CocoFiles, out_dir: Path) -> Path:
    """Splits as ``read_coco`` makes them (a seeded shuffle of the listed images: the same split
    when no image is skipped); sample ids are the images' positions in the JSON."""
    n = len(files.images)
    size = spec.image_size or max(max(int(im["height"]), int(im["width"])) for im in files.images)
    channels = spec.channels or 3
    skipped: list[str] = []  # as the JSON names them (file_name)
    names = {p: im["file_name"] for p, im in zip(files.paths, files.images, strict=True)}
    for i, p in enumerate(files.paths):
        if p is None:
            name = files.images[i]["file_name"]
            skipped.append(_bad(name, FileNotFoundError(f"not found beside {files.where}"), spec.on_bad_file))
    order = np.random.default_rng(spec.split_seed).permutation(n)
    n_test = max(1, round(spec.test_fraction * n))
    n_val = round(spec.val_fraction * n)
    parts = {"train": order[n_test + n_val :], "val": order[n_test : n_test + n_val], "test": order[:n_test]}
    if not len(parts["train"]):
        raise DataError(f"{files.where}: {n} images leave none for training after the val/test split")
    out, tmp = _start(out_dir)
    index: dict[str, list[dict[str, Any]]] = {}
    stats, kept, max_boxes = [np.zeros(channels), np.zeros(channels), 0], 0, 0
    progress = _Progress("prepare", n - len(skipped))
    for name in SPLITS:
        idx = np.sort(parts[name])
        idx = idx[np.random.default_rng([spec.split_seed, SPLITS.index(name)]).permutation(len(idx))]
        idx = np.asarray([i for i in idx if files.paths[i] is not None], np.int64)
        writer = DetectionShardWriter(tmp, name, int(spec.shard_mb * 1e6), spec.row_group_rows)
        chunks = [
            (
                files.filesystem,
                [files.paths[i] for i in idx[c : c + CHUNK]],
                idx[c : c + CHUNK].tolist(),
                [files.boxes[i] for i in idx[c : c + CHUNK]],
                [files.labels[i] for i in idx[c : c + CHUNK]],
                size,
                channels,
                spec.on_bad_file,
            )
            for c in range(0, len(idx), CHUNK)
        ]
        for res in _run_chunks(encode_coco_chunk, chunks, progress):
            for sample_id, count, image, boxes, labels in res["rows"]:
                writer.add(sample_id, count, image, boxes, labels)
                max_boxes = max(max_boxes, count)
            skipped += [names[p] for p in res["skipped"]]
            kept += res["kept"]
            if name == "train":
                stats = [stats[0] + res["sums"], stats[1] + res["sq"], stats[2] + res["pixels"]]
        index[name] = writer.close()
        if name == "train" and not index[name]:
            raise DataError(f"the train split of {files.where} is empty after skipping unreadable images")
    source = {
        "coco": files.where,
        "image_size": int(size),
        "files": n,
        "skipped_count": len(skipped),
        "skipped": sorted(skipped),
        "kept_original_bytes": kept,
    }
    meta = shard_metadata(spec, "detection", files.classes, size, channels, stats, index, source)
    meta["max_boxes"] = max_boxes
    return _finish(tmp, out, meta)
