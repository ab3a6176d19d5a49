"""Session-wide real services: one local Ray, one `mlflow server`, one moto S3 server.

Each starts once per test session (MLflow's first start runs schema migrations: ~25 s) and is
stopped by process id at the end. Tests get their own experiment / bucket names.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import pytest

from scalelab.cluster.services import start_mlflow_server, start_s3_server
from scalelab.cluster.session import serve_ingress_env

pytestmark = pytest.mark.integration

# On a loaded 2-core CI host an `mlflow server` started by a test once took over the product's
# default 120 s to answer /health (it passed in 10-20 s rerun idle): tests allow it longer.
os.environ.setdefault("SCALELAB_MLFLOW_START_TIMEOUT_S", "300")


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
    os.environ.update(serve_ingress_env())  # Serve tests run on the ingress users get (HAProxy)
    # address="local": always a fresh instance, never a `ray start` cluster left on this machine
    ctx = ray.init(
        address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    yield ctx
    _shutdown_and_reap(ray)


def _shutdown_and_reap(ray) -> None:
    """Stop Serve and the local Ray, then reap what outlived them.

    ``ray.shutdown`` kills the raylet and GCS it started, but not every grandchild: a Ray Train
    controller actor and the HAProxy that Serve's ingress spawns were seen running after the suite.
    The tree is recorded first (orphans lose their ancestry once their parents die).
    """
    import psutil

    me = psutil.Process()
    ray_tree = [
        p
        for p in me.children(recursive=True)
        if any(mark in " ".join(_cmdline(p)) for mark in ("ray::", "raylet", "gcs_server", "haproxy", "ray/"))
    ]
    from ray import serve

    with contextlib.suppress(Exception):  # Serve never started, or already gone
        serve.shutdown()
    ray.shutdown()
    _, alive = psutil.wait_procs(ray_tree, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def _cmdline(proc) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


@pytest.fixture()
def tracking_uri(mlflow_server, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    return mlflow_server.url


# ----------------------------------------------------------------------------- DVC repositories (issue 3)


@pytest.fixture()
def sh(monkeypatch, tmp_path):
    """Run a real command (``dvc``, ``git``, ``scalelab`` of this venv first on PATH) in the cwd.

    DVC analytics are off and DVC's site cache lives in the test's temp folder; git identity comes
    from the environment, so nothing global is written.
    """
    import subprocess
    import sys

    bin_dir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site-cache"))
    for var, value in (
        ("GIT_AUTHOR_NAME", "test"),
        ("GIT_AUTHOR_EMAIL", "test@example.com"),
        ("GIT_COMMITTER_NAME", "test"),
        ("GIT_COMMITTER_EMAIL", "test@example.com"),
    ):
        monkeypatch.setenv(var, value)

    def run(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


@pytest.fixture()
def dvc_repo(tmp_path, monkeypatch, sh) -> Path:
    """A fresh git + DVC repository in a temp folder, made the cwd (never the project's .dvc)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("dvc", "config", "core.analytics", "false")
    return repo


# ------------------------------------------------------------------------ registry + serving (issues 6, 7)


@pytest.fixture(scope="session")
def digits_bundles(tmp_path_factory) -> dict:
    """Three real digits models (msresnet_tiny, trained in-process once per session), as bundle folders:
    ``good`` (12 epochs, ~96%), ``bad`` (1 epoch, ~10-40%), ``better`` (25 epochs, ~98%)."""
    from scalelab.config import load_recipe
    from scalelab.train.api import run_training

    root = tmp_path_factory.mktemp("digits-bundles")
    (root / "pipelines").symlink_to(Path(__file__).resolve().parents[2] / "pipelines")
    old = os.getcwd()
    os.chdir(root)
    try:
        out = {}
        for label, epochs in (("good", 12), ("bad", 1), ("better", 25)):
            spec = load_recipe(
                "pipelines/digits.yaml",
                [
                    "model.variant=msresnet_tiny",
                    f"train.epochs={epochs}",
                    # fixed here, not the recipe's: the three must stay apart in accuracy (at the
                    # recipe's batch 64 / lr 0.16, 12 and 25 epochs tie at 0.9889)
                    "train.batch_size=128",
                    "train.lr=0.1",
                    "train.threads=1",
                    "tracking.enabled=false",
                    f"train.run_name={label}",
                    "promotion.allow_unversioned_data=true",  # a temp folder: no DVC, no git
                ],
            )
            outcome = run_training(spec)
            out[label] = {"dir": outcome.model_dir.resolve(), "test_acc": outcome.metrics["test_acc"]}
        return out
    finally:
        os.chdir(old)


@pytest.fixture(scope="session")
def headless_chromium():
    """``headless_chromium(profile_dir)``: Chromium's command line with the flags every browser test
    needs (headless, no sandbox/GPU/network chatter, a private profile), or None if not installed."""

    def command(profile_dir: str | Path) -> list[str] | None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            return None
        return [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile_dir}",
        ]

    return command


@pytest.fixture(scope="module")
def local_ray(request):
    """The session's Ray, but always a fresh local one: other clusters may run on this machine, and
    a bare ``ray.init()`` would attach to the latest of them."""
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"
    try:
        return request.getfixturevalue("ray_session")
    finally:
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old
