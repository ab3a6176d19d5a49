"""`scalelab pipeline run` on digits end to end (small budget), against a real MLflow server, Ray
(Tune, Serve) and real HTTP. One pipeline run serves two checks: the first run is the real command
on a Ray head of its own, whose console a user reads (short, quiet, says where things are); then
the same project again in-process on the session's Ray: the second run skips, --from train reruns,
and a failure injected in the serve step leaves registry and data untouched."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scalelab.cluster.services import free_port
from scalelab.pipeline.commands import run_pipeline
from scalelab.pipeline.runner import StepFailed

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LINE_BUDGET = 120
STEPS = ["data", "tune", "train", "register", "promote", "serve", "smoke", "report"]


def small(port: int) -> list[str]:
    return [
        "model.variant=msresnet_tiny",
        "search.num_samples=2",
        "search.max_epochs=2",
        "search.max_concurrent_trials=2",
        "search.space={model.scales: {choice: [1, 4]}, train.lr: {loguniform: [0.05, 0.2]}}",
        "train.epochs=6",
        "train.threads=1",
        "promotion.min_accuracy=0.5",
        "promotion.latency_p95_ms=2000",
        "promotion.allow_unversioned_data=true",  # a temp folder: no DVC, no git
        f"serve.port={port}",
        "tracking.experiment=pipeline-test",
    ]


@pytest.fixture()
def serve_cleanup(ray_session):
    yield
    from ray import serve

    serve.shutdown()


def check_console(out: str) -> None:
    """What the first run's console says, and what it leaves out."""
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


def test_pipeline_console_end_to_end_skip_rerun_and_failure(
    workdir, tracking_uri, ray_session, serve_cleanup, headless_chromium
):
    import mlflow

    over = small(free_port())
    # the first run: the real command, on a Ray head it starts itself (stopped by `down` below)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_SERVE_LOG_TO_STDERR")}
    env["PYTHONPATH"] = str(REPO / "platform")
    cmd = [sys.executable, "-m", "scalelab.cli"]
    try:
        proc = subprocess.run(
            [*cmd, "pipeline", "run", "pipelines/digits.yaml", *over],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        console = proc.stdout + proc.stderr
        assert proc.returncode == 0, console[-4000:]
        assert re.findall(r"\[\d/8\] (\w+)\s+running", console) == STEPS, console[-3000:]
        check_console(console)

        # second run (in-process): every step is up to date, the service on the head still answers
        logs: list[str] = []
        out = run_pipeline("pipelines/digits.yaml", over, None, None, log=logs.append)
        assert len(logs) == len(STEPS) and all("skipped" in line for line in logs), logs
    finally:
        subprocess.run([*cmd, "down"], capture_output=True, text=True, timeout=120, env=env)

    # the first run's outputs (the second run returns them from the pipeline's saved state)
    smoke = out["smoke"]
    assert smoke["errors"] == 0 and smoke["images"] > 50
    assert abs(smoke["served_test_acc"] - smoke["offline_test_acc"]) <= 0.03
    assert out["promote"]["decision"] == "promoted"
    html = Path(out["report"]["html"])
    assert html.is_file() and "data:image/png;base64" in html.read_text()
    assert Path(out["report"]["markdown"]).is_file()
    client = mlflow.MlflowClient(tracking_uri)
    arts = [a.path for a in client.list_artifacts(out["report"]["logged_to_run"], "report")]
    assert "report/report.html" in arts
    assert re.search(rf"training: MLflow run {out['train']['run_id']} at ", console)

    # the report renders in headless Chromium (screenshot)
    chromium = headless_chromium(workdir / "chrome")
    if chromium:
        shot = workdir / "report.png"
        subprocess.run(
            [
                *chromium,
                f"--screenshot={shot}",
                "--window-size=1200,2400",
                html.resolve().as_uri(),
            ],
            check=True,
            timeout=120,
            capture_output=True,
        )
        assert shot.is_file() and shot.stat().st_size > 20_000

    # --from train, on the session's Ray (the first head is down; a new port for its service):
    # training and everything after it run again
    over = small(free_port())
    logs = []
    rerun = run_pipeline("pipelines/digits.yaml", over, "train", None, log=logs.append)
    ran = [line.split()[1] for line in logs if "running" in line]
    assert ran[0] == "train" and "data" not in ran and "tune" not in ran
    assert rerun["train"]["run_id"] != out["train"]["run_id"]
    assert int(rerun["register"]["version"]) == int(out["register"]["version"]) + 1

    # a failing serve step names itself; registry and data are untouched
    name = rerun["register"]["name"]
    versions = {v.version for v in client.search_model_versions(f"name='{name}'")}
    champion = client.get_model_version_by_alias(name, "champion").version
    data_before = json.loads((Path(out["data"]["path"]) / "metadata.json").read_text())["checksums"]
    with pytest.raises(StepFailed) as exc:
        run_pipeline(
            "pipelines/digits.yaml",
            [*over, "serve.route_prefix=no-leading-slash"],
            None,
            None,
            log=lambda m: None,
        )
    assert "'serve' failed" in str(exc.value) and "--from serve" in str(exc.value)
    assert {v.version for v in client.search_model_versions(f"name='{name}'")} == versions
    assert client.get_model_version_by_alias(name, "champion").version == champion
    assert json.loads((Path(out["data"]["path"]) / "metadata.json").read_text())["checksums"] == data_before
