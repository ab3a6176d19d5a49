"""Sharded datasets end to end: real Ray (tasks and Ray Data), the moto S3 server, real DVC.

- an image folder prepared into shards on Ray, from a local folder and from an S3 prefix (the
  same bytes), bad files skipped or refused, an empty prefix refused; `dvc push`, wipe, `dvc pull`
  gives identical shards;
- two Ray Train workers stream digits shards straight from the DVC remote on S3; one is killed
  mid-epoch right after a step checkpoint: the resumed epoch consumes every planned sample exactly
  once (asserted on sample ids), and accuracy is in line with the in-memory path.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from scalelab.config import load_recipe
from scalelab.config.specs import DataSpec
from scalelab.data.catalog import prepare
from scalelab.data.remote import configure_remote
from scalelab.errors import DataError

pytestmark = pytest.mark.integration

FAST = ["model.variant=msresnet_tiny", "train.batch_size=64", "train.threads=1", "tracking.enabled=false"]


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def make_imagefolder(root: Path, per_class: int = 50) -> Path:
    """3 classes of small colour PNGs (two sizes, to exercise the square crop), one broken file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["circle", "cross", "dot"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            w = 12 if i % 2 else 14
            arr = rng.integers(0, 80, (12, w, 3)).astype(np.uint8)
            arr[..., c] += 150
            Image.fromarray(arr).save(folder / f"img{i:03d}.png")
    (root / "circle" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def upload(folder: Path, s3_url: str, bucket: str, prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_url)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            client.put_object(
                Bucket=bucket, Key=f"{prefix}/{p.relative_to(folder).as_posix()}", Body=p.read_bytes()
            )


def test_prepare_from_folder_and_s3_prefix_then_dvc_push_pull(
    dvc_repo: Path, sh, ray_session, s3_server, s3_bucket: str
):
    images = make_imagefolder(dvc_repo.parent / "images")
    common = dict(kind="imagefolder", format="stream", shard_mb=0.02, row_group_rows=16, on_bad_file="skip")

    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        prepare(DataSpec(name="refused", source=str(images), **{**common, "on_bad_file": "error"}))
    assert not (dvc_repo / "data" / "refused").exists()  # nothing half-written

    local = prepare(DataSpec(name="shapes", source=str(images), **common))
    meta = json.loads((local / "metadata.json").read_text())
    assert meta["format"] == "shards" and meta["image_size"] == 12 and meta["channels"] == 3
    assert meta["source"]["skipped"] == ["circle/broken.png"] and meta["source"]["skipped_count"] == 1
    assert sum(meta["split_sizes"].values()) == 150 and len(meta["shards"]["train"]) >= 2

    upload(images, s3_server.url, s3_bucket, "raw/shapes")
    remote = prepare(
        DataSpec(
            name="shapes_s3",
            source=f"s3://{s3_bucket}/raw/shapes",
            endpoint_url=s3_server.url,
            image_size=12,  # what the local survey found: no survey pass over S3 this time
            channels=3,
            **common,
        )
    )
    from_s3 = json.loads((remote / "metadata.json").read_text())
    assert from_s3["shards"] == meta["shards"]  # same sample ids, rows and shard checksums
    assert digests(remote) == {**digests(local), "metadata.json": digests(remote)["metadata.json"]}

    with pytest.raises(DataError, match=r"nothing .*is empty"):
        prepare(
            DataSpec(name="empty", source=f"s3://{s3_bucket}/nothing", endpoint_url=s3_server.url, **common)
        )
    with pytest.raises(DataError, match=r"bucket 'no-such-bucket' does not exist"):
        prepare(DataSpec(name="gone", source="s3://no-such-bucket/x", endpoint_url=s3_server.url, **common))

    # DVC versions the shard folder like any prepared dataset: push, wipe, pull -> identical
    before = digests(local)
    sh("dvc", "add", "-q", "data/shapes")
    configure_remote(dvc_repo, "s3", f"s3://{s3_bucket}/dvc", s3_server.url, local=True)
    sh("dvc", "push", "-q", "data/shapes")
    shutil.rmtree(local)
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    sh("dvc", "pull", "-q", "data/shapes")
    assert digests(local) == before


def test_two_workers_stream_from_the_s3_remote_and_resume_mid_epoch_exactly_once(
    dvc_repo: Path, sh, ray_session, s3_server, s3_bucket: str, monkeypatch, tmp_path: Path
):
    from scalelab.data.stream import PlanLoader, StreamConfig
    from scalelab.data.stream_source import load_remote_stream
    from scalelab.train.api import run_training

    (dvc_repo / "pipelines").symlink_to(Path(__file__).resolve().parents[2] / "pipelines")
    stream = ["data.name=digits_shards", "data.format=stream", "data.row_group_rows=32"]
    prepare(load_recipe("pipelines/digits.yaml", stream).data)
    sh("dvc", "add", "-q", "data/digits_shards")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "digits shards")
    configure_remote(dvc_repo, "s3", f"s3://{s3_bucket}/dvc", s3_server.url, local=True)
    sh("dvc", "push", "-q", "data/digits_shards")
    shutil.rmtree(dvc_repo / "data" / "digits_shards")  # no local copy anywhere: S3 only
    shutil.rmtree(dvc_repo / ".dvc" / "cache")

    log = tmp_path / "samples.jsonl"
    monkeypatch.setenv("SCALELAB_SAMPLE_LOG", str(log))
    monkeypatch.setenv("SCALELAB_FAULT_INJECT", f"rank=1,epoch=1,step=10,marker={tmp_path / 'killed'}")
    epochs = ["train.epochs=2", "train.run_name=streamed"]
    spec = load_recipe(
        "pipelines/digits.yaml",
        FAST
        + stream
        + epochs
        + ["data.stream_from=remote", "train.workers=2", "train.checkpoint_every_steps=5"],
    )
    out = run_training(spec)
    assert (tmp_path / "killed").exists()  # rank 1 really died mid-epoch 2
    assert [h["epoch"] for h in out.history] == [1, 2]
    resumed_at = out.history[1]["resumed_at_sample"]
    assert resumed_at in (160, 320)  # step 10 (or 5, if Ray missed the last checkpoint) x 32 samples

    # epoch 2 (index 1): samples consumed before the checkpoint + after the resume = the plan, once
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    first_pids = {r["pid"] for r in rows if r["epoch"] == 0}
    data = load_remote_stream(spec.data)
    for rank in (0, 1):
        before = [r for r in rows if r["epoch"] == 1 and r["rank"] == rank and r["pid"] in first_pids]
        after = [r for r in rows if r["epoch"] == 1 and r["rank"] == rank and r["pid"] not in first_pids]
        assert after and after[0]["start"] == resumed_at
        seen = [i for r in before if r["start"] < resumed_at for i in r["ids"]]
        seen += [i for r in after for i in r["ids"]]
        cfg = StreamConfig(data.source, data.meta["shards"]["train"], 32, 1, data.mean, data.std)
        planned = PlanLoader(cfg, 32, window=spec.data.shuffle_window, rank=rank, world_size=2)
        planned.set_epoch(1)
        plan = planned.plan()
        expected = [i for w in plan.windows for i in planned_ids(data, w)]
        assert seen == expected[: plan.samples]  # exactly once, in the planned order

    # accuracy in line with the in-memory path on the same data, seed and budget (a loose bound)
    memory = run_training(load_recipe("pipelines/digits.yaml", FAST + epochs[:1] + ["train.run_name=mem"]))
    assert out.metrics["test_acc"] > 0.5
    assert out.metrics["test_acc"] >= memory.metrics["test_acc"] - 0.2


def planned_ids(data, window) -> list[int]:
    from scalelab.data.stream import read_window

    ids, _, _ = read_window(data.source, data.meta["shards"]["train"], window, 1)
    return ids.tolist()
