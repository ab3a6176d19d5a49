"""`scalelab pipeline run` on digits end to end (small budget), against a real MLflow server, the
session's Ray (Tune, Serve) and real HTTP: twice (the second skips), --from train, and a failure
injected in the serve step that leaves registry and data untouched."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from scalelab.cluster.services import free_port
from scalelab.pipeline.commands import run_pipeline
from scalelab.pipeline.runner import StepFailed

pytestmark = pytest.mark.integration


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


def test_pipeline_end_to_end_skip_rerun_and_failure(
    workdir, tracking_uri, ray_session, serve_cleanup, headless_chromium
):
    import mlflow

    over = small(free_port())
    logs: list[str] = []
    out = run_pipeline("pipelines/digits.yaml", over, None, None, log=logs.append)
    assert [line.split()[1] for line in logs if "running" in line] == [
        "data",
        "tune",
        "train",
        "register",
        "promote",
        "serve",
        "smoke",
        "report",
    ]
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

    # second run: every step is up to date
    logs.clear()
    again = run_pipeline("pipelines/digits.yaml", over, None, None, log=logs.append)
    assert all("skipped" in line for line in logs), logs
    assert again["register"]["version"] == out["register"]["version"]

    # --from train: training and everything after it run again
    logs.clear()
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
