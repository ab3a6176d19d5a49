"""The sharded form and its epoch plan, without Ray: exactly-once per epoch, exact resume, bad shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from stream_resume import crash_and_resume

from scalelab.config.specs import DataSpec
from scalelab.data.catalog import choose_format
from scalelab.data.dataset import Dataset, Split
from scalelab.data.shards import open_sharded, write_shards
from scalelab.data.stream import EvalLoader, PlanLoader, ReaderAhead, StreamConfig, planned_ids, rank_plan
from scalelab.errors import DataError


def tiny_dataset(n: int = 300, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = (rng.integers(0, 60, (n, 8, 8, 1)) + 60 * y[:, None, None, None]).astype(np.uint8)
    parts = {"train": slice(0, 200), "val": slice(200, 250), "test": slice(250, n)}
    splits = {k: Split(x[s], y[s].astype(np.int64)) for k, s in parts.items()}
    return Dataset(name="tiny", splits=splits, classes=["a", "b", "c"])


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    return write_shards(tiny_dataset(), tmp_path / "tiny", shard_mb=0.004, row_group_rows=16)


def config(ds, split: str = "train") -> StreamConfig:
    return StreamConfig(ds.source, ds.meta["shards"][split], 16, 1, ds.mean, ds.std)


def ids_of(loader) -> list[int]:
    out: list[int] = []
    loader.sample_log = None
    plan = loader.plan()
    for block in loader.batches(plan):
        out += block["id"].tolist()
    return out[: plan.samples - plan.start]


def test_shards_keep_pixels_and_are_deterministic(tmp_path: Path, shards: Path):
    ds = open_sharded(shards)
    meta = json.loads((shards / "metadata.json").read_text())
    assert meta["format"] == "shards" and len(meta["shards"]["train"]) > 1  # several shards
    assert {s["row_groups"] for s in meta["shards"]["train"]} != {0}
    mem = tiny_dataset()
    got = ds.splits["test"]
    order = np.argsort(got.ids())
    assert np.array_equal(got.x[order], mem.splits["test"].x)  # lossless: the same pixels
    assert np.array_equal(got.y[order], mem.splits["test"].y)
    again = write_shards(tiny_dataset(), tmp_path / "again", shard_mb=0.004, row_group_rows=16)
    for f in meta["checksums"]:
        assert (again / f).read_bytes() == (shards / f).read_bytes()  # same data, same DVC hash


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epoch_plan_gives_each_sample_once_across_ranks(shards: Path, world_size: int):
    ds = open_sharded(shards)
    epochs = []
    for epoch in (0, 1):
        seen: list[int] = []
        for rank in range(world_size):
            loader = PlanLoader(config(ds), 8, window=2, rank=rank, world_size=world_size)
            loader.set_epoch(epoch)
            mine = ids_of(loader)
            assert len(mine) == len(loader) * 8  # every rank takes the same number of steps
            seen += mine
        assert len(seen) == len(set(seen))  # nobody sees a sample twice
        assert 200 - len(seen) < world_size * 8  # only the remainder that fills no batch is left out
        assert set(seen) <= set(range(200))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new order every epoch


def test_resume_continues_the_plan_at_the_exact_sample(shards: Path):
    ds = open_sharded(shards)
    full = PlanLoader(config(ds), 8, window=3, rank=1, world_size=2)
    full.set_epoch(4)
    whole = ids_of(full)
    resumed = PlanLoader(config(ds), 8, window=3, rank=1, world_size=2)
    resumed.set_epoch(4)
    resumed.start_at(40)
    assert ids_of(resumed) == whole[40:]
    # the batches themselves (decoded + augmented) match too
    plan = rank_plan(ds.meta["shards"]["train"], 16, seed=0, epoch=4, window=3, rank=1, world_size=2, batch=8)
    assert plan.samples == len(whole)


def logged_ids(loader, log: Path) -> list[int]:
    """The ids an epoch's iteration (the real ``__iter__``) hands out, in order, from its sample log."""
    log.unlink(missing_ok=True)
    loader.sample_log = str(log)
    for _ in loader:
        pass
    return [i for r in map(json.loads, log.read_text().splitlines()) for i in r["ids"]]


def test_a_reader_started_ahead_reads_exactly_the_epochs_plan(tmp_path: Path, shards: Path):
    """``prefetch`` opens the next epoch's reader before the epoch asks for it (its first window is
    decoded by then); the epoch then reads exactly its plan -- from the start or a resume position --
    and a reader started for another epoch is discarded, not read."""
    ds = open_sharded(shards)
    log = tmp_path / "samples.jsonl"
    plan = planned_ids(
        ds.source, ds.meta["shards"]["train"], 16, seed=0, epoch=1, window=2, rank=1, world_size=2, batch=8
    )
    loader = PlanLoader(config(ds), 8, window=2, rank=1, world_size=2)
    loader.prefetch(1)
    ahead = loader.ahead
    assert ahead is not None and ahead.ready.wait(30)  # started: its first window is decoded already
    assert ahead.error is None and ahead.first is not ReaderAhead._END
    loader.set_epoch(1)
    assert logged_ids(loader, log) == plan  # each planned sample once, in the planned order
    assert loader.ahead is None  # used up

    loader.prefetch(1, 16)  # a resumed epoch: 16 samples consumed before the restart
    loader.set_epoch(1)
    loader.start_at(16)
    assert logged_ids(loader, log) == plan[16:]

    loader.prefetch(2)  # started for an epoch the loop does not ask for
    other = loader.ahead
    loader.set_epoch(1)
    assert logged_ids(loader, log) == plan and not other.thread.is_alive()

    loader.prefetch(1)
    loader.close()  # a run that stops before the epoch: the reader is stopped, nothing left running
    assert loader.ahead is None
    with pytest.raises(ValueError, match="micro-batches"):
        loader.prefetch(1, 5)


