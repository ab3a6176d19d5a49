"""`scalelab data prepare|verify|versions` and `scalelab evaluate` through the CLI (no servers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scalelab.cli import app
from scalelab.errors import DataError

runner = CliRunner()


def test_prepare_then_verify(workdir: Path):
    result = runner.invoke(app, ["data", "prepare", "pipelines/digits.yaml"])
    assert result.exit_code == 0, result.output
    assert "train 1259" in result.output and ".dir" in result.output
    result = runner.invoke(app, ["data", "verify", "pipelines/digits.yaml"])
    assert result.exit_code == 0 and "not tracked by DVC" in result.output


def test_verify_names_the_changed_file(workdir: Path):
    runner.invoke(app, ["data", "prepare", "pipelines/digits.yaml"])
    (workdir / "data/digits/test.npz").write_bytes(b"tampered")
    result = runner.invoke(app, ["data", "verify", "pipelines/digits.yaml"])
    assert isinstance(result.exception, DataError) and "test.npz" in str(result.exception)


def test_versions_outside_a_dvc_repo_says_so(workdir: Path):
    result = runner.invoke(app, ["data", "versions", "pipelines/digits.yaml"])
    assert isinstance(result.exception, DataError) and "dvc init" in str(result.exception)


def test_evaluate_writes_metrics(workdir: Path):
    from scalelab.config import load_recipe
    from scalelab.train.api import run_training

    fast = ["model.variant=msresnet_tiny", "train.epochs=2", "train.threads=1", "tracking.enabled=false"]
    outcome = run_training(load_recipe("pipelines/digits.yaml", fast + ["train.run_name=ev"]))
    out = workdir / "metrics" / "eval.json"
    result = runner.invoke(
        app,
        ["evaluate", str(outcome.model_dir), "pipelines/digits.yaml", "train.threads=1", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["test_acc"] == pytest.approx(outcome.metrics["test_acc"], abs=1e-6)
    assert metrics["images"] == 359 and metrics["same_data_as_training"] is True
    assert metrics["data_version"]["content_hash"].endswith(".dir")


def test_evaluate_refuses_a_model_of_other_classes(workdir: Path, tmp_path: Path):
    import numpy as np

    from scalelab.config import load_recipe
    from scalelab.train.api import run_training

    np.savez(workdir / "two.npz", x=np.zeros((40, 8, 8), np.uint8), y=np.arange(40) % 2)
    fast = ["model.variant=msresnet_tiny", "train.epochs=1", "train.threads=1", "tracking.enabled=false"]
    outcome = run_training(load_recipe("pipelines/digits.yaml", fast + ["train.run_name=ev2"]))
    recipe = workdir / "two.yaml"
    recipe.write_text("name: two\ndata: {name: two, kind: npz, source: two.npz}\n")
    result = runner.invoke(app, ["evaluate", str(outcome.model_dir), str(recipe)])
    assert result.exit_code != 0
    assert "prepare" in str(result.exception)  # not prepared yet: says how
    runner.invoke(app, ["data", "prepare", str(recipe)])
    result = runner.invoke(app, ["evaluate", str(outcome.model_dir), str(recipe)])
    assert isinstance(result.exception, DataError) and "trained on classes" in str(result.exception)


def test_evaluate_toggles_test_time_flip(workdir: Path):
    import numpy as np

    from scalelab.config import load_recipe
    from scalelab.train.api import run_training

    rng = np.random.default_rng(0)
    y = np.arange(200) % 4
    x = (rng.random((200, 8, 8)) * 60).astype(np.uint8)
    x[np.arange(200), y, :4] = 255  # class = which row carries a bar on the left half
    np.savez(workdir / "bars.npz", x=x, y=y)
    recipe = workdir / "bars.yaml"
    recipe.write_text(
        "name: bars\ndata: {name: bars, kind: npz, source: bars.npz, test_fraction: 0.25}\n"
        "model: {variant: msresnet_tiny, test_time_flip: true}\n"
        "train: {epochs: 2, threads: 1, run_name: tta}\ntracking: {enabled: false}\n"
    )
    outcome = run_training(load_recipe(str(recipe)))
    out_on, out_off = workdir / "on.json", workdir / "off.json"
    assert (
        runner.invoke(app, ["evaluate", str(outcome.model_dir), str(recipe), "--out", str(out_on)]).exit_code
        == 0
    )
    result = runner.invoke(
        app, ["evaluate", str(outcome.model_dir), str(recipe), "--no-test-time-flip", "--out", str(out_off)]
    )
    assert result.exit_code == 0, result.output
    on, off = json.loads(out_on.read_text()), json.loads(out_off.read_text())
    assert on["test_time_flip"] is True and off["test_time_flip"] is False
    assert on["test_acc"] == pytest.approx(outcome.metrics["test_acc"], abs=1e-6)  # as trained
    assert on["test_loss"] != pytest.approx(off["test_loss"], abs=1e-6)  # the mirror pass changes the answer

    digits = ["model.variant=msresnet_tiny", "train.epochs=1", "train.threads=1", "tracking.enabled=false"]
    plain = run_training(load_recipe("pipelines/digits.yaml", digits + ["train.run_name=ev3"]))
    result = runner.invoke(
        app, ["evaluate", str(plain.model_dir), "pipelines/digits.yaml", "--test-time-flip"]
    )
    assert isinstance(result.exception, DataError) and "not left-right symmetric" in str(result.exception)
