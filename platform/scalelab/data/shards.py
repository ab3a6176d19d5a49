"""The sharded prepared form: Parquet shards of encoded images, for datasets larger than memory.

``data/<name>/`` holds ``metadata.json`` (as the in-memory form, plus ``"format": "shards"`` and a
per-split shard index) and ``<split>/shard-NNNNN.parquet`` files. Each row is one sample:

  id     int64   sample id, unique within the dataset (the source file's index in sorted order)
  label  int64   class index
  image  binary  encoded image (JPEG, PNG, or raw pixels if small), square, ``image_size`` px,
                 ``channels`` channels

Detection datasets (``task: detection``) add two list columns, one entry per object of the image
(``label`` is then the image's object count, as ``Split.y`` is in memory):

  boxes       list<float32>  x1, y1, x2, y2 of each object in pixels, flat (4 values per object)
  box_labels  list<int64>    class index of each object

and ``metadata.json`` records ``max_boxes`` (the most objects in one image), the width to which
streamed batches pad their boxes so every batch has one shape.

Why Parquet: Ray Data, pyarrow and every query engine read it natively, from local disk or S3, and
row groups (``data.row_group_rows`` rows) give readers a unit they can fetch alone: a rank reads
exactly the rows its epoch plan names (:mod:`scalelab.data.stream`).

Which encoding: a source file that is already a JPEG or PNG of the target size and mode is stored
as it is (its original bytes: no re-encoding, no generation loss, and a JPEG decodes ~1.5x faster
than the PNG it would become); anything that must change (resized, cropped, converted) is encoded
as PNG, lossless, so it decodes to exactly the pixels the in-memory form holds. Each shard's index
entry counts its rows per encoding (``formats``). Decoders need no format column: the raw
form's magic or PIL recognises the bytes.

Small images (at most ``RAW_MAX_BYTES`` = 4 KB of pixels: up to 64 px grey, 36 px colour) written
from an in-memory dataset (digits, Fashion-MNIST, npz, scenes) are stored as raw pixels instead of
PNG: ``SLRAW1`` + height, width, channels (``<HHB``) + the pixels' CRC-32 (``<I``) + the uint8
pixels (H, W, C). Decoding is then a view of the bytes (a 28 px PNG costs ~50 us of a decode core;
the raw form, with its CRC, ~1 us), for at most 4 KB a sample (a PNG of a 28 px Fashion-MNIST image is
~0.5 KB, its raw form 0.8 KB). The CRC makes a corrupt raw image as detectable as a corrupt PNG.

Rows are written in a seeded random order (never class by class), so each row group already
mixes classes; per-epoch shuffling on top of it is cheap (see :mod:`scalelab.data.stream`).
Writing is deterministic (no timestamps): the same source gives the same bytes and DVC hash.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.data.dataset import SPLITS, Dataset, Split, metadata_fields, sha256_file
from scalelab.errors import DataError

log = logging.getLogger(__name__)
FORMAT = "shards"
COLUMNS = ("id", "label", "image")
BOX_COLUMNS = ("boxes", "box_labels")  # detection shards only


def encode_png(img: np.ndarray) -> bytes:
    """uint8 (H, W, C) -> PNG bytes (deterministic: no timestamps or text chunks)."""
    from PIL import Image

    arr = img[..., 0] if img.shape[-1] == 1 else img
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


RAW_MAGIC = b"SLRAW1"
RAW_HEADER = struct.Struct("<HHBI")  # height, width, channels, CRC-32 of the pixels
RAW_MAX_BYTES = 4096  # images with at most this many pixel bytes are stored raw (see the module doc)


def encode_raw(img: np.ndarray) -> bytes:
    """uint8 (H, W, C) -> the raw form: magic, shape, CRC-32, pixels."""
    h, w, c = img.shape
    pixels = np.ascontiguousarray(img, np.uint8).tobytes()
    return RAW_MAGIC + RAW_HEADER.pack(h, w, c, zlib.crc32(pixels)) + pixels


def encode_sample(img: np.ndarray) -> tuple[bytes, str]:
    """A sample's stored bytes and their format: "raw" for a small image, else "png"."""
    return (encode_raw(img), "raw") if img.nbytes <= RAW_MAX_BYTES else (encode_png(img), "png")