def test_a_reader_started_ahead_raises_its_error_in_the_epoch(tmp_path: Path, shards: Path):
    ds = open_sharded(shards)
    loader = PlanLoader(config(ds), 8, window=2, rank=0, world_size=1)
    for shard in ds.meta["shards"]["train"]:
        (shards / shard["file"]).write_bytes(b"not parquet")
    loader.prefetch(0)
    assert loader.ahead.ready.wait(30) and loader.ahead.error is not None  # failed in the background
    loader.set_epoch(0)
    with pytest.raises(DataError, match="shard"):  # ... and the epoch raises it
        next(iter(loader))


def test_fit_starts_each_epochs_reader_before_its_epoch(tmp_path: Path, shards: Path, monkeypatch):
    """In-process: the first epoch's reader starts before the loop, the next one's before the
    evaluation of the current epoch; each epoch reads the reader started for it; a run stopped early
    stops the reader it started for an epoch that never ran."""
    import scalelab.train.loop as loop
    from scalelab.config.specs import RecipeSpec

    events: list[tuple] = []
    prefetch, evaluate, items, close = (
        PlanLoader.prefetch,
        loop.evaluate_model,
        ReaderAhead.items,
        ReaderAhead.close,
    )

    def record_prefetch(self, epoch, skip=0):
        events.append(("prefetch", epoch, skip))
        prefetch(self, epoch, skip)

    def record_items(self):
        events.append(("read", *self.key))
        return items(self)

    def record_close(self):
        events.append(("stopped", *self.key))
        close(self)

    monkeypatch.setattr(PlanLoader, "prefetch", record_prefetch)
    monkeypatch.setattr(ReaderAhead, "items", record_items)
    monkeypatch.setattr(ReaderAhead, "close", record_close)
    monkeypatch.setattr(loop, "evaluate_model", lambda *a, **k: events.append(("eval",)) or evaluate(*a, **k))
    spec = RecipeSpec.model_validate(
        {
            "name": "tiny",
            "model": {"variant": "msresnet_tiny"},
            "data": {"shuffle_window": 2},
            "train": {"epochs": 3, "batch_size": 16, "threads": 1},
        }
    )
    ds = open_sharded(shards)
    loop.fit(spec, ds)
    assert events == [
        ("prefetch", 0, 0),
        ("read", 0, 0),
        ("prefetch", 1, 0),
        ("eval",),
        ("read", 1, 0),
        ("prefetch", 2, 0),
        ("eval",),
        ("read", 2, 0),
        ("eval",),
        ("eval",),  # test
    ]
    events.clear()
    loop.fit(spec, ds, should_stop=lambda: True)  # stops after the first epoch
    assert events[-4:] == [("prefetch", 1, 0), ("eval",), ("stopped", 1, 0), ("eval",)]


def test_eval_loader_counts_every_sample_once(shards: Path):
    ds = open_sharded(shards)
    total = 0
    for rank in range(3):
        loader = EvalLoader(ds.splits["val"], config(ds, "val"), rank=rank, world_size=3, batch_size=7)
        total += sum(len(y) for _, y in loader)
    assert total == 50


def test_bad_shards_fail_naming_the_shard(shards: Path):
    meta = json.loads((shards / "metadata.json").read_text())
    first = shards / meta["shards"]["train"][0]["file"]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard .*shard-00000\.parquet does not match its checksum"):
        open_sharded(shards)
    first.unlink()
    with pytest.raises(DataError, match=r"shard-00000\.parquet .*is missing"):
        open_sharded(shards)


