"""Dataset catalog: each kind reads raw data into a :class:`Dataset` with seeded splits.

The readers live in :mod:`scalelab.data.sources` (classification) and :mod:`scalelab.data.scenes`
(detection); :data:`READERS` names them all, explicitly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from scalelab.config.specs import DataSpec
from scalelab.data import scenes, sources
from scalelab.data.dataset import Dataset, DataVersion, write_prepared
from scalelab.errors import DataError

log = logging.getLogger("scalelab.data")

# Every dataset kind and its reader, in one table: a new kind is a reader function and one line here.
READERS: dict[str, Callable[[DataSpec], Dataset]] = {
    **sources.CLASSIFICATION_READERS,
    "scenes": scenes.read_scenes,
    "coco": scenes.read_coco,
}


def read_raw(spec: DataSpec) -> Dataset:
    """Read a dataset from its raw source with the catalog reader of its kind."""
    if spec.kind not in READERS:
        raise DataError(f"unknown dataset kind {spec.kind!r}; known: {', '.join(sorted(READERS))}")
    return READERS[spec.kind](spec)


def prepared_path(spec: DataSpec) -> Path:
    return Path(spec.data_dir) / spec.name


def memory_budget_mb(spec: DataSpec, worker_memory_mb: float | None = None) -> tuple[float, str]:
    """What one training worker may spend on data, and where that figure comes from: the smaller of
    ``data.memory_budget_mb`` and the memory Ray reserves per worker (``train.memory_per_worker_mb``,
    passed as ``worker_memory_mb``), else a quarter of this machine's memory."""
    given = [
        (float(v), name)
        for v, name in (
            (spec.memory_budget_mb, "data.memory_budget_mb"),
            (worker_memory_mb, "train.memory_per_worker_mb, Ray's memory resource per worker"),
        )
        if v
    ]
    if given:
        return min(given)
    import os

    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e6
    return machine / 4, "a quarter of this machine's memory: set data.memory_budget_mb to change it"


def choose_format(
    spec: DataSpec, decoded_train_mb: float, worker_memory_mb: float | None = None
) -> tuple[str, str]:
    """(``memory`` | ``stream``, the reason) for a train split of ``decoded_train_mb`` decoded."""
    budget, _ = memory_budget_mb(spec, worker_memory_mb)
    if spec.format != "auto":
        return spec.format, f"data.format={spec.format} in the recipe"
    if decoded_train_mb <= budget / 2:
        return "memory", (
            f"auto: the decoded train split ({decoded_train_mb:,.1f} MB) fits in half the worker "
            f"memory budget ({budget:,.0f} MB)"
        )
    return "stream", (
        f"auto: the decoded train split ({decoded_train_mb:,.1f} MB) exceeds half the worker memory "
        f"budget ({budget:,.0f} MB): streaming shards"
    )


