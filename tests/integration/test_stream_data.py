"""Sharded datasets end to end: real Ray (tasks and Ray Data), the moto S3 server, real DVC.

- an image folder prepared into shards on Ray, from a local folder and from an S3 prefix (the
  same bytes), bad files skipped or refused, an empty prefix refused; `dvc push`, wipe, `dvc pull`
  gives identical shards;
- two Ray Train workers stream digits shards straight from the DVC remote on S3; one is killed
  mid-epoch right after a step checkpoint: the resumed epoch consumes every planned sample exactly
  once (asserted on sample ids), and accuracy is in line with the in-memory path;
- the S3 endpoint stops mid-epoch and comes back on the same port: a short outage is waited out
  and the epoch completes; a longer one fails naming the endpoint, and the rerun resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

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


# ----------------------------------------------------------------------------- streaming from S3

STREAM = ["data.name=digits_shards", "data.format=stream", "data.row_group_rows=32"]


class RestorableS3:
    """A moto S3 endpoint the test stops and brings back on the same port with its objects (see
    ``s3_restorable.py``: moto alone would come back empty)."""

    def __init__(self, state: Path) -> None:
        from scalelab.cluster.services import free_port

        self.state, self.port = state, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.snapshot = state / "snapshot"
        self.snapshot.mkdir(parents=True)
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        from scalelab.cluster.services import wait_http

        log = self.state / "s3.log"
        script = Path(__file__).with_name("s3_restorable.py")
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(self.port), str(self.snapshot)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_http(f"{self.url}/moto-api/", 60, self.proc, str(log))

    def stop(self) -> None:
        """Keep every object in the snapshot (once), then kill the server: the endpoint is gone."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.url)
        if not any(self.snapshot.iterdir()):
            for bucket in client.list_buckets()["Buckets"]:
                (self.snapshot / bucket["Name"]).mkdir()
                for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
                    for obj in page.get("Contents", []):
                        dest = self.snapshot / bucket["Name"] / obj["Key"]
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        body = client.get_object(Bucket=bucket["Name"], Key=obj["Key"])["Body"].read()
                        dest.write_bytes(body)
        self.close()

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def digits_on_s3(tmp_path_factory):
    """digits prepared as shards in a git + DVC repository, pushed to its DVC remote on a moto S3
    endpoint that can be stopped and brought back, and the local copy removed: the shards exist
    only on S3. Module-wide: the streaming tests share this setup (each uses its own run name)."""
    for var, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(var, value)
    root = tmp_path_factory.mktemp("digits-on-s3")
    s3 = RestorableS3(root / "s3")
    repo = root / "repo"
    repo.mkdir()
    identity = {
        f"GIT_{w}_{k}": v for w in ("AUTHOR", "COMMITTER") for k, v in (("NAME", "t"), ("EMAIL", "t@t"))
    }
    env = {
        **os.environ,
        **identity,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(root / "dvc-site-cache"),
    }

    def sh(*args: str) -> None:
        subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True, timeout=300)

    try:
        import boto3

        boto3.client("s3", endpoint_url=s3.url).create_bucket(Bucket="shards")
        sh("git", "init", "-q")
        sh("dvc", "init", "-q")
        (repo / "pipelines").symlink_to(Path(__file__).resolve().parents[2] / "pipelines")
        cwd = Path.cwd()
        os.chdir(repo)
        try:
            prepare(load_recipe("pipelines/digits.yaml", STREAM).data)
        finally:
            os.chdir(cwd)
        sh("dvc", "add", "-q", "data/digits_shards")
        sh("git", "add", "-A")
        sh("git", "commit", "-qm", "digits shards")
        configure_remote(repo, "s3", "s3://shards/dvc", s3.url, local=True)
        sh("dvc", "push", "-q", "data/digits_shards")
        shutil.rmtree(repo / "data" / "digits_shards")  # no local copy anywhere: S3 only
        shutil.rmtree(repo / ".dvc" / "cache")
        yield SimpleNamespace(repo=repo, s3=s3)
    finally:
        s3.close()