def _decode_raw(raw: bytes, channels: int) -> np.ndarray:
    start = len(RAW_MAGIC) + RAW_HEADER.size
    h, w, c, crc = RAW_HEADER.unpack_from(raw, len(RAW_MAGIC))
    if len(raw) != start + h * w * c:
        raise ValueError(f"raw image of {len(raw) - start} pixel bytes, its header says {h}x{w}x{c}")
    if c != channels:
        raise ValueError(f"raw image has {c} channel(s), the dataset {channels}")
    view = memoryview(raw)[start:]
    if zlib.crc32(view) != crc:
        raise ValueError("raw image pixels do not match their CRC-32")
    return np.frombuffer(view, np.uint8).reshape(h, w, c)  # read-only view: callers copy into place


def decode_image(raw: bytes, channels: int) -> np.ndarray:
    """Stored image (raw, PNG, JPEG) -> uint8 (H, W, C); raises ValueError or whatever PIL raises
    for a corrupt image."""
    if raw[: len(RAW_MAGIC)] == RAW_MAGIC:
        return _decode_raw(raw, channels)
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(raw)) as img:
        arr = np.asarray(img if img.mode == mode else img.convert(mode), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes one split's rows into shards of about ``target_bytes`` of encoded images each."""

    def __init__(self, root: Path, split: str, target_bytes: int, row_group_rows: int) -> None:
        self.root, self.split = root, split
        self.target_bytes, self.row_group_rows = target_bytes, row_group_rows
        self.shards: list[dict[str, Any]] = []
        self._writer = None
        self._bytes = 0
        self._rows = 0
        self._pending: list[tuple[int, int, bytes]] = []
        self._formats: dict[str, int] = {}  # rows per encoding, of the shard being written
        (root / split).mkdir(parents=True, exist_ok=True)

    def add(self, sample_id: int, label: int, image: bytes, fmt: str = "png") -> None:
        """One row; ``fmt`` names the encoding of ``image`` ("png" or "jpeg"), counted per shard."""
        self._pending.append((int(sample_id), int(label), image))
        self._formats[fmt] = self._formats.get(fmt, 0) + 1
        if len(self._pending) >= self.row_group_rows:
            self._flush_group()

    def _flush_group(self) -> None:
        import pyarrow.parquet as pq

        if not self._pending:
            return
        rows, self._pending = self._pending, []
        table = self._table(rows)
        ids, images = [r[0] for r in rows], [r[2] for r in rows]
        if self._writer is None:
            name = f"{self.split}/shard-{len(self.shards):05d}.parquet"
            self.shards.append({"file": name, "rows": 0, "row_groups": 0, "image_bytes": 0})
            # no compression: PNG is compressed already; no statistics on the image column
            self._writer = pq.ParquetWriter(
                str(self.root / name), table.schema, compression="none", write_statistics=["id", "label"]
            )
        self._writer.write_table(table, row_group_size=len(ids))
        size = sum(len(b) for b in images)
        shard = self.shards[-1]
        shard["rows"] += len(ids)
        shard["row_groups"] += 1
        shard["image_bytes"] += size
        self._bytes += size
        if self._bytes >= self.target_bytes:
            self._close_shard()

    def _table(self, rows: list[tuple]):
        import pyarrow as pa

        ids, labels, images = zip(*rows, strict=True)
        return pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "label": pa.array(labels, pa.int64()),
                "image": pa.array(images, pa.binary()),
            }
        )

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            shard = self.shards[-1]
            path = self.root / shard["file"]
            shard.update(bytes=path.stat().st_size, sha256=sha256_file(path), formats=self._formats)
        self._bytes = 0
        self._formats = {}

    def close(self) -> list[dict[str, Any]]:
        self._flush_group()
        self._close_shard()
        return self.shards


class DetectionShardWriter(ShardWriter):
    """A :class:`ShardWriter` whose rows also carry the image's boxes and their class labels."""

    def add(self, sample_id: int, label: int, image: bytes, boxes=None, box_labels=None) -> None:  # type: ignore[override]
        self._pending.append(
            (
                int(sample_id),
                int(label),
                image,
                np.asarray(boxes, np.float32).reshape(-1).tolist(),
                np.asarray(box_labels, np.int64).tolist(),
            )
        )
        if len(self._pending) >= self.row_group_rows:
            self._flush_group()

    def _table(self, rows: list[tuple]):
        import pyarrow as pa

        table = super()._table([r[:3] for r in rows])
        table = table.append_column("boxes", pa.array([r[3] for r in rows], pa.list_(pa.float32())))
        return table.append_column("box_labels", pa.array([r[4] for r in rows], pa.list_(pa.int64())))


