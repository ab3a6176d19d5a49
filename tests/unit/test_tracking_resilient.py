"""Retry/buffer logic of MLflow logging against a fake server that goes away and comes back."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from scalelab.tracking.resilient import ResilientLogger


class Refused(Exception):
    error_code = "INVALID_PARAMETER_VALUE"


class FakeClient:
    """Stands in for MlflowClient: records batches; raises ConnectionError while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.calls: list[tuple[str, object]] = []
        self.attempts = 0

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.attempts += 1
        if self.down:
            raise ConnectionError("connection refused")
        for m in metrics:
            self.calls.append(("metric", (m.key, m.step, m.value)))
        for p in params:
            if p.key == "bad":
                raise Refused("param changed")
            self.calls.append(("param", (p.key, p.value)))
        for t in tags:
            self.calls.append(("tag", (t.key, t.value)))

    def log_artifacts(self, run_id, local_dir, artifact_path=None):
        self.attempts += 1
        if self.down:
            raise ConnectionError("connection refused")
        self.calls.append(("artifacts", artifact_path))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def make(client: FakeClient, clock: Clock, tmp_path: Path | None = None) -> ResilientLogger:
    spill = tmp_path / "unsent.json" if tmp_path else None
    return ResilientLogger(
        client, "run1", backoff_s=1.0, max_backoff_s=4.0, clock=clock, sleep=clock.sleep, spill_path=spill
    )


def test_logs_go_through_in_order_when_the_server_answers():
    client, clock = FakeClient(), Clock()
    log = make(client, clock)
    log.log_params({"train.lr": 0.1, "model.depths": [1, 2]})
    log.log_metrics({"val_acc": 0.5, "flag": True, "name": "x"}, step=1)
    assert client.calls == [
        ("param", ("train.lr", "0.1")),
        ("param", ("model.depths", "[1, 2]")),
        ("metric", ("val_acc", 1, 0.5)),
    ]  # non-numbers are not metrics
    assert log.pending == 0


def test_outage_buffers_backs_off_and_flushes_in_order_when_back(caplog):
    client, clock = FakeClient(), Clock()
    log = make(client, clock)
    log.log_metrics({"val_acc": 0.1}, step=1)
    client.down = True
    with caplog.at_level(logging.WARNING, logger="scalelab.tracking"):
        log.log_metrics({"val_acc": 0.2}, step=2)  # fails: buffered, backoff 1 s
        attempts = client.attempts
        log.log_metrics({"val_acc": 0.3}, step=3)  # within the backoff: no new request at all
        assert client.attempts == attempts and log.pending == 2
        clock.now += 1.5
        log.log_metrics({"val_acc": 0.4}, step=4)  # one retry, fails again; backoff doubles
        assert client.attempts == attempts + 1 and log.next_attempt == pytest.approx(1.5 + 2.0)
        client.down = False
        clock.now += 2.5
        log.log_metrics({"val_acc": 0.5}, step=5)
    assert [c[1][1] for c in client.calls] == [1, 2, 3, 4, 5]  # nothing lost, order kept
    assert log.pending == 0 and log.failures == 0
    text = caplog.text
    assert "unreachable" in text and "is back" in text
    assert text.count("unreachable") == 1  # one warning per outage, not one per call


def test_flush_waits_for_the_server_to_return():
    client, clock = FakeClient(), Clock()
    log = make(client, clock)
    client.down = True
    log.log_artifacts("/tmp/x", "bundle")

    def come_back(seconds: float) -> None:
        clock.now += seconds
        if clock.now > 5:
            client.down = False

    log.sleep = come_back
    report = log.flush(timeout_s=30)
    assert report.ok and ("artifacts", "bundle") in client.calls
    assert clock.now < 30