def test_two_workers_stream_from_the_s3_remote_and_resume_mid_epoch_exactly_once(
    digits_on_s3, ray_session, monkeypatch, tmp_path: Path
):
    from scalelab.data.stream_source import load_remote_stream
    from scalelab.train.api import run_training

    monkeypatch.chdir(digits_on_s3.repo)
    log = tmp_path / "samples.jsonl"
    monkeypatch.setenv("SCALELAB_SAMPLE_LOG", str(log))
    monkeypatch.setenv("SCALELAB_FAULT_INJECT", f"rank=1,epoch=1,step=10,marker={tmp_path / 'killed'}")
    epochs = ["train.epochs=2", "train.run_name=streamed"]
    spec = load_recipe(
        "pipelines/digits.yaml",
        FAST
        + STREAM
        + epochs
        + ["data.stream_from=remote", "train.workers=2", "train.checkpoint_every_steps=5"],
    )
    out = run_training(spec)
    assert (tmp_path / "killed").exists()  # rank 1 really died mid-epoch 2
    assert [h["epoch"] for h in out.history] == [1, 2]
    resumed_at = out.history[1]["resumed_at_sample"]
    assert resumed_at in (160, 320)  # step 10 (or 5, if Ray missed the last checkpoint) x 32 samples

    # epoch 2 (index 1): samples consumed before the checkpoint + after the resume = the plan, once
    rows = rows_of(log)
    first_pids = {r["pid"] for r in rows if r["epoch"] == 0}
    data = load_remote_stream(spec.data)
    for rank in (0, 1):
        before = [r for r in rows if r["epoch"] == 1 and r["rank"] == rank and r["pid"] in first_pids]
        after = [r for r in rows if r["epoch"] == 1 and r["rank"] == rank and r["pid"] not in first_pids]
        assert after and after[0]["start"] == resumed_at
        seen = [i for r in before if r["start"] < resumed_at for i in r["ids"]]
        seen += [i for r in after for i in r["ids"]]
        assert seen == planned_epoch(data, spec, 1, rank, 2)  # exactly once, in the planned order

    # accuracy in line with the in-memory path on the same data, seed and budget (a loose bound)
    memory = run_training(load_recipe("pipelines/digits.yaml", FAST + epochs[:1] + ["train.run_name=mem"]))
    assert out.metrics["test_acc"] > 0.5
    assert out.metrics["test_acc"] >= memory.metrics["test_acc"] - 0.2


def test_s3_outage_mid_epoch_is_retried_or_fails_naming_the_endpoint_and_resumes_exactly(
    digits_on_s3, monkeypatch, tmp_path: Path, caplog
):
    """The in-process path (the same ShardSource reads that Ray Data tasks run) streams from the DVC
    remote while its S3 endpoint goes away mid-epoch: for ~6 s (within data.read_retry_s) the epoch
    waits and completes with every planned sample once; for longer than data.read_retry_s the run
    fails naming the endpoint, and running it again resumes the epoch exactly where it stopped."""
    from scalelab.data.stream_source import load_remote_stream
    from scalelab.train.api import run_training

    monkeypatch.chdir(digits_on_s3.repo)
    s3 = digits_on_s3.s3
    run = (
        FAST + STREAM + ["data.stream_from=remote", "train.checkpoint_every_steps=5", "train.run_name=outage"]
    )
    logs = [tmp_path / f"samples-{i}.jsonl" for i in range(3)]

    # 1. an outage shorter than data.read_retry_s: the epoch waits for the endpoint, then completes
    # away >= 4 s (+ the restart): longer than pyarrow's own retries of one request can last (3
    # attempts, jittered backoff of <= 1 s then <= 2 s), so the read always reaches ShardSource's
    # retry loop and its warning; with 2 s, pyarrow alone sometimes rode out the outage silently
    restart = threading.Thread(target=lambda: (time.sleep(4), s3.start()))

    def outage() -> None:
        s3.stop()
        restart.start()

    monkeypatch.setenv("SCALELAB_SAMPLE_LOG", str(logs[0]))
    caplog.set_level(logging.WARNING, logger="scalelab.data.shards")
    fired = before_read_after_batches(monkeypatch, logs[0], epoch=0, count=3, then=outage)
    spec = load_recipe("pipelines/digits.yaml", run + ["train.epochs=1", "data.read_retry_s=60"])
    out = run_training(spec)
    assert fired.is_set()
    restart.join()
    assert f"endpoint {s3.url}" in caplog.text and "retrying for up to 60 s" in caplog.text
    data = load_remote_stream(spec.data)
    assert sampled(logs[0], epoch=0) == planned_epoch(data, spec, 0)  # complete, each sample once
    assert [h["epoch"] for h in out.history] == [1]

    # 2. an outage longer than data.read_retry_s: a clear failure naming the endpoint ...
    monkeypatch.setenv("SCALELAB_SAMPLE_LOG", str(logs[1]))
    longer = load_recipe("pipelines/digits.yaml", run + ["train.epochs=2", "data.read_retry_s=1"])
    fired = before_read_after_batches(monkeypatch, logs[1], epoch=1, count=12, then=s3.stop)
    with pytest.raises(
        DataError, match=rf"S3 endpoint {s3.url} did not answer .* run the same command again"
    ):
        run_training(longer)
    assert fired.is_set()
    s3.start()
    # ... and running it again resumes that epoch at the exact sample where it stopped
    monkeypatch.setenv("SCALELAB_SAMPLE_LOG", str(logs[2]))
    resumed = run_training(longer)
    at = resumed.history[1]["resumed_at_sample"]
    assert at in (640, 960)  # the step-10 or step-15 checkpoint (64 samples a step)
    before = [r for r in rows_of(logs[1]) if r["epoch"] == 1 and r["start"] < at]
    after = [r for r in rows_of(logs[2]) if r["epoch"] == 1]
    assert after[0]["start"] == at
    assert [i for r in before + after for i in r["ids"]] == planned_epoch(data, longer, 1)