def write_shards(
    ds: Dataset, out_dir: str | Path, shard_mb: float, row_group_rows: int, seed: int = 0
) -> Path:
    """Write an in-memory :class:`Dataset` in the sharded form (atomically, like ``write_prepared``).

    Sample ids are positions in the split as read (train 0.., then val, then test, offset so ids
    are unique across splits); rows go to the shards in a seeded random order.
    """
    if ds.task == "detection":
        return write_detection_shards(ds, out_dir, shard_mb, row_group_rows, seed)
    out, tmp = _start(out_dir)
    index: dict[str, list[dict[str, Any]]] = {}
    offset = 0
    for name in SPLITS:
        split = ds.splits[name]
        writer = ShardWriter(tmp, name, int(shard_mb * 1e6), row_group_rows)
        order = np.random.default_rng([seed, SPLITS.index(name)]).permutation(len(split))
        for i in order:
            writer.add(offset + int(i), int(split.y[i]), *encode_sample(split.x[i]))
        index[name] = writer.close()
        offset += len(split)
    meta = {**ds.metadata(), "format": FORMAT, "shards": index, "row_group_rows": row_group_rows}
    return _finish(tmp, out, meta)


def write_detection_shards(
    ds: Dataset, out_dir: str | Path, shard_mb: float, row_group_rows: int, seed: int = 0
) -> Path:
    """:func:`write_shards` for a detection dataset: each row also holds its image's boxes."""
    out, tmp = _start(out_dir)
    index: dict[str, list[dict[str, Any]]] = {}
    offset, max_boxes = 0, 0
    for name in SPLITS:
        split = ds.splits[name]
        if not split.has_boxes:
            raise DataError(f"detection dataset {ds.name!r}: split {name} has no boxes")
        # the boxes of image i: split.boxes[owner == i], grouped once
        order = np.argsort(split.box_image_index, kind="stable")
        starts = np.searchsorted(split.box_image_index[order], np.arange(len(split) + 1))
        writer = DetectionShardWriter(tmp, name, int(shard_mb * 1e6), row_group_rows)
        for i in np.random.default_rng([seed, SPLITS.index(name)]).permutation(len(split)):
            mine = order[starts[i] : starts[i + 1]]
            max_boxes = max(max_boxes, len(mine))
            writer.add(
                offset + int(i),
                len(mine),
                encode_sample(split.x[i])[0],
                split.boxes[mine],
                split.box_labels[mine],
            )
        index[name] = writer.close()
        offset += len(split)
    meta = {
        **ds.metadata(),
        "format": FORMAT,
        "shards": index,
        "row_group_rows": row_group_rows,
        "max_boxes": max_boxes,
    }
    return _finish(tmp, out, meta)


def _start(out_dir: str | Path) -> tuple[Path, Path]:
    import shutil

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return out, tmp


