"""`scalelab ui`: a real `mlflow server` on the embedded store, answered over HTTP, stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from scalelab.cluster.services import free_port

pytestmark = pytest.mark.integration


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_ui_serves_the_embedded_store_and_stops_on_sigterm(workdir):
    import mlflow

    db = workdir / ".scalelab" / "mlflow.db"
    db.parent.mkdir()
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.create_experiment("ui-test")
    run = client.create_run(exp, run_name="seen-in-the-ui")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "platform")}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "scalelab"), "ui", "--port", str(port), "--run", run.info.run_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        deadline = time.time() + 150
        url = None
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            m = re.search(r"MLflow UI\s+(http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert url == f"http://127.0.0.1:{port}", lines
        link = proc.stdout.readline()  # `--run`: the run's own page in that UI
        assert link.split() == ["run", f"{url}/#/experiments/{exp}/runs/{run.info.run_id}"], link
        with urllib.request.urlopen(url, timeout=10) as r:  # the UI's page
            assert r.status == 200 and "mlflow" in r.read().decode().lower()
        with urllib.request.urlopen(
            f"{url}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}", timeout=10
        ) as r:  # the project's store behind it
            assert json.load(r)["run"]["info"]["run_name"] == "seen-in-the-ui"
        servers = _children(proc.pid)
        assert servers, "the mlflow server should be a child of `scalelab ui`"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        lines.append(out)
        assert proc.returncode == 0, "".join(lines)
        assert "MLflow UI stopped" in out
        assert not any(_alive(pid) for pid in servers)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