def test_corrupt_image_inside_a_shard_names_shard_and_sample(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = write_shards(tiny_dataset(), tmp_path / "tiny", shard_mb=1, row_group_rows=16)
    meta = json.loads((root / "metadata.json").read_text())
    path = root / meta["shards"]["val"][0]["file"]
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[3] = images[3][:20]  # a truncated PNG
    table = table.set_column(2, "image", pa.array(images, pa.binary()))
    pq.write_table(table, path, row_group_size=16)
    ds = open_sharded(root, verify=False)
    bad_id = table.column("id")[3].as_py()
    with pytest.raises(DataError, match=rf"corrupt image \(sample id {bad_id}\) in shard val/shard-00000"):
        list(EvalLoader(ds.splits["val"], config(ds, "val"), rank=0, world_size=1))


def test_auto_format_streams_what_does_not_fit():
    spec = DataSpec(memory_budget_mb=100)
    assert choose_format(spec, 40)[0] == "memory"
    fmt, reason = choose_format(spec, 60)
    assert fmt == "stream" and "60.0 MB" in reason and "100 MB" in reason
    assert choose_format(DataSpec(format="stream"), 1)[0] == "stream"


def test_fit_resumes_mid_epoch_exactly_once(tmp_path: Path, shards: Path, monkeypatch):
    """In-process: a run stops right after a mid-epoch checkpoint; the resumed run consumes the
    rest of that epoch, so the epoch's samples are the planned ones, each once."""
    from scalelab.config.specs import RecipeSpec

    ds = open_sharded(shards)
    spec = RecipeSpec.model_validate(
        {
            "name": "tiny",
            "model": {"variant": "msresnet_tiny"},
            "data": {"shuffle_window": 2},
            "train": {"epochs": 2, "batch_size": 16, "threads": 1, "checkpoint_every_steps": 4},
        }
    )
    result, before, after = crash_and_resume(spec, ds, tmp_path, monkeypatch, step=4)
    assert result.history[-1]["epoch"] == 2 and result.history[-1]["resumed_at_sample"] == 64
    assert after[0]["start"] == 64 and all(r["start"] < 64 for r in before)
    epoch_ids = [i for r in before + after for i in r["ids"]]
    planned = PlanLoader(config(ds), 16, window=2, rank=0, world_size=1)
    planned.set_epoch(1)
    assert epoch_ids == ids_of(planned)  # every planned sample once, in the planned order
    from_ids = planned_ids(
        ds.source, ds.meta["shards"]["train"], 16, seed=0, epoch=1, window=2, rank=0, world_size=1, batch=16
    )
    assert from_ids == epoch_ids  # the plan from the id column alone (no decoding) agrees


def gradient_images(n: int, size: int) -> Dataset:
    """``n`` colour images of ``size`` px, 4 classes: a gradient tinted by class (quick to PNG-encode)."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 4
    ramp = np.linspace(0, 200, size, dtype=np.float32)[None, :, None] + np.zeros((size, 1, 3), np.float32)
    x = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        x[i] = ramp + 40 * (np.arange(3) == y[i] % 3) + rng.integers(0, 8, (size, 1, 1))
    parts = {"train": slice(0, n - 128), "val": slice(n - 128, n - 64), "test": slice(n - 64, n)}
    splits = {k: Split(x[s], y[s].astype(np.int64)) for k, s in parts.items()}
    return Dataset(name="gradients", splits=splits, classes=list("abcd"))


def test_a_worker_memory_cap_refuses_the_memory_path_and_streaming_trains_within_it(tmp_path: Path):
    """A train split decoded 4x a worker's memory cap: the in-memory path refuses before training,
    naming data.format=stream; streaming trains a (micro) model over all of it while the process's
    resident memory rises less than the cap after the first step (``rss_growth_mb``)."""
    from scalelab.config.specs import RecipeSpec
    from scalelab.errors import ConfigError
    from scalelab.train.loop import check_data_fits_worker, fit

    cap = 12  # MB
    ds = gradient_images(4250, 64)  # (N, 64, 64, 3) uint8
    assert ds.splits["train"].x.nbytes >= 4 * cap * 1e6
    recipe = {
        "name": "gradients",
        "model": {
            "variant": "msresnet_tiny",
            "stem": "large",
            "stem_width": 8,
            "depths": [1, 1, 1],
            "widths": [8, 8, 8],
        },
        "data": {"memory_budget_mb": cap, "shuffle_window": 2},
        "train": {"epochs": 1, "batch_size": 32, "threads": 1},
    }
    with pytest.raises(
        ConfigError, match=r"budget of 12 MB \(data\.memory_budget_mb\).* data\.format=stream"
    ):
        fit(RecipeSpec.model_validate(recipe), ds)
    on_ray = {**recipe, "data": {}, "train": {"workers": 2, "memory_per_worker_mb": cap}}
    with pytest.raises(ConfigError, match=r"train\.memory_per_worker_mb, Ray's memory resource"):
        check_data_fits_worker(RecipeSpec.model_validate(on_ray), ds)

    streamed = open_sharded(write_shards(ds, tmp_path / "gradients", shard_mb=1, row_group_rows=16))
    del ds
    result = fit(RecipeSpec.model_validate(recipe), streamed)
    epoch = result.history[0]
    assert epoch["images_per_s"] > 0 and epoch["steady_images_per_s"] > 0 and epoch["peak_rss_mb"] > 0
    assert 0 < epoch["rss_anon_mb"] <= epoch["peak_rss_mb"]  # private part of what is resident
    assert epoch["rss_growth_mb"] <= cap, epoch
    assert epoch["rss_anon_growth_mb"] <= cap, epoch  # private memory's sampled peak, above warm-up