def _real_read_columns():
    from scalelab.data.shards import ShardSource

    return ShardSource.read_columns


REAL_READ_COLUMNS = _real_read_columns()


def before_read_after_batches(monkeypatch, log: Path, epoch: int, count: int, then) -> threading.Event:
    """Run ``then()`` once, synchronously, just before the first shard read that starts after
    ``count`` training batches of ``epoch`` are in the sample log: the outage begins at a known
    point of the epoch, however fast training outruns the test (a watcher thread polling the log
    could stop the endpoint only after the epoch's last read). The read itself is the real one."""
    from scalelab.data.shards import ShardSource

    real = REAL_READ_COLUMNS  # not the attribute now: a wrapper of an earlier call may still be there
    fired = threading.Event()

    def read_columns(self, *args, **kwargs):
        if not fired.is_set() and log.exists() and sum(r["epoch"] == epoch for r in rows_of(log)) >= count:
            fired.set()
            then()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ShardSource, "read_columns", read_columns)
    return fired


def rows_of(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def sampled(log: Path, epoch: int) -> list[int]:
    return [i for r in rows_of(log) if r["epoch"] == epoch for i in r["ids"]]


def planned_epoch(data, spec, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The sample ids of ``rank``'s part of ``epoch``'s deterministic plan, in order."""
    from scalelab.data.stream import planned_ids
    from scalelab.train.loop import per_worker_batch

    return planned_ids(
        data.source,
        data.meta["shards"]["train"],
        int(data.meta["row_group_rows"]),
        seed=spec.train.seed,
        epoch=epoch,
        window=spec.data.shuffle_window,
        rank=rank,
        world_size=world_size,
        batch=per_worker_batch(spec.train.batch_size, world_size, spec.train.grad_accum_steps),
    )


def test_ray_data_reader_started_ahead_reads_the_epochs_plan(ray_session, tmp_path: Path):
    """Real Ray Data: the next epoch's reader (dataset, decode tasks, first batch) is started before
    the epoch asks for it; the epoch then hands out exactly its plan's ids, from the start and from
    a resume position; an unused one is stopped."""
    from scalelab.data.dataset import Dataset, Split
    from scalelab.data.shards import open_sharded, write_shards
    from scalelab.data.stream import RayDataLoader, StreamConfig, planned_ids

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (400, 8, 8, 1)).astype(np.uint8)
    y = np.arange(400) % 4
    parts = {"train": slice(0, 320), "val": slice(320, 360), "test": slice(360, 400)}
    mem = Dataset(name="t", splits={k: Split(x[s], y[s]) for k, s in parts.items()}, classes=list("abcd"))
    ds = open_sharded(write_shards(mem, tmp_path / "t", shard_mb=0.005, row_group_rows=16))
    cfg = StreamConfig(ds.source, ds.meta["shards"]["train"], 16, 1, ds.mean, ds.std)
    loader = RayDataLoader(cfg, 16, window=2, rank=0, world_size=1, sample_log=str(tmp_path / "log"))
    plan = planned_ids(ds.source, cfg.shards, 16, seed=0, epoch=3, window=2, rank=0, world_size=1, batch=16)

    def epoch_ids(epoch: int, skip: int = 0) -> list[int]:
        (tmp_path / "log").unlink(missing_ok=True)
        loader.set_epoch(epoch)
        if skip:
            loader.start_at(skip)
        for _ in loader:
            pass
        return [i for r in map(json.loads, (tmp_path / "log").read_text().splitlines()) for i in r["ids"]]

    loader.prefetch(3)
    assert loader.ahead.ready.wait(120) and loader.ahead.error is None  # first batch there already
    assert epoch_ids(3) == plan
    loader.prefetch(3, 32)
    assert epoch_ids(3, 32) == plan[32:]
    loader.prefetch(4)
    loader.close()
    assert loader.ahead is None