def _finish(tmp: Path, out: Path, meta: dict[str, Any]) -> Path:
    import shutil

    meta["checksums"] = {s["file"]: s["sha256"] for shards in meta["shards"].values() for s in shards}
    (tmp / "metadata.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# ----------------------------------------------------------------------------- reading


@dataclass
class ShardSplit:
    """One split of a sharded dataset: its shard index, decoded in full only when ``x``/``y`` are
    asked for (evaluation of a bundle, demo samples); training streams it instead."""

    name: str
    shards: list[dict[str, Any]]
    source: ShardSource
    channels: int
    detection: bool = False  # rows carry boxes (see BOX_COLUMNS)
    _decoded: Split | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return sum(int(s["rows"]) for s in self.shards)

    def ids(self) -> np.ndarray:
        return np.concatenate([self.source.read_columns(s, ["id"])["id"] for s in self.shards])

    def decoded(self) -> Split:
        if self._decoded is None:
            xs, ys, boxes, box_labels = [], [], [], []
            extra = list(BOX_COLUMNS) if self.detection else []
            for shard in self.shards:
                cols = self.source.read_columns(shard, ["id", "label", "image", *extra])
                xs.append(decode_rows(cols, self.channels, shard["file"]))
                ys.append(cols["label"])
                if self.detection:
                    boxes += [np.asarray(b, np.float32).reshape(-1, 4) for b in cols["boxes"]]
                    box_labels += [np.asarray(b, np.int64) for b in cols["box_labels"]]
            y = np.concatenate(ys).astype(np.int64)
            if not self.detection:
                self._decoded = Split(np.concatenate(xs), y)
            else:  # the flat in-memory layout: all boxes, each with the index of its image
                self._decoded = Split(
                    np.concatenate(xs),
                    y,
                    boxes=np.concatenate(boxes).reshape(-1, 4) if boxes else np.zeros((0, 4), np.float32),
                    box_labels=np.concatenate(box_labels) if box_labels else np.zeros(0, np.int64),
                    box_image_index=np.repeat(np.arange(len(y)), [len(b) for b in box_labels]),
                )
        return self._decoded

    @property
    def x(self) -> np.ndarray:
        return self.decoded().x

    @property
    def y(self) -> np.ndarray:
        return self.decoded().y

    @property
    def has_boxes(self) -> bool:
        return self.detection

    @property
    def boxes(self) -> np.ndarray | None:
        return self.decoded().boxes

    @property
    def box_labels(self) -> np.ndarray | None:
        return self.decoded().box_labels

    @property
    def box_image_index(self) -> np.ndarray | None:
        return self.decoded().box_image_index


def decode_rows(cols: dict[str, Any], channels: int, where: str) -> np.ndarray:
    """Decode the ``image`` column -> uint8 (N, H, W, C); a corrupt image names its shard and id."""
    out = []
    for sid, raw in zip(cols["id"], cols["image"], strict=True):
        try:
            out.append(decode_image(raw, channels))
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
            raise DataError(
                f"corrupt image (sample id {int(sid)}) in shard {where}: {type(exc).__name__}: {exc}. "
                f"The shard changed after preparing: run `dvc checkout` / `scalelab data prepare` again"
            ) from exc
    return np.stack(out)


@dataclass
class ShardSource:
    """Where a sharded dataset's files are: a local folder, or objects on S3 (``urls`` maps each
    shard's relative path to its object, e.g. DVC's content-addressed ``files/md5/xx/yyyy``).

    Reads from S3 survive an outage of the store: a read that fails with a network or server error
    (after pyarrow's own retries: ~3 s at most for the stream source's 3 attempts, jittered, per
    request) is tried again with exponential backoff (0.5 s doubling
    to 8 s) for up to ``retry_s`` seconds (``data.read_retry_s``), then fails with a
    :class:`DataError` naming the endpoint. The read restarts from the shard's footer each time, so
    a retried read returns exactly the rows asked for: an outage can delay an epoch, never shorten it.
    """

    root: str
    filesystem: Any = None  # pyarrow.fs.FileSystem for S3, None for local files
    urls: dict[str, str] = field(default_factory=dict)
    endpoint: str | None = None  # the S3 endpoint, for messages (None: AWS itself)
    retry_s: float = 120.0

    def locate(self, relpath: str) -> str:
        return self.urls.get(relpath) or str(Path(self.root) / relpath)

    def open(self, shard: dict[str, Any]):
        import pyarrow.parquet as pq

        where = self.locate(shard["file"])
        try:
            if self.filesystem is None:
                return pq.ParquetFile(where)
            return pq.ParquetFile(self.filesystem.open_input_file(where))
        except FileNotFoundError as exc:
            raise DataError(
                f"shard {shard['file']} is missing ({where}); run `dvc pull` / `dvc checkout` or "
                f"`scalelab data prepare` again"
            ) from exc
        except OSError:
            raise  # the store did not answer (S3: retried by read_columns)
        except Exception as exc:  # noqa: BLE001 - pyarrow: not a Parquet file (truncated, replaced)
            raise DataError(
                f"shard {shard['file']} at {where} is not a readable Parquet file ({exc}); "
                f"run `dvc checkout` / `scalelab data prepare` again"
            ) from exc

    def read_columns(
        self, shard: dict[str, Any], columns: list[str], row_groups: list[int] | None = None
    ) -> dict[str, Any]:
        """Columns of a shard (or of some of its row groups) as numpy arrays / lists of bytes."""
        failed_at, delay = None, 0.5
        while True:
            try:
                table = self._read(shard, columns, row_groups)
                break
            except OSError as exc:
                if self.filesystem is None or isinstance(exc, FileNotFoundError):
                    raise DataError(
                        f"cannot read shard {shard['file']} at {self.locate(shard['file'])}: {exc}"
                    ) from exc
                now = time.monotonic()
                failed_at = failed_at or now
                if now - failed_at + delay > self.retry_s:
                    raise DataError(self._outage_message(shard, now - failed_at, exc)) from exc
                if delay == 0.5:
                    log.warning(
                        "reading shard %s from s3://%s (endpoint %s) failed: %s; retrying for up to %.0f s",
                        shard["file"],
                        self.locate(shard["file"]),
                        self.endpoint or "AWS",
                        exc,
                        self.retry_s,
                    )
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        if failed_at is not None:
            log.warning(
                "read shard %s after %.1f s of retries (endpoint %s)",
                shard["file"],
                time.monotonic() - failed_at,
                self.endpoint or "AWS",
            )
        out: dict[str, Any] = {}
        for c in columns:
            col = table.column(c)
            out[c] = col.to_pylist() if c == "image" else col.to_numpy()
        return out

    def _read(self, shard: dict[str, Any], columns: list[str], row_groups: list[int] | None):
        pf = self.open(shard)
        try:
            return pf.read(columns) if row_groups is None else pf.read_row_groups(row_groups, columns)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DataError(
                f"cannot read shard {shard['file']} ({self.locate(shard['file'])}): {exc}"
            ) from exc

    def _outage_message(self, shard: dict[str, Any], waited: float, exc: BaseException) -> str:
        return (
            f"cannot read shard {shard['file']} from s3://{self.locate(shard['file'])}: the S3 endpoint "
            f"{self.endpoint or 'AWS S3'} did not answer for {waited:.0f} s of retries "
            f"(data.read_retry_s={self.retry_s:g}): {exc}. Check that the endpoint is up, then run the "
            f"same command again (same train.run_name): training resumes from its last checkpoint, at "
            f"the exact sample where it stopped with train.checkpoint_every_steps"
        )


def verify_shards(root: Path, meta: dict[str, Any]) -> None:
    """Every shard of the index is present and matches its sha256 (local folders)."""
    for split, shards in meta["shards"].items():
        for shard in shards:
            path = root / shard["file"]
            if not path.is_file():
                raise DataError(
                    f"shard {path} ({split}) is missing; run `dvc pull` / `dvc checkout {root}` or "
                    f"`scalelab data prepare` again"
                )
            if sha256_file(path) != shard["sha256"]:
                raise DataError(
                    f"shard {path} does not match its checksum in {root / 'metadata.json'}: it changed "
                    f"after preparing; run `dvc checkout {root}` or `scalelab data prepare` again"
                )


def is_sharded(path: str | Path) -> bool:
    meta = Path(path) / "metadata.json"
    return meta.is_file() and json.loads(meta.read_text()).get("format") == FORMAT


@dataclass
class StreamDataset(Dataset):
    """A sharded dataset: the same metadata as :class:`Dataset`, splits read from shards."""

    meta: dict[str, Any] = field(default_factory=dict)
    source: ShardSource | None = None
    reader: str = "local"  # "ray": the train epoch plan runs as Ray Data tasks (in Ray Train workers)

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    def metadata(self) -> dict[str, Any]:
        keep = ("name", "task", "classes", "num_classes", "shape", "image_size", "channels", "mean", "std")
        return {
            **{k: self.meta[k] for k in keep},
            "hflip_ok": self.hflip_ok,
            "split_sizes": {k: len(v) for k, v in self.splits.items()},
            "format": FORMAT,
            **({"source": self.source_report} if self.source_report else {}),
        }


def open_sharded(root: str | Path, verify: bool = True, source: ShardSource | None = None) -> StreamDataset:
    """A sharded dataset from its folder (``metadata.json`` + shards), checksums verified."""
    root = Path(root)
    meta = json.loads((root / "metadata.json").read_text())
    if source is None:
        if verify:
            verify_shards(root, meta)
        source = ShardSource(str(root.resolve()))
    return stream_dataset(meta, source)


def stream_dataset(meta: dict[str, Any], source: ShardSource) -> StreamDataset:
    channels = int(meta["channels"])
    detection = meta.get("task") == "detection"
    splits = {name: ShardSplit(name, meta["shards"][name], source, channels, detection) for name in SPLITS}
    return StreamDataset(
        splits=splits,  # type: ignore[arg-type]  # ShardSplit reads like Split
        **metadata_fields(meta),
        meta=meta,
        source=source,
    )
