"""Session-wide real services: one local Ray, one `mlflow server`, one moto S3 server.

Each starts once per test session (MLflow's first start runs schema migrations: ~25 s) and is
stopped by process id at the end. Tests get their own experiment / bucket names.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from scalelab.cluster.services import start_mlflow_server, start_s3_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def mlflow_server(services_dir: Path):
    """A real `mlflow server` on loopback with a SQLite backend; yields its Service (``.url``)."""
    svc = start_mlflow_server(services_dir / "mlflow")
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def s3_server(services_dir: Path):
    """moto's S3-compatible server on loopback; credentials are dummies set in the environment."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    svc = start_s3_server(services_dir)
    yield svc
    svc.stop()


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server.url).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (logical CPUs > physical: trials are small)."""
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ctx = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ctx
    ray.shutdown()


@pytest.fixture()
def tracking_uri(mlflow_server, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    return mlflow_server.url
