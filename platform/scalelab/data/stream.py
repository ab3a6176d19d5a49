"""Streaming a sharded dataset to training: a deterministic per-epoch plan, read by Ray Data.

Ray Data's iterators cannot resume mid-epoch (ray-project/ray#37633), so the order of an epoch is
ours, computed from ``(seed, epoch)`` alone:

1. the split's row groups (``data.row_group_rows`` rows each, across all shards) are permuted;
2. consecutive windows of ``data.shuffle_window`` row groups have their samples permuted;
3. the resulting sequence is cut into ``world_size`` contiguous parts, one per rank, each trimmed
   to whole micro-batches (drop_last: every rank takes the same number of steps).

Each rank reads only its part (reads are per window: a few row groups of a few shards). Resuming
after ``k`` consumed samples is dropping the first ``k`` entries of the rank's part: no sample is
seen twice, none skipped. Augmentation is seeded per window, so a resumed epoch even repeats the
same crops and flips.

Shuffle quality: samples are written to shards in a seeded random order (prepare), so every row
group already mixes classes; per epoch a sample moves to a random row-group position and is mixed
within a window of ``shuffle_window x row_group_rows`` samples (2,048 by default). Neighbouring
batches therefore share row groups more often than under a full shuffle -- fine for SGD with
class-mixed row groups (the accuracy test checks it against the in-memory full shuffle).

Two executions of the same plan: :class:`PlanLoader` decodes in this process (``train.workers=0``,
pure pyarrow + PIL), :class:`RayDataLoader` turns the plan's windows into a Ray Data dataset whose
``map_batches`` tasks read, decode and augment into uint8 (CPU nodes feed the GPU workers), read
back in plan order (``preserve_order``) with ``iter_torch_batches``.

Detection shards (rows with boxes) go through the same plan, counter and loaders: a window's
boxes are padded to the dataset's ``max_boxes`` (so Ray Data carries them as fixed-shape tensor
columns), flipped with their images (the only detection-safe augmentation), and the loaders yield
``(x, BoxTargets)`` exactly as the in-memory ``DetectionLoader`` does; targets' ``image_ids`` are
the sample ids, unique across splits and ranks, so mAP gathers every image once.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from scalelab.artifacts.preprocess import pixel_scale
from scalelab.config.specs import AugmentSpec
from scalelab.data.shards import BOX_COLUMNS, ShardSource, ShardSplit, decode_image, decode_rows
from scalelab.errors import DataError
from scalelab.models.detection_loss import BoxTargets

EVAL_BATCH = 256


# ----------------------------------------------------------------------------- the plan


@dataclass
class Window:
    """Samples of a few row groups in a fixed order: ``groups`` [(shard, row group)], ``order``
    indexes the concatenation of their rows."""

    groups: list[tuple[int, int]]
    order: np.ndarray

    def part(self, start: int, stop: int) -> Window:
        return Window(self.groups, self.order[start:stop])


def row_groups(shards: list[dict[str, Any]], row_group_rows: int) -> list[tuple[int, int, int]]:
    """(shard index, row group index, rows) of every row group of a split, in file order."""
    out = []
    for s, shard in enumerate(shards):
        rows = int(shard["rows"])
        for g in range(int(shard["row_groups"])):
            out.append((s, g, min(row_group_rows, rows - g * row_group_rows)))
    return out


def epoch_windows(
    shards: list[dict[str, Any]], row_group_rows: int, seed: int, epoch: int, window: int
) -> list[Window]:
    """The whole split's order for an epoch: permuted row groups, samples mixed per window."""
    rng = np.random.default_rng([seed, epoch, 0x5CA1E])
    groups = row_groups(shards, row_group_rows)
    perm = rng.permutation(len(groups))
    out = []
    for w in range(0, len(perm), window):
        chosen = [groups[i] for i in perm[w : w + window]]
        n = sum(rows for _, _, rows in chosen)
        chosen.sort()  # read order: shard by shard (see read_window)
        out.append(Window([(s, g) for s, g, _ in chosen], rng.permutation(n)))
    return out