def test_flush_gives_up_with_a_clear_warning_and_saves_what_was_lost(tmp_path, caplog):
    client, clock = FakeClient(), Clock()
    log = make(client, clock, tmp_path)
    client.down = True
    log.log_metrics({"val_acc": 0.9, "train_loss": 0.1}, step=7)
    log.log_artifacts("/tmp/x", "bundle")
    with caplog.at_level(logging.WARNING, logger="scalelab.tracking"):
        report = log.flush(timeout_s=10)
    assert not report.ok and report.lost == ["metrics step 7", "artifacts bundle/ from /tmp/x"]
    assert clock.now == pytest.approx(10, abs=4.1)  # bounded by the timeout (plus one backoff)
    assert "NOT recorded" in caplog.text and "metrics step 7" in caplog.text
    saved = json.loads((tmp_path / "unsent.json").read_text())
    assert saved["lost"][0]["values"] == {"val_acc": 0.9, "train_loss": 0.1} and saved["lost"][0]["step"] == 7


def test_a_refused_call_is_dropped_and_the_rest_goes_on(caplog):
    client, clock = FakeClient(), Clock()
    log = make(client, clock)
    with caplog.at_level(logging.WARNING, logger="scalelab.tracking"):
        log.log_params({"bad": 1})
        log.log_metrics({"val_acc": 0.5}, step=1)
    assert ("metric", ("val_acc", 1, 0.5)) in client.calls and log.pending == 0
    assert "refused" in caplog.text
    assert log.flush(1).lost == ["1 params"]


def test_quick_requests_is_scoped_to_the_caller_and_leaves_the_environment_alone(monkeypatch):
    import os
    import threading

    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    from scalelab.tracking.resilient import quick_requests

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    env_before = dict(os.environ)
    seen_elsewhere = {}
    with quick_requests(3):
        # what MLflow's HTTP layer reads, in this thread: one try, a 3 s timeout
        assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 0
        assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 3
        assert dict(os.environ) == env_before  # the process environment is never changed
        other = threading.Thread(
            target=lambda: seen_elsewhere.update(
                retries=MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), timeout=MLFLOW_HTTP_REQUEST_TIMEOUT.get()
            )
        )
        other.start()
        other.join()
    assert seen_elsewhere == {"retries": MLFLOW_HTTP_REQUEST_MAX_RETRIES.default, "timeout": 120}
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 120  # after the block: the environment's value again


def test_storage_location_and_fault_spec(monkeypatch, workdir):
    from scalelab.config import load_recipe
    from scalelab.train.ray_trainer import parse_fault, storage_location

    spec = load_recipe("pipelines/digits.yaml", ["train.storage_path=runs"])
    path, fs = storage_location(spec)
    assert fs is None and Path(path) == workdir / "runs"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    spec = load_recipe(
        "pipelines/digits.yaml",
        ["train.storage_path=s3://bkt/pre/", "train.storage_endpoint=http://127.0.0.1:9"],
    )
    path, fs = storage_location(spec)
    assert path == "bkt/pre" and fs.type_name == "s3"
    assert fs.__reduce__()[1][0]["endpoint_override"] == "127.0.0.1:9"  # travels to workers with keys
    spec = load_recipe(
        "pipelines/digits.yaml", ["train.storage_path=s3://b/p?endpoint_override=h:1&scheme=http"]
    )
    assert storage_location(spec) == ("s3://b/p?endpoint_override=h:1&scheme=http", None)
    assert parse_fault("rank=1,epoch=2,marker=/tmp/m") == {
        "rank": 1,
        "epoch": 2,
        "marker": "/tmp/m",
        "step": None,
    }
    assert parse_fault("rank=0,epoch=1,marker=/tmp/m,step=10")["step"] == 10
    assert parse_fault("") is None


def test_stack_down_stops_only_what_it_recorded(workdir):
    from scalelab.cluster import stack
    from scalelab.cluster.services import Service

    mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        svc = Service("mlflow", mine.pid, "http://127.0.0.1:1", "log")
        stack.write_stack({"services": [svc.to_dict()], "mlflow_url": svc.url})
        assert [r["alive"] for r in stack.status()] == [True]
        assert [s.name for s in stack.down()] == ["mlflow"]
        mine.wait(timeout=10)
        assert other.poll() is None  # never touched
        assert not stack.STACK_FILE.exists() and stack.status() == []
    finally:
        for p in (mine, other):
            if p.poll() is None:
                p.kill()
                p.wait()
