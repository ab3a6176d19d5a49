"""Detection in the sharded form, without Ray: boxes round-trip, flips move boxes, every image once
per epoch and in evaluation, bad shards named, and a mid-epoch resume that is exact on sample ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from stream_resume import crash_and_resume

from scalelab.config.specs import AugmentSpec, DataSpec, RecipeSpec
from scalelab.data import read_raw
from scalelab.data.shards import open_sharded, write_shards
from scalelab.data.stream import EvalLoader, PlanLoader, StreamConfig, planned_ids
from scalelab.errors import ConfigError, DataError
from scalelab.models.detection_loss import BoxTargets

ROWS = 8  # rows per row group


@pytest.fixture(scope="module")
def scenes():
    spec = DataSpec(
        name="sc",
        kind="scenes",
        image_size=32,
        scenes={"num_scenes": 60, "objects_per_scene": [1, 3], "object_size": [6, 14]},
    )
    return read_raw(spec)


@pytest.fixture()
def shards(tmp_path: Path, scenes) -> Path:
    return write_shards(scenes, tmp_path / "sc", shard_mb=0.004, row_group_rows=ROWS)


def raw_config(ds, split: str, augment: AugmentSpec | None = None) -> StreamConfig:
    """Batches of raw pixel values (mean 0, std 1/255), so images can be compared with boxes."""
    return StreamConfig(
        ds.source, ds.meta["shards"][split], ROWS, 1, [0.0], [1 / 255], augment, 0, True, ds.meta["max_boxes"]
    )


def boxes_by_id(split, ids: np.ndarray) -> dict[int, np.ndarray]:
    return {int(i): split.boxes[split.box_image_index == k] for k, i in enumerate(ids)}


def test_detection_shards_round_trip_boxes_and_name_bad_shards(tmp_path: Path, scenes, shards: Path):
    ds = open_sharded(shards)
    meta = json.loads((shards / "metadata.json").read_text())
    assert meta["task"] == "detection" and len(meta["shards"]["train"]) > 1
    assert meta["max_boxes"] == max(np.bincount(s.box_image_index).max() for s in scenes.splits.values())
    got, mem = ds.splits["test"], scenes.splits["test"]
    ids = got.ids()
    order = np.argsort(ids)
    assert got.has_boxes and np.array_equal(got.x[order], mem.x)  # the same pixels (PNG is lossless)
    assert np.array_equal(got.y[order], mem.y)  # objects per image
    offset = len(scenes.splits["train"]) + len(scenes.splits["val"])  # ids are unique across splits
    mine = boxes_by_id(got, ids)
    for k in range(len(mem.x)):
        assert np.array_equal(mine[offset + k], mem.boxes[mem.box_image_index == k])
    assert np.array_equal(np.sort(got.box_labels), np.sort(mem.box_labels))

    again = write_shards(scenes, tmp_path / "again", shard_mb=0.004, row_group_rows=ROWS)
    assert all((again / f).read_bytes() == (shards / f).read_bytes() for f in meta["checksums"])

    # a corrupt image inside a shard (checksums not verified, as on a remote): named with its sample
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = shards / meta["shards"]["val"][0]["file"]
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[2] = images[2][:20]
    table = table.set_column(2, "image", pa.array(images, pa.binary()))
    pq.write_table(table, path, row_group_size=ROWS)
    broken = open_sharded(shards, verify=False)
    bad = table.column("id")[2].as_py()
    with pytest.raises(DataError, match=rf"corrupt image \(sample id {bad}\) in shard val/shard-00000"):
        list(EvalLoader(broken.splits["val"], raw_config(broken, "val"), rank=0, world_size=1))
    with pytest.raises(DataError, match=r"shard-00000\.parquet does not match its checksum"):
        open_sharded(shards)
    path.unlink()
    with pytest.raises(DataError, match=r"shard-00000\.parquet .*is missing"):
        open_sharded(shards)


def test_detection_plan_flips_boxes_with_images_and_counts_every_image_once(shards: Path):
    ds = open_sharded(shards)
    train = ds.splits["train"]
    truth = boxes_by_id(train, train.ids())
    seen, flipped = [], 0
    for rank in range(2):
        loader = PlanLoader(
            raw_config(ds, "train", AugmentSpec(hflip=True)), 6, window=2, rank=rank, world_size=2
        )
        loader.set_epoch(1)
        for x, targets in loader:
            assert isinstance(targets, BoxTargets) and targets.image_size == 32
            for img, boxes, i in zip(x[:, 0], targets.boxes, targets.image_ids.tolist(), strict=True):
                inside = torch.zeros_like(img, dtype=torch.bool)
                for x1, y1, x2, y2 in boxes.round().long().tolist():
                    inside[y1:y2, x1:x2] = True
                assert not (img[~inside] > 0).any()  # every lit pixel is inside a (flipped) box
                true = torch.from_numpy(truth[i])
                assert len(boxes) == len(true)
                if not torch.equal(boxes, true):
                    mirrored = true.clone()
                    mirrored[:, [0, 2]] = 32 - true[:, [2, 0]]
                    assert torch.equal(boxes, mirrored)
                    flipped += 1
            seen += targets.image_ids.tolist()
    assert flipped > 0 and len(seen) == len(set(seen)) and len(train) - len(seen) < 2 * 6

    images = []
    for rank in range(3):  # evaluation: every image once across ranks, with all its boxes
        for _, targets in EvalLoader(
            ds.splits["val"], raw_config(ds, "val"), rank=rank, world_size=3, batch_size=5
        ):
            images += targets.image_ids.tolist()
    assert sorted(images) == sorted(ds.splits["val"].ids().tolist())
    with pytest.raises(ConfigError, match="hflip"):
        from scalelab.train.loop import stream_loaders

        spec = RecipeSpec.model_validate(
            {
                "model": {"variant": "msresnet_tiny", "task": "detection"},
                "data": {"augment": {"crop_padding": 2}},
            }
        )
        stream_loaders(spec, ds, None, 0, 1, 8)


def test_detection_fit_streams_and_resumes_mid_epoch_exactly_once(tmp_path: Path, shards: Path, monkeypatch):
    """In-process (train.workers=0): a detector trains on shards; a run stopped right after a
    mid-epoch checkpoint resumes at the exact sample, and the epoch's ids are the plan's, once."""

    ds = open_sharded(shards)
    spec = RecipeSpec.model_validate(
        {
            "name": "sc",
            "model": {"variant": "msresnet_tiny", "task": "detection", "fpn_width": 8},
            "data": {"shuffle_window": 2, "augment": {"hflip": True}},
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "threads": 1,
                "checkpoint_every_steps": 2,
                "optimizer": "adamw",
            },
        }
    )
    result, before, after = crash_and_resume(spec, ds, tmp_path, monkeypatch, step=2)
    assert result.history[-1]["epoch"] == 2 and result.history[-1]["resumed_at_sample"] == 16
    assert (
        np.isfinite(result.test.map50)
        and result.test.loss > 0
        and result.test.images == len(ds.splits["test"])
    )

    before = [r for r in before if r["start"] < 16]
    assert after[0]["start"] == 16
    planned = planned_ids(
        ds.source, ds.meta["shards"]["train"], ROWS, seed=0, epoch=1, window=2, rank=0, world_size=1, batch=8
    )
    assert [i for r in before + after for i in r["ids"]] == planned  # every planned image once, in order