@dataclass
class RankPlan:
    """One rank's part of one epoch: ``windows`` (sliced to the part), ``samples`` in all."""

    epoch: int
    windows: list[Window]
    samples: int
    start: int = 0  # samples consumed before this plan starts (resume)


def rank_plan(
    shards: list[dict[str, Any]],
    row_group_rows: int,
    *,
    seed: int,
    epoch: int,
    window: int,
    rank: int,
    world_size: int,
    batch: int,
    skip: int = 0,
) -> RankPlan:
    """Rank ``rank``'s contiguous part of the epoch, whole micro-batches only, minus the first
    ``skip`` samples (already consumed before a resume)."""
    windows = epoch_windows(shards, row_group_rows, seed, epoch, window)
    total = sum(len(w.order) for w in windows)
    per_rank = total // world_size
    samples = (per_rank // batch) * batch
    if samples == 0:
        raise DataError(
            f"the training split has {total} samples: too few for {world_size} worker(s) x a micro-batch "
            f"of {batch}; lower train.batch_size or train.workers"
        )
    lo, hi = rank * per_rank + skip, rank * per_rank + samples
    part, pos = [], 0
    for w in windows:
        a, b = pos, pos + len(w.order)
        pos = b
        if b <= lo or a >= hi:
            continue
        part.append(w.part(max(lo, a) - a, min(hi, b) - a))
    return RankPlan(epoch, part, samples, start=skip)


def planned_ids(
    source: ShardSource,
    shards: list[dict[str, Any]],
    row_group_rows: int,
    *,
    seed: int,
    epoch: int,
    window: int,
    rank: int,
    world_size: int,
    batch: int,
) -> list[int]:
    """The sample ids of ``rank``'s part of an epoch, in plan order, from the id column alone (no
    image is decoded): what a correct run consumes in that epoch, each once. Tests and the
    resume benchmark compare the sample log against it."""
    ids = [source.read_columns(s, ["id"])["id"] for s in shards]
    plan = rank_plan(
        shards,
        row_group_rows,
        seed=seed,
        epoch=epoch,
        window=window,
        rank=rank,
        world_size=world_size,
        batch=batch,
    )
    out: list[int] = []
    for w in plan.windows:  # a window's order indexes its row groups' rows, shard by shard
        rows = np.concatenate([ids[s][g * row_group_rows : (g + 1) * row_group_rows] for s, g in w.groups])
        out += rows[w.order].tolist()
    return out


# ----------------------------------------------------------------------------- reading a window


def read_window(source: ShardSource, shards: list[dict[str, Any]], win: Window):
    """A window's samples in its order, still encoded: (ids (N,), labels (N,), [bytes] * N, where)."""
    by_shard: dict[int, list[int]] = {}
    for s, g in win.groups:  # sorted by (shard, group): one read per shard, concatenated in order
        by_shard.setdefault(s, []).append(g)
    ids, labels, raws, files = [], [], [], []
    for s, gs in by_shard.items():
        cols = source.read_columns(shards[s], ["id", "label", "image"], row_groups=gs)
        ids.append(cols["id"])
        labels.append(cols["label"])
        raws.extend(cols["image"])
        files.append(shards[s]["file"])
    sel = win.order
    picked = [raws[i] for i in sel]
    return np.concatenate(ids)[sel], np.concatenate(labels)[sel].astype(np.int64), picked, " or ".join(files)


def augment_floats(x: np.ndarray, augment: AugmentSpec, seed: list[int]) -> torch.Tensor:
    """uint8 (N, H, W, C) -> augmented float pixels (N, C, H, W) in [0, 255]: the general path,
    needed for ``augment.rescale`` (resampling makes fractions); :func:`decode_augment` is the fast one."""
    from scalelab.data.loader import augment_batch

    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float()
    return augment_batch(t, augment, _generator(seed))


def _generator(seed: list[int]) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))


