"""Shared test setup: run from a temporary working folder so tests never touch the repo's state."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder (data/, outputs/, .scalelab/ land here), with pipelines/ linked in."""
    (tmp_path / "pipelines").symlink_to(REPO / "pipelines")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


# The short detection run both the mAP-floor unit test and the served-boxes integration test need:
# the same recipe and seed give the same model, so it is trained once per session (~50 s).
DETECTOR_OVERRIDES = [
    "data.scenes.num_scenes=1200",
    "train.epochs=8",
    "train.threads=1",
    "tracking.enabled=false",
    "train.run_name=det",
]


@pytest.fixture(scope="session")
def scenes_detector(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A detector trained in-process once per session on ``pipelines/scenes.yaml`` (1200 scenes, 8
    epochs, seed 0): ``spec``, ``outcome`` (run_training's TrainOutcome: model_dir, metrics,
    history) and ``test`` (the held-out split it was scored on, with boxes)."""
    from scalelab.config import load_recipe
    from scalelab.data import load_dataset
    from scalelab.train.api import run_training

    root = tmp_path_factory.mktemp("scenes-detector")
    (root / "pipelines").symlink_to(REPO / "pipelines")
    old = os.getcwd()
    os.chdir(root)
    try:
        spec = load_recipe("pipelines/scenes.yaml", DETECTOR_OVERRIDES)
        outcome = run_training(spec)
        outcome.model_dir = outcome.model_dir.resolve()
        test = load_dataset(spec.data).splits["test"]
    finally:
        os.chdir(old)
    return SimpleNamespace(spec=spec, outcome=outcome, test=test)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")
