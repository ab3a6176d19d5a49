"""Ray Train runs against real services: local Ray, an `mlflow server`, the loopback S3 server.

Small on purpose (digits, msresnet_tiny, a few epochs, one thread per worker): the point is the
plumbing — workers, checkpoints on S3, resume after a killed worker or driver, and MLflow logging
that survives its server going away.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scalelab.config import load_recipe
from scalelab.train.api import run_training

pytestmark = pytest.mark.integration

FAST = ["model.variant=msresnet_tiny", "train.batch_size=64", "train.threads=1", "train.cpus_per_worker=1"]


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def test_two_workers_checkpoint_to_s3_and_log_everything(
    workdir: Path, ray_session, tracking_uri: str, s3_server, s3_bucket: str, tmp_path: Path
):
    import boto3
    import mlflow

    from scalelab.artifacts.bundle import load_model_bundle
    from scalelab.tracking import download_bundle
    from scalelab.tracking.runs import using_tracking_uri

    spec = load_recipe(
        "pipelines/digits.yaml",
        FAST
        + [
            "train.workers=2",
            "train.epochs=3",
            "train.num_to_keep=2",
            "train.run_name=two",
            f"train.storage_path=s3://{s3_bucket}/runs",
            f"train.storage_endpoint={s3_server.url}",
        ],
    )
    out = run_training(spec)
    assert [h["epoch"] for h in out.history] == [1, 2, 3] and out.history[0]["world_size"] == 2
    assert out.metrics["test_acc"] > 0.5

    # checkpoints live on the S3 server, pruned to num_to_keep (the latest always kept)
    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_server.url).list_objects_v2(
            Bucket=s3_bucket, Prefix="runs/two/"
        )["Contents"]
    ]
    ckpts = sorted({k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_0")})
    assert "checkpoint_0003" in ckpts and len(ckpts) <= 2
    assert "runs/two/checkpoint_0003/model.safetensors" in keys
    assert "runs/two/checkpoint_0003/optimizer.safetensors" in keys

    client = mlflow_client(tracking_uri)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.workers"] == "2" and run.data.params["model.variant"] == "msresnet_tiny"
    tags = run.data.tags
    for key in (
        "git.commit",
        "git.dirty",
        "scalelab.spec_hash",
        "data.name",
        "data.hash",
        "ray.job_id",
        "ray.version",
        "scalelab.version",
        "weights_sha256",
    ):
        assert tags.get(key), key
    for name in ("train_loss", "val_acc", "lr", "images_per_s", "epoch_seconds"):
        assert [m.step for m in client.get_metric_history(out.run_id, name)] == [1, 2, 3], name
    assert run.data.metrics["test_acc"] == pytest.approx(out.metrics["test_acc"])
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "digits"
    top = {a.path for a in client.list_artifacts(out.run_id)}
    assert {
        "bundle",
        "checkpoint",
        "metrics.json",
        "recipe.yaml",
        "training_curves.png",
        "confusion_matrix.png",
    } <= top
    assert {a.path for a in client.list_artifacts(out.run_id, "bundle")} == {
        "bundle/model.json",
        "bundle/model.safetensors",
        "bundle/samples.json",  # held-out samples with true labels, for the demo page
    }

    # the scalelab bundle round-trips through MLflow (what the registry and serving load)
    bundle = download_bundle(out.run_id, tmp_path / "dl")
    model, meta = load_model_bundle(bundle)
    assert meta["weights_sha256"] == tags["weights_sha256"]

    # the MLflow model (pt2) loads back and predicts any batch size like the bundle does
    from scalelab.data import load_dataset
    from scalelab.train.api import example_batch

    x = torch.from_numpy(example_batch(load_dataset(spec.data), n=5))
    with using_tracking_uri(tracking_uri):  # no global MLflow state left for other tests
        logged = mlflow.pytorch.load_model(f"runs:/{out.run_id}/model")
    with torch.no_grad():
        got, want = logged(x), model.eval()(x)
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-3, atol=1e-3)


def test_killed_worker_resumes_from_its_last_checkpoint(workdir: Path, ray_session, monkeypatch, tmp_path):
    marker = tmp_path / "killed"
    monkeypatch.setenv("SCALELAB_FAULT_INJECT", f"rank=1,epoch=2,marker={marker}")
    spec = load_recipe(
        "pipelines/digits.yaml",
        FAST
        + [
            "train.workers=2",
            "train.epochs=4",
            "train.max_failures=2",
            "train.run_name=wk",
            "tracking.enabled=false",
        ],
    )
    out = run_training(spec)
    assert marker.exists(), "the fault was not injected"
    assert [h["epoch"] for h in out.history] == [1, 2, 3, 4]
    # restarted from a checkpoint, not from 0; at most one checkpoint interval lost
    resumed = out.metrics["resumed_from_epoch"]
    assert resumed in (1, 2), out.history
    assert [h["resumed_from"] for h in out.history][-1] == resumed


def _checkpoints_registered(run_dir: Path) -> int:
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snap.read_text()).get("checkpoint_results", []).__len__()
    except (OSError, ValueError):
        return 0


def test_killed_driver_resumes_when_the_command_is_rerun(workdir: Path, ray_session, tracking_uri: str):
    epochs = 5  # the driver dies right after the first checkpoint (polled every 0.2 s): 4 still to run
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_session.address_info["gcs_address"],
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_TRACKING_URI": tracking_uri,
    }
    cmd = [
        sys.executable,
        "-m",
        "scalelab.cli",
        "train",
        "pipelines/digits.yaml",
        *FAST,
        "train.batch_size=32",
        "train.workers=1",
        f"train.epochs={epochs}",
        "train.run_name=drv",
    ]
    run_dir = workdir / ".scalelab/runs/drv"
    with open(workdir / "first.log", "w") as log:
        first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 150
        while _checkpoints_registered(run_dir) < 1:
            assert first.poll() is None, (workdir / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint registered in time"
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGKILL)  # the driver only; Ray cleans up its job's actors
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not (workdir / "outputs/drv/metrics.json").exists(), "the first run finished before the kill"
    time.sleep(2)  # let Ray notice the dead driver and release its workers

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    result = json.loads((workdir / "outputs/drv/metrics.json").read_text())
    assert result["resumed_from_epoch"] >= 1
    assert [h["epoch"] for h in result["history"]] == list(range(1, epochs + 1))

    # the rerun continued the same MLflow run: one run of that name, every epoch logged
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name("scalelab")
    runs = client.search_runs([exp.experiment_id], "tags.`scalelab.run_name` = 'drv'")
    assert len(runs) == 1 and runs[0].data.tags["scalelab.resumed"] == "1"
    assert runs[0].info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "val_acc")}
    assert steps == set(range(1, epochs + 1))


@pytest.fixture()
def own_mlflow_server(mlflow_server):
    """A second `mlflow server` this test may stop and restart; it shares the session server's
    (already migrated) SQLite database, so it starts in seconds."""
    from scalelab.cluster.services import start_mlflow_server

    state = Path(mlflow_server.log).parent
    backend = f"sqlite:///{state / 'mlflow.db'}"
    box = {"svc": start_mlflow_server(state / "own", backend_uri=backend)}
    box["backend"] = backend
    yield box
    box["svc"].stop()


def test_training_survives_the_tracking_server_going_away(workdir: Path, own_mlflow_server, monkeypatch):
    from scalelab.cluster.services import start_mlflow_server

    svc = own_mlflow_server["svc"]
    port = int(svc.url.rsplit(":", 1)[1])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", svc.url)
    restarted = threading.Event()

    def restart() -> None:
        own_mlflow_server["svc"] = start_mlflow_server(
            Path(svc.log).parent, port=port, backend_uri=own_mlflow_server["backend"]
        )
        restarted.set()

    def on_epoch(metrics: dict) -> None:
        if metrics["epoch"] == 1:
            svc.stop()  # by pid: the server is gone from epoch 2 on
        if metrics["epoch"] == 3:
            threading.Thread(target=restart, daemon=True).start()  # back while training goes on

    spec = load_recipe(
        "pipelines/digits.yaml",
        FAST + ["train.epochs=5", "train.run_name=outage", "tracking.flush_timeout_s=120"],
    )
    out = run_training(spec, on_epoch=on_epoch)
    assert restarted.is_set()
    assert len(out.history) == 5 and out.metrics["test_acc"] > 0.5

    client = mlflow_client(own_mlflow_server["svc"].url)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(out.run_id, "val_acc")] == [1, 2, 3, 4, 5]
    assert "test_acc" in run.data.metrics
    assert {"bundle", "metrics.json"} <= {a.path for a in client.list_artifacts(out.run_id)}


def test_lean_trainer_leaves_out_only_the_actors_a_one_run_driver_never_needs(tmp_path: Path):
    """Against the installed Ray Train (no cluster needed): the callbacks scalelab drops exist under
    these names (a Ray upgrade renaming them fails here, not silently), and only they are dropped."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from scalelab.train.ray_trainer import lean_torch_trainer_class

    kw = {"scaling_config": ScalingConfig(num_workers=1), "run_config": RunConfig(storage_path=str(tmp_path))}

    def names(trainer) -> list[str]:
        return [type(cb).__name__ for cb in trainer._create_default_callbacks()]

    plain = names(TorchTrainer(lambda: None, **kw))
    assert {"DatasetsCallback", "PlacementGroupCleanerCallback", "BackendSetupCallback"} <= set(plain)
    one_run = names(lean_torch_trainer_class(drop_placement_group_cleaner=True)(lambda: None, **kw))
    assert one_run == [n for n in plain if n not in ("DatasetsCallback", "PlacementGroupCleanerCallback")]
    in_tune = names(lean_torch_trainer_class(drop_placement_group_cleaner=False)(lambda: None, **kw))
    assert in_tune == [n for n in plain if n != "DatasetsCallback"]


