"""`scalelab predict` end to end: a registered model (real MLflow) on real Ray Data over an image
folder, a DVC-versioned dataset and a moto S3 prefix; accuracy equals offline evaluation exactly."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from scalelab.artifacts.evaluate import Images, evaluate_predictor
from scalelab.artifacts.predictor import Predictor
from scalelab.cluster.services import free_port
from scalelab.data.catalog import prepare
from scalelab.data.dataset import read_prepared
from scalelab.errors import DataError, RegistryError
from scalelab.predict.commands import predict_command
from scalelab.registry.register import log_bundle_run, register_run
from scalelab.tracking.bundles import connect

pytestmark = pytest.mark.integration
POOL = {"replicas": 1, "threads": 1, "quiet": True}  # the session Ray has 4 CPUs, shared


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def registered(mlflow_server, digits_bundles) -> dict:
    """The session's `good` digits bundle registered twice; @champion on version 2."""
    client = connect(mlflow_server.url)
    name = f"predict-{uuid.uuid4().hex[:6]}"
    run_id = log_bundle_run(client, digits_bundles["good"]["dir"], run_name=name)
    register_run(client, run_id, name=name)
    version = register_run(client, run_id, name=name).version
    client.set_registered_model_alias(name, "champion", version)
    return {"name": name, "version": str(version), "bundle": digits_bundles["good"]["dir"]}


@pytest.fixture()
def project(dvc_repo: Path, sh, tracking_uri, ray_session) -> Path:
    """A DVC project holding the digits recipe's prepared data, committed (a versioned dataset)."""
    from scalelab.config import load_recipe

    (dvc_repo / "pipelines").symlink_to(Path(__file__).resolve().parents[2] / "pipelines")
    prepare(load_recipe("pipelines/digits.yaml").data)
    sh("dvc", "add", "-q", "data/digits")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "digits")
    return dvc_repo


def read_out(path: Path) -> dict:
    return pq.read_table(path).to_pydict()


def test_folder_and_dataset_version_match_offline_evaluation(project: Path, registered, sh):
    test = read_prepared(project / "data/digits").splits["test"]
    classes = [str(c) for c in range(10)]
    for i, (x, y) in enumerate(zip(test.x, test.y, strict=True)):  # the same images as PNG files
        (project / "imgs" / classes[y]).mkdir(parents=True, exist_ok=True)
        (project / "imgs" / classes[y] / f"{i:04d}.png").write_bytes(png(x))
    (project / "imgs" / "3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    offline = evaluate_predictor(Predictor.from_bundle(registered["bundle"]), Images(test.x, test.y)).accuracy

    folder = predict_command(registered["name"], "imgs", out="folder.parquet", **POOL)
    assert (folder.images, folder.bad, folder.model_version) == (len(test.y), 1, registered["version"])
    assert "3/corrupt.png" in folder.bad_files[0]["error"]
    assert folder.accuracy == offline  # exactly: the same decoding, normalisation and precision
    rows = read_out(project / "folder.parquet")
    assert len(rows["file"]) == len(test.y) and "3/corrupt.png" not in rows["file"]
    assert set(rows["model"]) == {registered["name"]} and set(rows["model_version"]) == {
        registered["version"]
    }
    assert all(a >= b for a, b, *_ in rows["top_k_scores"]) and len(rows["top_k_classes"][0]) == 5
    labels = [f.split("/")[0] for f in rows["file"]]
    assert rows["label"] == labels and rows["prediction"] == [c[0] for c in rows["top_k_classes"]]

    # a dataset version: the recipe's data as DVC recorded it, by index; the alias and :version forms
    head = sh("git", "rev-parse", "HEAD").stdout.strip()
    by_version = f"{registered['name']}:{registered['version']}"
    data = predict_command(by_version, "digits", out="dataset.parquet", split="test", **POOL)
    assert data.accuracy == offline and data.images == len(test.y) and data.bad == 0
    assert data.data_version["rev"] == head and data.data_version["content_hash"].endswith(".dir")
    rows = read_out(project / "dataset.parquet")
    assert sorted(rows["index"]) == list(range(len(test.y)))
    by_index = dict(zip(rows["index"], rows["prediction"], strict=True))
    folder_rows = read_out(project / "folder.parquet")
    same = {
        int(f.split("/")[1][:4]): p
        for f, p in zip(folder_rows["file"], folder_rows["prediction"], strict=True)
    }
    assert same == by_index  # each image predicted alike from its PNG and from the dataset

    # --on-bad-file fail stops at the corrupt file, naming it, and writes nothing
    with pytest.raises(DataError, match="corrupt.png.*--on-bad-file skip"):
        predict_command(registered["name"], "imgs/3", out="fail.parquet", on_bad_file="fail", **POOL)
    assert not (project / "fail.parquet").exists()
    assert not [p for p in project.iterdir() if p.name.startswith(".predictions-")]


def test_s3_prefix_in_and_out(
    registered, s3_server, s3_bucket, tracking_uri, ray_session, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)  # the project's S3, as a job would get it
    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    rng = np.random.default_rng(0)
    for i in range(12):
        s3.put_object(
            Bucket=s3_bucket, Key=f"in/{i:02d}.png", Body=png(rng.integers(0, 256, (8, 8, 1), np.uint8))
        )
    s3.put_object(Bucket=s3_bucket, Key="in/readme.txt", Body=b"not an image")
    out = f"s3://{s3_bucket}/out/preds.parquet"
    summary = predict_command(f"{registered['name']}@champion", f"s3://{s3_bucket}/in", out=out, **POOL)
    assert (summary.images, summary.bad, summary.accuracy) == (12, 0, None)  # a flat prefix: no labels
    local = tmp_path / "preds.parquet"
    s3.download_file(s3_bucket, "out/preds.parquet", str(local))
    rows = read_out(local)
    assert sorted(rows["file"]) == [f"{i:02d}.png" for i in range(12)] and set(rows["label"]) == {None}


def test_clear_errors_before_anything_runs(registered, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "1.png").write_bytes(b"x")
    with pytest.raises(RegistryError, match=f"no registered model named 'nope'.*{registered['name']}"):
        predict_command("nope", "imgs", **POOL)
    with pytest.raises(RegistryError, match="no alias @gone"):
        predict_command(f"{registered['name']}@gone", "imgs", **POOL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        predict_command(registered["name"], "empty", **POOL)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DataError, match=f"endpoint {dead}.*unreachable"):
        predict_command(registered["name"], "s3://bucket/prefix", endpoint_url=dead, **POOL)
    assert not os.listdir(tmp_path / "empty")
