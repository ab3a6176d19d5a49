"""Start-up of `scalelab train` in-process (issue 19): nothing on the path to the first training step
that the step does not need (MLflow, Ray, pandas, ...), the MLflow run opened only when epoch 1's
metrics need it, and the first step's time recorded for the benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

from scalelab.config import load_recipe
from scalelab.data import load_dataset

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
# none is needed before the first step: MLflow opens at the end of epoch 1, Ray is not used
# in-process, pandas/sklearn/matplotlib belong to preparing data and to the final plots
NOT_BEFORE_FIRST_STEP = ("mlflow", "ray", "boto3", "pandas", "sklearn", "matplotlib", "sqlalchemy")

AT_FIRST_STEP = """
import json, os, sys
from scalelab.train import progress

def advance(self, images):  # the loop's first step is done: list what is imported, stop there
    print("IMPORTED", json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), flush=True)
    os._exit(0)

progress.FirstStepSignal.advance = advance
from scalelab.cli import main
sys.argv = ["scalelab", "train", "pipelines/digits.yaml", "model.variant=msresnet_tiny",
            "train.epochs=1", "train.threads=1"]
main()
"""


def test_cli_train_imports_no_tracking_or_ray_before_the_first_step(workdir: Path):
    load_dataset(load_recipe("pipelines/digits.yaml", []).data)  # prepared, as `scalelab data prepare`
    code = AT_FIRST_STEP.format(heavy=NOT_BEFORE_FIRST_STEP)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=ENV, capture_output=True, text=True, timeout=300
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("IMPORTED ")), None)
    assert line is not None, out.stdout[-2000:] + out.stderr[-3000:]  # it reached the first step
    assert json.loads(line.split(" ", 1)[1]) == []


def test_mlflow_run_opens_once_after_the_first_step(workdir: Path, monkeypatch):
    from scalelab.tracking import runs
    from scalelab.train.api import run_training

    opened: list[float] = []

    def fake_open(spec, name, data, mode, data_path):  # the order is the point, not MLflow
        opened.append(time.time())
        return None

    monkeypatch.setattr(runs, "start_training_run", fake_open)
    spec = load_recipe(
        "pipelines/digits.yaml",
        ["model.variant=msresnet_tiny", "train.epochs=2", "train.threads=1", "train.run_name=order"],
    )
    assert spec.tracking.enabled
    out = run_training(spec)
    t = out.metrics["timing"]
    assert len(opened) == 1  # once, for the whole run
    assert t["run_training"] < t["first_step"] < opened[0] <= t["tracking_opened"]
    assert t["first_step"] < t["first_epoch_reported"] <= t["tracking_opened"]
    assert len(out.history) == 2 and out.run_id is None


def test_deferred_call_runs_only_once_released_or_asked_for():
    from scalelab.train.api import DeferredCall

    ran = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        call = DeferredCall(pool, lambda x: (ran.set(), x * 2)[1], 21)
        assert not ran.wait(0.2)  # not started by itself
        assert call.result() == 42  # asking for the result starts it: never a wait on nothing
        second = DeferredCall(pool, ran.clear)
        second.release()
        second.result()
        assert not ran.is_set()


def test_lineage_reads_library_versions_without_importing_them():
    code = (
        "import sys\n"
        "from scalelab.tracking.lineage import library_versions\n"
        "tags = library_versions()\n"
        "print(sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules), tags['ray.version'], "
        "tags['mlflow.version'], tags['torch.version'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    # the installed distributions' versions: what ray.__version__ etc. say for these wheels
    versions = [metadata.version(m) for m in ("ray", "mlflow", "torch")]
    assert out.stdout.split() == ["[]", *versions], out.stdout + out.stderr


def test_mlflow_telemetry_is_off_unless_the_user_turns_it_on():
    """Like Ray's usage stats: importing scalelab turns MLflow's telemetry off by default (no
    reporting thread, no flush with network timeouts at exit) and keeps a value the user set."""
    probe = "import scalelab, mlflow.telemetry.utils as t; print(t.is_telemetry_disabled())"
    env = {k: v for k, v in ENV.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "PYTEST_CURRENT_TEST")}
    env = {k: v for k, v in env.items() if k != "CI"}
    off = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert off.stdout.strip() == "True", off.stderr[-2000:]
    env["MLFLOW_DISABLE_TELEMETRY"] = "false"
    kept = subprocess.run(
        [sys.executable, "-c", "import os, scalelab; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert kept.stdout.strip() == "false"
