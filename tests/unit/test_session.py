"""The Ray session (stack file, connect_ray), runtime settings, and what a failed Ray Train run says.

No Ray is started: the Ray exception classes are built by hand, as Ray Train V2 raises them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scalelab.cluster import session
from scalelab.config.settings import env_names, runtime_settings
from scalelab.errors import ClusterError, ConfigError

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- stack file


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_a_corrupt_stack_file_is_an_error_never_a_silent_fallback(workdir, content):
    from scalelab.tracking.uri import resolve_tracking_uri

    session.STACK_FILE.parent.mkdir()
    session.STACK_FILE.write_text(content)
    with pytest.raises(ClusterError) as err:
        resolve_tracking_uri()
    message = str(err.value)
    assert str(session.STACK_FILE) in message and "scalelab up" in message and "rm " in message
    assert not (workdir / ".scalelab" / "mlflow.db").exists()  # no embedded store made behind its back


def test_tracking_uri_comes_from_the_stack_else_the_embedded_store(workdir):
    from scalelab.tracking.uri import resolve_tracking_uri

    assert resolve_tracking_uri().startswith("sqlite:///")  # no stack file: embedded SQLite
    session.write_stack({"mlflow_url": "http://127.0.0.1:5999", "services": []})
    assert resolve_tracking_uri() == "http://127.0.0.1:5999"
    assert json.loads(session.STACK_FILE.read_text())["mlflow_url"] == "http://127.0.0.1:5999"


def test_live_ray_address_only_for_a_running_head(workdir):
    head = {"name": "ray", "pid": os.getpid(), "url": "127.0.0.1:1", "log": "x"}
    session.write_stack({"ray_address": "127.0.0.1:1", "services": [head]})
    assert session.live_ray_address() == "127.0.0.1:1"
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    session.write_stack({"ray_address": "127.0.0.1:1", "services": [{**head, "pid": dead}]})
    assert session.live_ray_address() is None


# ----------------------------------------------------------------------------- connecting


DEAD_ADDRESS_PROBE = """
import re, sys
import ray
from scalelab.cluster import session
from scalelab.cluster.services import free_port
from scalelab.errors import ClusterError

assert not ray.is_initialized()
cases = [(None, r"\\(from \\$RAY_ADDRESS\\)"), (f"127.0.0.1:{free_port()}", r"\\(from --address\\)")]
for address, origin in cases:
    try:
        session.connect_ray(address)
    except ClusterError as exc:
        assert re.search(r"no Ray head answers at 127\\.0\\.0\\.1:\\d+ " + origin, str(exc)), str(exc)
    else:
        sys.exit(f"connected to a dead address {address}")
assert not ray.is_initialized()
print("refused both")
"""


def test_connect_ray_fails_fast_and_names_where_a_dead_address_came_from(workdir, monkeypatch):
    # A fresh process: connect_ray first reuses a Ray this process already holds, and the
    # integration tests' session Ray may be up in this one.
    from scalelab.cluster.services import free_port

    monkeypatch.setenv("SCALELAB_RAY_CONNECT_TIMEOUT_S", "2")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")  # nothing listens there
    out = subprocess.run(
        [sys.executable, "-c", DEAD_ADDRESS_PROBE], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "refused both" in out.stdout, out.stdout + out.stderr


def test_jobs_api_address(workdir, monkeypatch):
    monkeypatch.delenv("RAY_DASHBOARD_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match="scalelab up"):
        session.jobs_api_address()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # already said: nothing to re-read
    session.write_stack({"dashboard_url": "http://127.0.0.1:8265", "ray_auth_mode": "token"})
    assert session.jobs_api_address() == "http://127.0.0.1:8265"
    assert session.jobs_api_address("http://other:8265") == "http://other:8265"


# ----------------------------------------------------------------------------- settings


def test_settings_come_from_scalelab_environment_variables(monkeypatch):
    assert runtime_settings().job_poll_interval_s == 1.0
    monkeypatch.setenv("SCALELAB_JOB_POLL_INTERVAL_S", "0.25")
    monkeypatch.setenv("SCALELAB_API_KEY", "not a setting")  # other SCALELAB_* variables are ignored
    assert runtime_settings().job_poll_interval_s == 0.25
    monkeypatch.setenv("SCALELAB_MLFLOW_START_TIMEOUT_S", "-1")
    with pytest.raises(ConfigError, match="SCALELAB_MLFLOW_START_TIMEOUT_S"):
        runtime_settings()


def test_resilient_logger_takes_its_defaults_from_the_settings(monkeypatch):
    from scalelab.tracking.resilient import ResilientLogger

    monkeypatch.setenv("SCALELAB_MLFLOW_BACKOFF_S", "2.5")
    log = ResilientLogger(object(), "run")
    assert log.backoff_s == 2.5 and log.call_timeout_s == 5.0
    assert ResilientLogger(object(), "run", backoff_s=0.1).backoff_s == 0.1  # explicit wins


def test_every_setting_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    missing = [name for name in env_names() if name not in readme]
    assert not missing, f"README lacks: {missing}"
    assert all(env_names().values())  # and each has a description where it is declared


# ----------------------------------------------------------------------------- Ray Train failures


def _spec(max_failures: int):
    from scalelab.config import load_recipe

    return load_recipe(REPO / "pipelines" / "digits.yaml", [f"train.max_failures={max_failures}"])


def test_an_error_in_the_training_code_is_named_with_the_attempts_it_really_had():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from scalelab.errors import DataError
    from scalelab.train.ray_trainer import explain_failure

    raised = UserExceptionWithTraceback(ValueError("bad shape (3, 8)"), "Traceback ...\nValueError: bad")
    exc = WorkerGroupError("rank 0 failed", {0: raised})
    text = explain_failure(exc, _spec(2), "r1")
    assert "the training code rank 0 raised ValueError: bad shape (3, 8)" in text
    assert "last of 3 attempts" in text and "train.max_failures=2" in text and "--resume r1" in text
    text = explain_failure(exc, _spec(0), "r1")
    assert "no restart: train.max_failures=0" in text and "restart(s)" not in text
    # a scalelab error raised in a worker keeps its whole message (it says what to do)
    data_error = DataError("prepared dataset missing\nrun `scalelab data prepare`")
    exc = WorkerGroupError("x", {1: UserExceptionWithTraceback(data_error, "tb")})
    assert "rank 1 raised DataError: prepared dataset missing\nrun `scalelab data prepare`" in (
        explain_failure(exc, _spec(1), "r1")
    )


def test_a_lost_worker_and_a_controller_error_say_so():
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from scalelab.train.ray_trainer import explain_failure

    died = WorkerHealthCheckFailedError("Worker health check failed.", failure=ActorDiedError())
    text = explain_failure(WorkerGroupError("x", {1: died}), _spec(2), "r2")
    assert re.search(r"worker rank 1 stopped \(WorkerHealthCheckFailedError: .*\) \(the last of 3", text)
    assert "raised" not in text
    text = explain_failure(ControllerError(RuntimeError("no GPU nodes")), _spec(2), "r3")
    assert "controller, which does not retry" in text and "RuntimeError: no GPU nodes" in text
    assert "attempt" not in text
    text = explain_failure(ConnectionError("GCS unreachable"), _spec(2), "r4")
    assert "outside training (no worker restart was tried): ConnectionError: GCS unreachable" in text