def _estimate_imagefolder_mb(spec: DataSpec) -> float:
    """Decoded size of an image folder's train split, from the file count and a few headers."""
    from scalelab.data.prepare_stream import list_source

    files = list_source(spec)
    size = spec.image_size
    if size is None:
        from PIL import Image

        sides = []
        for path in files.paths[:: max(1, len(files.paths) // 16)][:16]:
            try:
                if files.filesystem is None:
                    with Image.open(path) as img:
                        sides.append(min(img.size))
                else:
                    with files.filesystem.open_input_file(path) as f, Image.open(f) as img:
                        sides.append(min(img.size))
            except Exception:  # noqa: BLE001 - unreadable files are dealt with while preparing
                continue
        size = max(sides) if sides else 32
    train_share = 1 - spec.val_fraction - spec.test_fraction
    return len(files.paths) * train_share * size * size * (spec.channels or 3) / 1e6


def _estimate_coco_mb(spec: DataSpec) -> float:
    """Decoded size of a COCO dataset's train split, from its JSON alone (image count and sizes)."""
    from scalelab.data.prepare_stream import list_coco

    images = list_coco(spec).images
    size = spec.image_size or max(max(int(im["height"]), int(im["width"])) for im in images)
    train_share = 1 - spec.val_fraction - spec.test_fraction
    return len(images) * train_share * size * size * (spec.channels or 3) / 1e6


def prepare(spec: DataSpec) -> Path:
    """Materialise the dataset into ``data_dir/name``: arrays (memory) or Parquet shards (stream).

    The format (``data.format``; ``auto`` decides by size) and the reason are logged and kept in
    ``metadata.json`` (``format_reason``).
    """
    from scalelab.data.shards import write_shards

    out = prepared_path(spec)
    if spec.kind in ("imagefolder", "coco") and spec.format != "memory":  # parallel, on Ray, local or S3
        from scalelab.data.prepare_stream import prepare_coco_shards, prepare_imagefolder_shards

        estimate = _estimate_imagefolder_mb if spec.kind == "imagefolder" else _estimate_coco_mb
        fmt, reason = choose_format(spec, estimate(spec) if spec.format == "auto" else 0)
        if (spec.source or "").startswith("s3://") and fmt == "memory":  # the readers read local files
            fmt, reason = "stream", "auto: an S3 source is prepared on Ray, in the stream format"
        if fmt == "stream":
            log.warning("data format for %r: stream (%s)", spec.name, reason)
            shards = prepare_imagefolder_shards if spec.kind == "imagefolder" else prepare_coco_shards
            return _note_reason(shards(spec, out), reason)
    ds = read_raw(spec)
    fmt, reason = choose_format(spec, ds.splits["train"].x.nbytes / 1e6)
    log.warning("data format for %r: %s (%s)", spec.name, fmt, reason)
    if fmt == "stream":
        return _note_reason(
            write_shards(ds, out, spec.shard_mb, spec.row_group_rows, spec.split_seed), reason
        )
    return write_prepared(ds, out)  # metadata unchanged: existing versions keep their hash


def _note_reason(path: Path, reason: str) -> Path:
    import json

    meta_path = path / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["format_reason"] = reason
    meta_path.write_text(json.dumps(meta, indent=2))
    return path


def load_dataset(
    spec: DataSpec, prepare_if_missing: bool = True, version: DataVersion | None = None
) -> Dataset:
    """The prepared dataset with its :class:`DataVersion` set.

    With ``version`` (handed from the driver to workers): exactly that version, read locally or
    through DVC, never re-prepared. Without: ``data_dir/name``, prepared when absent (preparing is
    deterministic, so the result matches dvc.lock when the recipe does); refused when it no longer
    matches what DVC recorded.
    """
    from scalelab.data.versioning import load_data_version, read_any, resolve_data_version

    if version is not None:
        return load_data_version(version, local=prepared_path(spec))
    if spec.stream_from == "remote":  # the recorded version, straight from the DVC remote
        from scalelab.data.stream_source import load_remote_stream

        return load_remote_stream(spec)
    path = prepared_path(spec)
    if not (path / "metadata.json").exists():
        if not prepare_if_missing:
            raise DataError(
                f"no prepared dataset at {path}; run `scalelab data prepare <recipe>` "
                f"(or `dvc pull {path}` where it is tracked by DVC)"
            )
        log.warning(
            "dataset %r is not prepared at %s: preparing it now from %s (kind %s). It is not "
            "versioned until `dvc add %s` and a `git commit` record it",
            spec.name,
            path,
            spec.source or "the built-in source",
            spec.kind,
            path,
        )
        prepare(spec)
    version = resolve_data_version(spec)
    data = read_any(path)
    _check_format(spec, data, path)
    data.version = version
    if getattr(data, "meta", {}).get("format") == "shards":
        version.format, version.format_reason = "stream", data.meta.get("format_reason")
    else:
        version.format = "memory"
        version.format_reason = choose_format(spec, data.splits["train"].x.nbytes / 1e6)[1]
    return data


def _check_format(spec: DataSpec, data: Dataset, path: Path) -> None:
    have = "stream" if getattr(data, "meta", {}).get("format") == "shards" else "memory"
    if spec.format not in ("auto", have):
        raise DataError(
            f"{path} is prepared in the {have} format but the recipe asks for data.format={spec.format}; "
            f"run `scalelab data prepare <recipe>` again (or set data.format=auto)"
        )
