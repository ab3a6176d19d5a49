"""The console a user reads: `scalelab pipeline run` on digits (small budget) as a real command, on
a Ray head of its own, stays within a line budget, without per-request lines or warnings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scalelab.cluster.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LINE_BUDGET = 120


def test_pipeline_console_is_short_and_quiet(workdir, tracking_uri):
    port = free_port()
    overrides = [
        "model.variant=msresnet_tiny",
        "search.num_samples=2",
        "search.max_epochs=2",
        "search.max_concurrent_trials=2",
        "search.space={model.scales: {choice: [1, 4]}}",
        "train.epochs=6",
        "train.threads=1",
        "promotion.min_accuracy=0.5",
        "promotion.latency_p95_ms=2000",
        "promotion.allow_unversioned_data=true",
        f"serve.port={port}",
        "tracking.experiment=console-test",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_SERVE_LOG_TO_STDERR")}
    env["PYTHONPATH"] = str(REPO / "platform")
    cmd = [sys.executable, "-m", "scalelab.cli"]
    try:
        proc = subprocess.run(
            [*cmd, "pipeline", "run", "pipelines/digits.yaml", *overrides],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
    finally:
        subprocess.run([*cmd, "down"], capture_output=True, text=True, timeout=120, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    lines = out.splitlines()
    assert len(lines) <= LINE_BUDGET, f"{len(lines)} lines:\n{out}"
    assert "smoke" in out and "pipeline done" in out
    # Serve's access lines look like "... POST /v1/predict 200 3.1ms"; the smoke test sent 200 requests
    per_request = [line for line in lines if re.search(r"(GET|POST) /v1/", line)]
    assert sum("/v1/predict" in line for line in lines) <= 2, out
    assert not per_request, per_request[:5]
    assert "UserWarning" not in out and "Reporting training result" not in out
    assert "View run" not in out and "Checkpoint successfully created" not in out
    assert "authentication token" not in out
    # what it does say: where the runs are, how to look at them, where the logs went
    assert re.search(r"training: MLflow run [0-9a-f]{32} at http://127\.0\.0\.1:\d+", out), out[-3000:]
    assert "view it: http://127.0.0.1:" in out
    logs = re.search(r"logs: Ray (\S+) \(Serve's request logs in serve/\)", out)
    assert logs, out[-2000:]
    serve_logs = Path(logs.group(1)) / "serve"
    assert any("/v1/predict" in p.read_text(errors="replace") for p in serve_logs.glob("*.log"))