# A one-worker run on the local Ray its driver starts for itself (as `scalelab train` without a
# cluster does); prints what the checks below need while that Ray still runs.
OWN_LOCAL_RAY_RUN = """
import json, sys
from pathlib import Path
import ray
from scalelab.cluster.session import connect_ray
from scalelab.config import load_recipe
from scalelab.train.api import run_training

connect_ray(num_cpus=2, stack_file=Path("no-stack.json"))
spec = load_recipe("pipelines/digits.yaml", sys.argv[1:])
out = run_training(spec)
named = ray.util.list_named_actors(all_namespaces=True)
print(json.dumps({"test_acc": out.metrics["test_acc"], "named_actors": named}))
ray.shutdown()
"""


def test_a_run_on_its_own_local_ray_starts_only_what_it_needs(workdir: Path):
    """On a Ray without an autoscaler, a run trains without Ray Train's AutoscalingCoordinator: a
    detached actor that Ray creates on a cluster's first run (~1.1 s on that run's path to its first
    step) and keeps as a Python process for the cluster's lifetime, for an autoscaler to read."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    overrides = [*FAST, "train.workers=1", "train.epochs=1", "tracking.enabled=false", "train.run_name=own"]
    proc = subprocess.run(
        [sys.executable, "-c", OWN_LOCAL_RAY_RUN, *overrides],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.0 < seen["test_acc"] <= 1.0
    assert not [a for a in seen["named_actors"] if "AutoscalingCoordinator" in a["name"]], seen