@dataclass
class Draws:
    """One window's augmentation draws, taken from the generator in ``augment_batch``'s order (so
    both paths give the same crops, flips and erasures): per sample, crop offsets into the padded
    image, a flip, and an erased box."""

    dy: np.ndarray
    dx: np.ndarray
    flip: np.ndarray
    erase: np.ndarray
    y0: np.ndarray
    x0: np.ndarray
    eh: np.ndarray
    ew: np.ndarray

    @classmethod
    def take(cls, n: int, h: int, w: int, aug: AugmentSpec | None, gen: torch.Generator) -> Draws:
        zeros, no = np.zeros(n, np.int64), np.zeros(n, bool)
        dy = dx = zeros
        flip = erase = no
        y0 = x0 = eh = ew = zeros
        if aug is not None and aug.crop_padding:
            p = aug.crop_padding
            dy = torch.randint(0, 2 * p + 1, (n,), generator=gen).numpy()
            dx = torch.randint(0, 2 * p + 1, (n,), generator=gen).numpy()
        if aug is not None and aug.hflip:
            flip = (torch.rand(n, generator=gen) < 0.5).numpy()
        if aug is not None and aug.random_erasing > 0:
            erase = (torch.rand(n, generator=gen) < aug.random_erasing).numpy()
            teh = torch.randint(h // 4, h // 2 + 1, (n,), generator=gen)
            tew = torch.randint(w // 4, w // 2 + 1, (n,), generator=gen)
            y0 = (torch.rand(n, generator=gen) * (h - teh + 1)).long().numpy()
            x0 = (torch.rand(n, generator=gen) * (w - tew + 1)).long().numpy()
            eh, ew = teh.numpy(), tew.numpy()
        return cls(dy, dx, flip, erase, y0, x0, eh, ew)


def decode_augment(
    raws: list[bytes],
    ids: np.ndarray,
    channels: int,
    augment: AugmentSpec | None,
    seed: list[int],
    where: str,
) -> np.ndarray:
    """Encoded images -> augmented uint8 (N, C, H, W), each decoded straight into its place.

    Crop, flip and erasing move or zero whole pixels, so on uint8 they give exactly what
    :func:`augment_floats` gives on floats, at a quarter of the memory traffic; the float conversion
    and normalisation happen once per batch where the batch is consumed (:func:`normalise_batch`),
    on the training device. Random crop = the image shifted by (pad - offset) with zeros where it
    left the frame; a flip writes through a column-reversed view of the output."""
    n = len(raws)
    first = _decode(raws[0], channels, ids[0], where)
    h, w, c = first.shape
    p = augment.crop_padding if augment is not None else 0
    d = Draws.take(n, h, w, augment, _generator(seed))
    out = np.zeros((n, c, h, w), np.uint8)  # (N, C, H, W); zeros: the padding a crop lets in
    for i in range(n):
        img = first if i == 0 else _decode(raws[i], channels, ids[i], where)  # (H, W, C)
        if img.shape != first.shape:
            raise DataError(
                f"image of sample id {int(ids[i])} in shard {where} is {img.shape[1]}x{img.shape[0]}x"
                f"{img.shape[2]}, the others {w}x{h}x{c}: the shard changed after preparing; run "
                f"`dvc checkout` / `scalelab data prepare` again"
            )
        dst = out[i, :, :, ::-1] if d.flip[i] else out[i]
        oy, ox = p - int(d.dy[i]), p - int(d.dx[i])  # output row r shows image row r - oy
        r0, r1, c0, c1 = max(0, oy), min(h, h + oy), max(0, ox), min(w, w + ox)
        dst[:, r0:r1, c0:c1] = img[r0 - oy : r1 - oy, c0 - ox : c1 - ox].transpose(2, 0, 1)
        if d.erase[i]:
            out[i, :, d.y0[i] : d.y0[i] + d.eh[i], d.x0[i] : d.x0[i] + d.ew[i]] = 0
    return out


def _decode(raw: bytes, channels: int, sample_id: Any, where: str) -> np.ndarray:
    try:
        return decode_image(raw, channels)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise DataError(
            f"corrupt image (sample id {int(sample_id)}) in shard {where}: {type(exc).__name__}: {exc}. "
            f"The shard changed after preparing: run `dvc checkout` / `scalelab data prepare` again"
        ) from exc


def normalise_batch(x: torch.Tensor, mean_px: torch.Tensor, std_px: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float (B, C, H, W): one conversion, then in place (the same
    arithmetic as ``normalise_tensor``, without two more temporaries)."""
    return x.float().sub_(mean_px).div_(std_px)


# ----------------------------------------------------------------------------- detection


def window_columns(
    source: ShardSource, shards: list[dict[str, Any]], win: Window, columns: list[str]
) -> tuple[dict[str, Any], str]:
    """A window's rows of (non-image) ``columns`` in its order, one read per shard, and where from."""
    by_shard: dict[int, list[int]] = {}
    for s, g in win.groups:
        by_shard.setdefault(s, []).append(g)
    parts = [source.read_columns(shards[s], columns, row_groups=gs) for s, gs in by_shard.items()]
    cols = {c: np.concatenate([p[c] for p in parts])[win.order] for c in columns}
    return cols, " or ".join(shards[s]["file"] for s in by_shard)


def decode_detection_window(
    cfg: StreamConfig, win: Window, epoch: int, rank: int, index: int
) -> dict[str, np.ndarray]:
    """A detection window: the images exactly as :func:`decode_window` gives a classification
    window (``y`` is then each image's object count), plus its boxes padded to ``max_boxes`` per
    image, flipped where the image was flipped."""
    out = decode_window(replace(cfg, detection=False), win, epoch, rank, index)
    cols, _ = window_columns(cfg.source, cfg.shards, win, list(BOX_COLUMNS))
    n, width = len(out["y"]), out["x"].shape[-1]  # x: (N, C, H, W)
    pad = max(1, cfg.max_boxes)  # never a zero-width tensor column
    boxes = np.zeros((n, pad, 4), np.float32)
    labels = np.zeros((n, pad), np.int64)
    for i, (b, lab) in enumerate(zip(cols["boxes"], cols["box_labels"], strict=True)):
        boxes[i, : len(lab)] = np.asarray(b, np.float32).reshape(-1, 4)
        labels[i, : len(lab)] = lab
    if cfg.augment is not None and cfg.augment.hflip:
        # hflip is detection's only augmentation, so its draw is the window generator's first (as
        # in augment_batch): the same seed gives the same flips the images got
        seed = [cfg.seed, epoch, rank, index, int(win.order[0]) if len(win.order) else 0]
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        f = (torch.rand(n, generator=gen) < 0.5).numpy()
        x1 = boxes[f, :, 0].copy()
        boxes[f, :, 0] = width - boxes[f, :, 2]  # x2 is exclusive: [x1, x2) mirrors to [W - x2, W - x1)
        boxes[f, :, 2] = width - x1
    return {**out, "boxes": boxes, "box_labels": labels}


def box_targets(batch: dict[str, Any]) -> BoxTargets:
    """A detection batch (numpy or torch columns, boxes padded) -> BoxTargets (on the CPU)."""
    counts = torch.as_tensor(batch["y"]).tolist()
    boxes, labels = torch.as_tensor(batch["boxes"]), torch.as_tensor(batch["box_labels"])
    return BoxTargets(
        [boxes[i, :m] for i, m in enumerate(counts)],
        [labels[i, :m] for i, m in enumerate(counts)],
        torch.as_tensor(batch["id"]).cpu(),
        int(batch["x"].shape[-1]),
    )


# ----------------------------------------------------------------------------- loaders


@dataclass
class StreamConfig:
    """Everything a reader needs, small and picklable (it travels into Ray Data tasks)."""

    source: ShardSource
    shards: list[dict[str, Any]]
    row_group_rows: int
    channels: int
    mean: list[float]
    std: list[float]
    augment: AugmentSpec | None = None
    seed: int = 0
    detection: bool = False  # rows carry boxes: batches add padded "boxes" / "box_labels"
    max_boxes: int = 0  # the most objects in one image (metadata.json): the padded width
    object_store_mb: float | None = None  # Ray Data reader: object-store bound (data.stream_object_store_mb)


def decode_window(cfg: StreamConfig, win: Window, epoch: int, rank: int, index: int) -> dict[str, np.ndarray]:
    """A window read, decoded and augmented: ``x`` pixels (N, C, H, W) in [0, 255], not normalised
    (uint8; float only after ``augment.rescale``), ``y`` labels, ``id`` sample ids. Blocks stay uint8
    through Ray's object store (4x smaller than floats); the consumer normalises per batch."""
    if cfg.detection:
        return decode_detection_window(cfg, win, epoch, rank, index)
    ids, labels, raws, where = read_window(cfg.source, cfg.shards, win)
    seed = [cfg.seed, epoch, rank, index, int(win.order[0]) if len(win.order) else 0]
    if cfg.augment is not None and cfg.augment.rescale is not None:
        x = augment_floats(decode_rows({"id": ids, "image": raws}, cfg.channels, where), cfg.augment, seed)
        return {"x": x.numpy(), "y": labels, "id": ids}
    return {"x": decode_augment(raws, ids, cfg.channels, cfg.augment, seed, where), "y": labels, "id": ids}


class _StreamLoaderBase:
    """The loader interface ``fit`` uses: ``set_epoch``, ``start_at``, ``len``, iteration."""

    def __init__(
        self,
        cfg: StreamConfig,
        batch_size: int,
        *,
        window: int,
        rank: int,
        world_size: int,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        sample_log: str | None = None,
    ) -> None:
        self.cfg, self.batch_size, self.window = cfg, batch_size, window
        self.rank, self.world_size = rank, world_size
        self.device, self.channels_last = torch.device(device), channels_last
        self.mean_px, self.std_px = pixel_scale(cfg.mean, cfg.std, device=self.device)
        self.epoch, self.skip = 0, 0
        self.sample_log = sample_log
        self.consumed = 0
        self.ahead: ReaderAhead | None = None  # an epoch's reader started early (see prefetch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.skip = epoch, 0

    def prefetch(self, epoch: int, skip: int = 0) -> None:
        """Start the reader of ``epoch`` (resuming after ``skip`` samples) now, in a background
        thread, up to its first batch: ``fit`` calls this while the previous epoch is evaluated (and
        before the first epoch), so the reader's start-up -- a Ray Data dataset and its execution,
        decode tasks, the first windows -- runs during evaluation instead of at the epoch's start.
        The epoch then iterates exactly what ``set_epoch(epoch); start_at(skip)`` would give (the
        same plan); an iteration of another epoch or position discards it."""
        self.close()
        plan = self._plan(epoch, skip)
        self.ahead = ReaderAhead((epoch, skip), plan, self.open_reader)

    def close(self) -> None:
        """Stop a reader started ahead and not used (a run that stops early)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            ahead.close()

    def reader(self) -> tuple[RankPlan, Iterator[Any]]:
        """The current epoch's plan and its reader's items: the one started ahead when it was
        started for this epoch and position, else a new one."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead.key == (self.epoch, self.skip):
            return ahead.plan, ahead.items()
        if ahead is not None:
            ahead.close()
        plan = self.plan()
        return plan, iter(self.open_reader(plan))

    def open_reader(self, plan: RankPlan) -> Iterable[Any]:
        """The items of ``plan``'s reader: decoded blocks (merged into batches by ``__iter__``)."""
        return self.batches(plan)

    def start_at(self, consumed: int) -> None:
        """Resume the current epoch after ``consumed`` samples of this rank (whole micro-batches)."""
        if consumed % self.batch_size:
            raise ValueError(f"resume position {consumed} is not a whole number of micro-batches")
        self.skip = consumed

    def plan(self) -> RankPlan:
        return self._plan(self.epoch, self.skip)

    def _plan(self, epoch: int, skip: int) -> RankPlan:
        if skip % self.batch_size:
            raise ValueError(f"resume position {skip} is not a whole number of micro-batches")
        return rank_plan(
            self.cfg.shards,
            self.cfg.row_group_rows,
            seed=self.cfg.seed,
            epoch=epoch,
            window=self.window,
            rank=self.rank,
            world_size=self.world_size,
            batch=self.batch_size,
            skip=skip,
        )

    def __len__(self) -> int:
        total = sum(int(s["rows"]) for s in self.cfg.shards)
        return (total // self.world_size) // self.batch_size

    def _emit(self, x: torch.Tensor, y: torch.Tensor, ids: np.ndarray, position: int):
        if self.sample_log:
            with open(self.sample_log, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "pid": os.getpid(),
                            "rank": self.rank,
                            "epoch": self.epoch,
                            "start": position,
                            "ids": ids.tolist(),
                        }
                    )
                    + "\n"
                )
        # pixels travel as uint8 (4x fewer bytes to the device); floats only here, once per batch
        x = normalise_batch(x.to(self.device, non_blocking=True), self.mean_px, self.std_px)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def _targets(self, batch: dict[str, Any]):
        """Class labels, or BoxTargets for a detection batch."""
        return box_targets(batch) if self.cfg.detection else torch.as_tensor(batch["y"])

    def batches(self, plan: RankPlan) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

    def __iter__(self):
        plan, blocks = self.reader()
        position = plan.start
        buf: list[dict[str, np.ndarray]] = []
        held = 0
        for block in blocks:
            buf.append(block)
            held += len(block["y"])
            while held >= self.batch_size:
                merged = {k: np.concatenate([b[k] for b in buf]) for k in buf[0]}
                b = self.batch_size
                yield self._emit(
                    torch.from_numpy(merged["x"][:b]),
                    self._targets({k: v[:b] for k, v in merged.items()}),
                    merged["id"][:b],
                    position,
                )
                position += b
                buf = [{k: v[b:] for k, v in merged.items()}]
                held -= b


class PlanLoader(_StreamLoaderBase):
    """The epoch plan decoded in this process (the in-process path, and unit tests)."""

    def batches(self, plan: RankPlan) -> Iterator[dict[str, np.ndarray]]:
        for i, win in enumerate(plan.windows):
            yield decode_window(self.cfg, win, plan.epoch, self.rank, i)


class RayDataLoader(_StreamLoaderBase):
    """The epoch plan as a Ray Data dataset: one ``map_batches`` task per window reads, decodes and
    augments; ``iter_torch_batches`` hands the batches back in plan order."""

    prefetch_batches = 2  # iter_torch_batches' read-ahead, in batches

    def open_reader(self, plan: RankPlan) -> Iterable[dict[str, torch.Tensor]]:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the plan's order is the epoch's order
        if self.cfg.object_store_mb:  # backpressure: no new decode task while this much is queued
            ctx.execution_options.resource_limits = ray.data.ExecutionResources(
                object_store_memory=self.cfg.object_store_mb * 1e6
            )
        items = [
            {"item": json.dumps({"i": i, "groups": w.groups, "order": w.order.tolist()})}
            for i, w in enumerate(plan.windows)
        ]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        # tasks, not an actor pool: no actor start-up every epoch; Ray Data scales them to the CPUs
        ds = ds.map_batches(
            decode_windows, fn_kwargs={"cfg": self.cfg, "epoch": plan.epoch, "rank": self.rank}, batch_size=1
        )
        return ds.iter_torch_batches(
            batch_size=self.batch_size, drop_last=False, prefetch_batches=self.prefetch_batches
        )

    def __iter__(self):
        plan, batches = self.reader()
        position = plan.start
        for batch in batches:
            yield self._emit(batch["x"], self._targets(batch), batch["id"].numpy(), position)
            position += len(batch["y"])


class ReaderAhead:
    """A reader opened in a background thread, up to its first item, before its epoch asks for it.

    ``items()`` (in the consuming thread) waits for the start-up to finish, re-raises its error if
    it failed, then yields the first item and the rest of the same iterator: the order and the
    items are exactly those of the reader opened late."""

    _END = object()

    def __init__(
        self, key: tuple[int, int], plan: RankPlan, open_reader: Callable[[RankPlan], Iterable[Any]]
    ):
        self.key, self.plan = key, plan
        self.iterator: Iterator[Any] | None = None
        self.first: Any = self._END
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(
            target=self._start, args=(open_reader,), name="scalelab-reader-ahead", daemon=True
        )
        self.thread.start()

    def _start(self, open_reader: Callable[[RankPlan], Iterable[Any]]) -> None:
        try:
            self.iterator = iter(open_reader(self.plan))
            self.first = next(self.iterator, self._END)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            self.error = exc
        finally:
            self.ready.set()

    def items(self) -> Iterator[Any]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        if self.first is self._END:
            return iter(())
        return _chain_first(self.first, self.iterator)

    def close(self) -> None:
        self.thread.join()
        close = getattr(self.iterator, "close", None)
        if close is not None:  # a generator: stops Ray Data's execution
            close()


def _chain_first(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def decode_windows(
    batch: dict[str, np.ndarray], cfg: StreamConfig, epoch: int, rank: int
) -> dict[str, np.ndarray]:
    """A Ray Data ``map_batches`` function: window descriptions in, decoded samples out."""
    out = []
    for raw in batch["item"]:
        d = json.loads(raw)
        win = Window([tuple(g) for g in d["groups"]], np.asarray(d["order"], dtype=np.int64))
        out.append(decode_window(cfg, win, epoch, rank, d["i"]))
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


class EvalLoader:
    """Every sample of a split exactly once across ranks: rank r takes row groups r, r + W, ...
    (no padding, so summed metrics count each sample once)."""

    def __init__(
        self,
        split: ShardSplit,
        cfg: StreamConfig,
        *,
        rank: int,
        world_size: int,
        batch_size: int = EVAL_BATCH,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
    ) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.batch_size, self.device, self.channels_last = batch_size, torch.device(device), channels_last
        self.mean_px, self.std_px = pixel_scale(cfg.mean, cfg.std, device=self.device)
        groups = row_groups(split.shards, cfg.row_group_rows)
        self.mine = [(s, g) for i, (s, g, _) in enumerate(groups) if i % world_size == rank]
        self.rows = sum(n for i, (_, _, n) in enumerate(groups) if i % world_size == rank)

    def __len__(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    def __iter__(self):
        for s, g in self.mine:
            n = row_groups([self.cfg.shards[s]], self.cfg.row_group_rows)[g][2]
            out = decode_window(self.cfg, Window([(s, g)], np.arange(n)), 0, self.rank, 0)
            for b in range(0, n, self.batch_size):
                x = torch.from_numpy(out["x"][b : b + self.batch_size]).to(self.device)
                x = normalise_batch(x, self.mean_px, self.std_px)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = (
                    box_targets({k: v[b : b + self.batch_size] for k, v in out.items()})
                    if self.cfg.detection
                    else torch.from_numpy(out["y"][b : b + self.batch_size])
                )
                yield x, y.to(self.device)
