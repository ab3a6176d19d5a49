"""Detection datasets in the stream format end to end, on real Ray (Ray Data tasks, Ray Train):
`scalelab data prepare` writes scenes as shards with boxes; two Ray Train workers stream them, each
epoch's images once across the ranks in the planned order; mAP (gathered from both ranks, every
test image once) is finite and in line with the in-memory path on the same data, seed and budget.
A COCO folder (JSON + images, from a local folder or an S3 prefix on the moto server) is prepared
into the same shards in parallel on Ray, boxes included, and streamed to training.
Mid-epoch resume of detection is checked in-process (tests/unit/test_data_stream_detection.py);
the worker kill test of tests/integration/test_stream_data.py covers the same plan and counter."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from scalelab.config import load_recipe

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "data.image_size=32",
    "data.scenes.num_scenes=160",
    "data.scenes.objects_per_scene=[1, 3]",
    "data.scenes.object_size=[6, 16]",
    "model.variant=msresnet_tiny",
    "model.task=detection",
    "model.fpn_width=8",
    "train.epochs=2",
    "train.batch_size=16",
    "train.threads=1",
    "tracking.enabled=false",
]
STREAM = ["data.name=scenes_shards", "data.format=stream", "data.row_group_rows=16", "data.shard_mb=0.02"]


def test_scenes_prepared_as_shards_stream_to_two_workers_with_map_like_memory(
    ray_session, monkeypatch, tmp_path: Path
):
    from scalelab.data import load_dataset
    from scalelab.data.commands import prepare
    from scalelab.data.stream import planned_ids
    from scalelab.train.api import run_training

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipelines").symlink_to(REPO / "pipelines")
    streamed = TINY + STREAM
    root = prepare("pipelines/scenes.yaml", streamed, quiet=True)
    meta = json.loads((root / "metadata.json").read_text())
    assert meta["format"] == "shards" and meta["task"] == "detection" and meta["max_boxes"] >= 1
    assert len(meta["shards"]["train"]) >= 2 and "data.format=stream" in meta["format_reason"]

    log = tmp_path / "samples.jsonl"
    monkeypatch.setenv("SCALELAB_SAMPLE_LOG", str(log))
    spec = load_recipe("pipelines/scenes.yaml", streamed + ["train.workers=2", "train.run_name=det-stream"])
    out = run_training(spec)
    assert [h["epoch"] for h in out.history] == [1, 2] and out.history[-1]["world_size"] == 2

    data = load_dataset(spec.data)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    for epoch in (0, 1):
        for rank in (0, 1):
            seen = [i for r in rows if r["epoch"] == epoch and r["rank"] == rank for i in r["ids"]]
            planned = planned_ids(
                data.source,
                meta["shards"]["train"],
                16,
                seed=spec.train.seed,
                epoch=epoch,
                window=spec.data.shuffle_window,
                rank=rank,
                world_size=2,
                batch=8,
            )
            assert seen == planned  # Ray Data delivered this rank's part of the plan, in order

    memory = run_training(
        load_recipe(
            "pipelines/scenes.yaml",
            TINY + ["data.data_dir=mem", "data.format=memory", "train.run_name=det-memory"],
        )
    )
    for result in (out, memory):
        assert math.isfinite(result.metrics["test_map50"]) and result.metrics["test_loss"] > 0
    assert abs(out.metrics["test_map50"] - memory.metrics["test_map50"]) <= 0.2  # a loose bound
    assert out.metrics["test_loss"] <= 1.25 * memory.metrics["test_loss"]


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*.*")
    }


def upload(folder: Path, s3_url: str, bucket: str, prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_url)
    for p in sorted(folder.rglob("*.*")):
        client.put_object(
            Bucket=bucket, Key=f"{prefix}/{p.relative_to(folder).as_posix()}", Body=p.read_bytes()
        )


def image_and_boxes(split, i: int) -> tuple[bytes, bytes]:
    return split.x[i].tobytes(), split.boxes[split.box_image_index == i].round(3).tobytes()


def test_coco_prepared_on_ray_from_folder_and_s3_prefix_then_streamed(
    ray_session, s3_server, s3_bucket: str, monkeypatch, tmp_path: Path
):
    import numpy as np

    from scalelab.config.specs import DataSpec
    from scalelab.data import load_dataset
    from scalelab.data.catalog import prepare
    from scalelab.data.scenes import read_coco, read_scenes, write_coco
    from scalelab.errors import DataError
    from scalelab.train.api import run_training

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipelines").symlink_to(REPO / "pipelines")
    scenes = read_scenes(load_recipe("pipelines/scenes.yaml", TINY + ["data.scenes.num_scenes=96"]).data)
    folder = tmp_path / "coco"
    write_coco(scenes.splits["train"], scenes.classes, folder)  # 67 grey 32 px PNGs + annotations.json
    common = dict(kind="coco", format="stream", channels=1, shard_mb=0.01, row_group_rows=8, split_seed=0)
    common.update(val_fraction=0.1, test_fraction=0.2)

    local = prepare(DataSpec(name="coco_local", source=str(folder / "annotations.json"), **common))
    meta = json.loads((local / "metadata.json").read_text())
    assert meta["task"] == "detection" and meta["image_size"] == 32 and len(meta["shards"]["train"]) >= 2
    assert meta["source"]["kept_original_bytes"] == 67 and meta["source"]["skipped_count"] == 0
    # the same images, boxes and splits as the in-memory COCO reader
    memory = read_coco(
        DataSpec(
            name="coco_mem",
            source=str(folder / "annotations.json"),
            format="memory",
            **{k: v for k, v in common.items() if k != "format"},
        )
    )
    shards = load_dataset(DataSpec(name="coco_local", **common))
    assert meta["max_boxes"] == int(max(memory.splits[s].y.max() for s in ("train", "val", "test")))
    assert np.allclose(meta["mean"], memory.mean, atol=1e-5) and np.allclose(
        meta["std"], memory.std, atol=1e-5
    )
    for name in ("train", "val", "test"):
        mem, got = memory.splits[name], shards.splits[name]
        assert sorted(map(image_and_boxes, [mem] * len(mem), range(len(mem)))) == sorted(
            map(image_and_boxes, [got] * len(got), range(len(got)))
        )
        assert np.array_equal(np.sort(mem.box_labels), np.sort(got.box_labels))

    upload(folder, s3_server.url, s3_bucket, "raw/coco")
    remote = prepare(
        DataSpec(
            name="coco_s3",
            source=f"s3://{s3_bucket}/raw/coco/annotations.json",
            endpoint_url=s3_server.url,
            **common,
        )
    )
    assert json.loads((remote / "metadata.json").read_text())["shards"] == meta["shards"]
    assert digests(remote) == {**digests(local), "metadata.json": digests(remote)["metadata.json"]}
    with pytest.raises(DataError, match=r"annotations file .*nothing\.json.* does not exist"):
        prepare(
            DataSpec(
                name="gone", source=f"s3://{s3_bucket}/raw/nothing.json", endpoint_url=s3_server.url, **common
            )
        )

    (folder / "images" / "000003.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"cannot read image .*000003\.png"):
        prepare(DataSpec(name="coco_bad", source=str(folder / "annotations.json"), **common))
    assert not (tmp_path / "data" / "coco_bad").exists()  # nothing half-written
    skipped = prepare(
        DataSpec(name="coco_skip", source=str(folder / "annotations.json"), on_bad_file="skip", **common)
    )
    report = json.loads((skipped / "metadata.json").read_text())
    assert report["source"]["skipped"] == ["000003.png"] and sum(report["split_sizes"].values()) == 66
    kept = load_dataset(DataSpec(name="coco_skip", **common))
    src = scenes.splits["train"]
    boxes = sum(len(kept.splits[s].boxes) for s in ("train", "val", "test"))
    assert boxes == len(src.boxes) - int((src.box_image_index == 3).sum())  # image 3's boxes went with it

    log = tmp_path / "samples.jsonl"
    monkeypatch.setenv("SCALELAB_SAMPLE_LOG", str(log))
    out = run_training(
        load_recipe(
            "pipelines/scenes.yaml",
            TINY
            + [
                "data.kind=coco",
                "data.name=coco_s3",
                "data.format=stream",
                "data.channels=1",
                "train.epochs=1",
                "train.workers=0",  # the plan read in-process; Ray Train workers: the test above
                "train.run_name=coco-stream",
            ],
        )
    )
    assert out.history[-1]["epoch"] == 1 and math.isfinite(out.metrics["test_map50"])
    assert out.metrics["test_loss"] > 0
    seen = [i for line in log.read_text().splitlines() for i in json.loads(line)["ids"]]
    train_ids = set(load_dataset(DataSpec(name="coco_s3", **common)).splits["train"].ids().tolist())
    assert len(seen) == len(set(seen)) and set(seen) <= train_ids  # streamed: each sample once
    assert len(seen) == (len(train_ids) // 16) * 16  # whole batches of the epoch (drop_last)
