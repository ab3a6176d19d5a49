"""Issue 18, the newcomer's first hour: UI plans, run hints, progress lines, the results table's width."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from scalelab.errors import ConfigError
from scalelab.tracking.ui import plan_ui, run_location, run_url
from scalelab.train.progress import PlainProgress, format_eta, progress_for


# ----------------------------------------------------------------------------- scalelab ui
def test_ui_plan_for_a_server_opens_it_and_starts_nothing():
    plan = plan_ui("http://127.0.0.1:5000/")
    assert plan.existing_url == "http://127.0.0.1:5000" and plan.backend_uri is None


def test_ui_plan_for_the_embedded_store_serves_it_with_its_artifacts(tmp_path: Path):
    db = tmp_path / ".scalelab" / "mlflow.db"
    db.parent.mkdir()
    db.write_bytes(b"")
    plan = plan_ui(f"sqlite:///{db}")
    assert plan.existing_url is None and plan.backend_uri == f"sqlite:///{db}"
    assert plan.artifacts_destination == str(db.parent / "mlartifacts")


def test_ui_plan_refuses_a_store_that_does_not_exist_yet(tmp_path: Path):
    with pytest.raises(ConfigError, match="nothing has been tracked"):
        plan_ui(f"sqlite:///{tmp_path / 'none.db'}")


def test_run_location_names_the_run_the_store_and_a_working_command(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines = run_location(uri, "abc123")
    assert lines == [f"MLflow run abc123 at {uri}", "view it: scalelab ui --run abc123"]
    server = run_location("http://127.0.0.1:5000", "abc123", experiment_id="7")
    assert server[1] == "view it: " + run_url("http://127.0.0.1:5000", "7", "abc123")
    assert server[1].endswith("/#/experiments/7/runs/abc123")


# ----------------------------------------------------------------------------- progress
def test_plain_progress_prints_steps_rate_and_eta_at_its_interval():
    out = io.StringIO()
    p = PlainProgress(out, interval_s=0.0)
    p.start(3, 40, 4)
    for _ in range(4):
        p.advance(128)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # never at the last step: the epoch line follows
    assert re.fullmatch(r"epoch 3/40  step 1/4 \(25%\)  [\d,]+ img/s  ETA \d+:\d\d", lines[0]), lines[0]
    quiet = io.StringIO()
    q = PlainProgress(quiet, interval_s=3600)
    q.start(1, 1, 100)
    for _ in range(100):
        q.advance(1)
    assert quiet.getvalue() == ""  # a short epoch: nothing but its per-epoch line


def test_progress_only_from_rank_zero_and_plain_off_a_terminal():
    assert progress_for(1) is None
    assert isinstance(progress_for(0, io.StringIO()), PlainProgress)
    assert format_eta(3725) == "1:02:05" and format_eta(65) == "1:05"


def test_fit_reports_every_step_of_every_epoch(workdir: Path):
    from scalelab.config import load_recipe
    from scalelab.data import load_dataset
    from scalelab.train.loop import fit

    class Recorder:
        def __init__(self):
            self.epochs, self.steps, self.images, self.finished = [], 0, 0, 0

        def start(self, epoch, epochs, steps):
            self.epochs.append((epoch, epochs, steps))

        def advance(self, images):
            self.steps += 1
            self.images += images

        def finish(self):
            self.finished += 1

    spec = load_recipe(
        "pipelines/digits.yaml",
        ["model.variant=msresnet_tiny", "train.epochs=2", "train.threads=1", "tracking.enabled=false"],
    )
    data = load_dataset(spec.data)
    rec = Recorder()
    fit(spec, data, progress=rec)
    steps = rec.epochs[0][2]
    assert rec.epochs == [(1, 2, steps), (2, 2, steps)] and rec.finished == 2
    assert rec.steps == 2 * steps
    assert rec.images == 2 * steps * spec.train.batch_size  # drop_last: full batches only


# ----------------------------------------------------------------------------- a quiet console
def test_model_export_of_a_channels_last_model_warns_nothing(tmp_path: Path):
    """bf16 training runs channels_last; torch.export's packaging used to warn once per weight."""
    import warnings

    import mlflow
    import numpy as np
    import torch

    from scalelab.models import create_model
    from scalelab.tracking.runs import RunTarget, log_pytorch_model

    model = create_model("msresnet_tiny", in_chans=1, num_classes=10).to(memory_format=torch.channels_last)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = mlflow.MlflowClient(uri).create_run("0")
    target = RunTarget(uri, run.info.run_id, "0", "export")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=UserWarning, module=r"torch\..*")
        log_pytorch_model(target, model, np.zeros((2, 1, 8, 8), np.float32))
    assert next(model.parameters()).is_contiguous(memory_format=torch.channels_last)  # untouched


