"""Detection datasets in the stream format end to end, on real Ray (Ray Data tasks, Ray Train):
`scalelab data prepare` writes scenes as shards with boxes; two Ray Train workers stream them, each
epoch's images once across the ranks in the planned order; mAP (gathered from both ranks, every
test image once) is finite and in line with the in-memory path on the same data, seed and budget.
Mid-epoch resume of detection is checked in-process (tests/unit/test_data_stream_detection.py);
the worker kill test of tests/integration/test_stream_data.py covers the same plan and counter."""

from __future__ import annotations

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