# ----------------------------------------------------------------------------- the search table
def _rows(n: int) -> list[dict]:
    return [
        {
            "trial_id": f"trial_{i:05d}_abcdef",
            "status": "completed" if i % 2 else "stopped",
            "val_acc": 0.9 + i / 1000,
            "epochs": 4,
            "params": 123_456 + i,
            "startup_s": 1.23,
            "model.scales": [1, 2, 4][i % 3],
            "model.widths": [32, 64, 128],
            "train.lr": 0.0123,
            "train.weight_decay": 5e-05,
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("width", [80, 60, 200])
def test_search_table_fits_the_terminal_and_keeps_readable_columns(width: int):
    from rich.console import Console

    from scalelab.tune.report import print_summary

    space = ["model.scales", "model.widths", "train.lr", "train.weight_decay"]
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    print_summary(console, _rows(14)[::-1], space, "val_acc")  # best first, as sort_rows gives
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    header = next(line for line in lines if "status" in line)
    assert "val_acc" in header and "#" in header
    assert "┃┃" not in text and "││" not in text  # no column squeezed to nothing
    assert "0.9130" in text  # the best value is printed whole
    assert "2 more row(s)" in text and "results.csv" in text
    if width >= 200:
        assert "left out" not in text and "weight_decay" in header
    else:
        assert "left out to fit" in text


# ----------------------------------------------------------------------------- benchmarks vs a running stack
REPO = Path(__file__).resolve().parents[2]


def _stack_with(folder: Path, pid: int) -> None:
    (folder / ".scalelab").mkdir(parents=True, exist_ok=True)
    stack = {"services": [{"name": "ray", "pid": pid, "url": "x", "log": "x"}]}
    (folder / ".scalelab" / "stack.json").write_text(json.dumps(stack))


def test_benchmarks_refuse_to_start_while_a_stack_runs(tmp_path: Path, monkeypatch, capsys):
    import os
    import subprocess
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import refuse_while_stack_runs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _stack_with(tmp_path, dead.pid)
    refuse_while_stack_runs([tmp_path])  # a stack file of stopped processes: measure
    _stack_with(tmp_path, os.getpid())
    with pytest.raises(SystemExit) as exc:
        refuse_while_stack_runs([tmp_path])
    assert exc.value.code == 2 and "make down" in capsys.readouterr().err
    monkeypatch.setenv("SCALELAB_BENCH_WITH_STACK", "1")
    refuse_while_stack_runs([tmp_path])  # told to: runs, still warning loudly
    assert "A scalelab stack is running" in capsys.readouterr().err
    monkeypatch.delenv("SCALELAB_BENCH_WITH_STACK")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "digits.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO / "platform")},
    )
    assert proc.returncode == 2 and "scalelab down" in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- honest lineage
def test_never_prepared_data_is_prepared_loudly_and_marked_unversioned(workdir: Path, caplog):
    import logging

    from scalelab.config import load_recipe
    from scalelab.config.specs import PromotionSpec
    from scalelab.data import load_dataset
    from scalelab.registry.gate import data_status, unversioned_data_refusal
    from scalelab.tracking.lineage import run_tags
    from scalelab.train.loop import bundle_meta

    spec = load_recipe("pipelines/digits.yaml", ["data.name=never-prepared"])
    with caplog.at_level(logging.WARNING, logger="scalelab.data"):
        data = load_dataset(spec.data)
    assert "not prepared at data/never-prepared: preparing it now" in caplog.text
    assert data.version.status == "unversioned" and data.version.remote is None
    assert run_tags(spec, "r", data.version, "local")["data.status"] == "unversioned"
    meta = bundle_meta(spec, data)
    assert meta["data_status"] == "unversioned" and data_status(meta) == "unversioned"
    reason = unversioned_data_refusal(meta, PromotionSpec())
    assert reason and "promotion.allow_unversioned_data=true" in reason
    assert unversioned_data_refusal(meta, PromotionSpec(allow_unversioned_data=True)) is None
    versioned = {**meta, "data_status": None, "data_version": {**meta["data_version"], "rev": "abc"}}
    assert data_status(versioned) == "versioned"  # bundles from before the field: by git revision
    assert unversioned_data_refusal(versioned, PromotionSpec()) is None


def test_model_outputs_are_never_asked_for_by_dvc_push():
    """A clone's `dvc push` must not warn about trained-model outputs built elsewhere: they live in
    MLflow, so dvc.yaml marks them push: false (data stays pushable)."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["train"]["outs"] == [{"${output_dir}": {"push": False}}]
    assert stages["prepare"]["outs"] == ["data/${dataset}"]
