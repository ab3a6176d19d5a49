"""Ray Tune searches on digits: tracking + best recipe, budget screening, kill and resume."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from scalelab.config import load_recipe

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "pipelines" / "digits.yaml"
SCALELAB = str(Path(sys.executable).with_name("scalelab"))
TINY_SPACE = {
    "model.scales": {"choice": [1, 2, 4]},
    "model.head": {"choice": ["last", "mean_logits", "concat"]},
    "train.lr": {"loguniform": [0.02, 0.3]},
}


@pytest.fixture(scope="session", autouse=True)
def _own_local_ray():
    """Make `ray_session`'s plain ray.init() start a local Ray rather than attach to a `ray start`
    cluster someone else left on this machine (it then refuses num_cpus). Autouse fixtures run
    first within their scope, so this is set before `ray_session` starts Ray."""
    previous = os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_ADDRESS", "local")
    yield
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)


def tiny_search(**overrides):
    values = {
        "model.variant": "msresnet_tiny",
        "train.threads": 1,
        "search.space": TINY_SPACE,
        "search.num_samples": 4,
        "search.max_epochs": 2,
        "search.grace_period": 1,
        "search.max_concurrent_trials": 2,
        "search.max_params": None,
        "tracking.experiment": f"tune-{uuid.uuid4().hex[:8]}",
    }
    values.update(overrides)
    return load_recipe(DIGITS, values)


def children_of(client, experiment: str, parent: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def test_search_tracks_trials_and_writes_a_best_recipe_that_trains(workdir, ray_session, tracking_uri):
    from mlflow.tracking import MlflowClient

    from scalelab.train.api import run_training
    from scalelab.tune.driver import run_search

    spec = tiny_search()
    outcome = run_search(spec, name="four", quiet=True)

    trials = [r for r in outcome.rows if r["status"] != "pruned"]
    assert len(trials) == 4 and {r["status"] for r in trials} <= {"completed", "stopped"}
    # the recipe's own ranking (digits: val_loss, lowest first), with val_acc kept beside it
    metric, mode = spec.search.metric, spec.search.mode
    assert (metric, mode) == ("val_loss", "min")
    values = [r[metric] for r in outcome.rows]
    assert values == sorted(values) and all(0 <= r["val_acc"] <= 1 for r in trials)
    csv_lines = (outcome.search_dir / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("rank,trial_id,status,val_loss")
    assert "val_acc" in csv_lines[0].split(",")
    assert outcome.best is not None and outcome.best["status"] == "completed"
    assert outcome.test_acc is not None and 0 <= outcome.test_acc <= 1
    # model.scales is searched: search.match defaults to params, every trial within 5% of the base
    target = {r["match_target"] for r in trials}
    assert len(target) == 1 and all(abs(r["params"] / r["match_target"] - 1) <= 0.05 for r in trials)
    assert all(abs(r["match_ratio"] - 1) <= 0.05 and r["match.widths"] for r in trials)
    assert "match.widths" in csv_lines[0] and "match_ratio" in csv_lines[0]
    assert json.loads((outcome.search_dir / "search.json").read_text())["match"] == "params"
    # search.reuse_trial_processes: a trial process that finished runs a later trial (Tune's pid)
    pids = {
        json.loads(line)["pid"]
        for path in (outcome.search_dir / "tune").glob("trial_*/result.json")
        for line in path.read_text().splitlines()
    }
    assert 1 <= len(pids) < len(trials), pids
    # Tune's CSV/JSON results are kept, its TensorBoard files are not written; each trial
    # checkpoints every grace_period (1 here) epochs
    trial_dirs = list((outcome.search_dir / "tune").glob("trial_*"))
    assert trial_dirs and all((d / "progress.csv").is_file() for d in trial_dirs)
    assert not list((outcome.search_dir / "tune").rglob("events.out.tfevents*"))

    best = load_recipe(outcome.best_yaml, ["train.epochs=1"])
    assert best.model.scales == outcome.best["model.scales"] and best.model.head == outcome.best["model.head"]
    assert best.model.widths == outcome.best["match.widths"]  # best.yaml trains the matched model
    assert best.train.lr == pytest.approx(outcome.best["train.lr"])
    assert best.train.epochs == 1 and not best.search.space
    trained = run_training(best, run_name="from-best")
    assert 0 <= trained.metrics["test_acc"] <= 1

    client = MlflowClient(tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["scalelab.kind"] == "search"
    assert parent.data.params["search.match"] == "params"
    children = children_of(client, spec.tracking.experiment, outcome.parent_run_id)
    assert len(children) == 4
    assert {c.data.tags["scalelab.trial_id"] for c in children} == {r["trial_id"] for r in trials}
    for child in children:
        assert child.info.status == "FINISHED"
        assert "search.model.scales" in child.data.params and "model.depths" in child.data.params
        assert child.data.params["model.widths"] == child.data.params["search.match.widths"]
        assert len(client.get_metric_history(child.info.run_id, "val_acc")) >= 1
    tagged = [c for c in children if c.data.tags.get("scalelab.best_trial") == "true"]
    assert [c.data.tags["scalelab.trial_id"] for c in tagged] == [outcome.best["trial_id"]]
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"results.csv", "best.yaml", "accuracy_vs_params.png", "parallel_coordinates.png"} <= artifacts


def test_over_budget_configuration_is_never_launched(workdir, ray_session, tracking_uri):
    """Also the Tune path of streamed data: the launched trial is a TorchTrainer (trial_mode
    workers) whose worker trains on Parquet shards through Ray Data (the dataset exists only as
    shards, so nothing else could have fed it)."""
    from mlflow.tracking import MlflowClient

    from scalelab.tune.driver import run_search
    from scalelab.tune.space import Screen

    space = {"model.base_width": {"choice": [8, 64]}, "model.scales": {"choice": [2]}}
    probe = tiny_search(**{"search.space": space})
    small = Screen(probe.model_dump(mode="json"), probe.search.space, 1, 10, 8).check(
        {"model.base_width": 8, "model.scales": 2}
    )["params"]
    spec = tiny_search(
        **{
            "search.space": space,
            "search.algorithm": "grid",
            "search.num_samples": 1,
            "search.max_epochs": 1,
            "search.scheduler": "none",
            "search.max_params": small * 2,
            "search.trial_mode": "workers",
            "data.name": "digits_shards",
            "data.format": "stream",
            "data.row_group_rows": 64,
        }
    )
    outcome = run_search(spec, name="budget", quiet=True)
    assert (
        json.loads((workdir / "data" / "digits_shards" / "metadata.json").read_text())["format"] == "shards"
    )
    assert not (workdir / "data" / "digits").exists()

    launched = [r for r in outcome.rows if r["status"] != "pruned"]
    pruned = [r for r in outcome.rows if r["status"] == "pruned"]
    assert [r["model.base_width"] for r in launched] == [8]
    assert launched[0]["status"] == "completed" and launched[0]["epochs"] == 1  # streamed, to the end
    assert [r["model.base_width"] for r in pruned] == [64]
    assert "search.max_params" in pruned[0]["reason"] and pruned[0]["params"] > small * 2
    # Tune never created a trial for it: one trial folder, one trial in the experiment state
    assert len(list((outcome.search_dir / "tune").glob("trial_*"))) == 1
    state = json.loads(
        Path(sorted(glob.glob(str(outcome.search_dir / "tune" / "experiment_state-*.json")))[-1]).read_text()
    )
    assert len(state["trial_data"]) == 1
    assert "over budget" in (outcome.search_dir / "results.csv").read_text()

    client = MlflowClient(tracking_uri)
    children = children_of(client, spec.tracking.experiment, outcome.parent_run_id)
    statuses = sorted((c.data.tags["scalelab.trial_status"], c.info.status) for c in children)
    assert statuses == [("completed", "FINISHED"), ("pruned", "KILLED")]
    killed = next(c for c in children if c.info.status == "KILLED")
    assert "search.max_params" in killed.data.tags["scalelab.pruned_reason"]
    assert killed.data.params["search.model.base_width"] == "64"


def _trial_states(search_dir: Path) -> dict[str, str]:
    states = sorted((search_dir / "tune").glob("experiment_state-*.json"))  # names carry the start time
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except ValueError:  # being rewritten
        return {}
    trials = [json.loads(t[0]) for t in data["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def test_killed_search_resumes_without_rerunning_finished_trials(workdir):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    env.pop("RAY_ADDRESS", None)
    space = json.dumps({"model.scales": {"choice": [1, 2, 4]}, "train.lr": {"loguniform": [0.02, 0.3]}})
    cmd = [
        SCALELAB,
        "tune",
        "pipelines/digits.yaml",
        "model.variant=msresnet_tiny",
        "train.threads=1",
        "tracking.enabled=false",
        f"search.space={space}",
        "search.num_samples=3",
        "search.max_epochs=3",
        "search.scheduler=none",
        "search.max_concurrent_trials=1",
        "--name",
        "killed",
    ]
    search_dir = workdir / ".scalelab" / "tune" / "killed"
    with open(workdir / "first.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if "TERMINATED" in _trial_states(search_dir).values():
                break
            time.sleep(0.5)
        assert proc.poll() is None, (
            "the search ended before it could be killed:\n" + (workdir / "first.log").read_text()
        )
        assert "TERMINATED" in _trial_states(search_dir).values(), "no trial finished in time"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=30)
    before = _trial_states(search_dir)
    finished = [t for t, s in before.items() if s == "TERMINATED"]
    lines_before = {
        t: len((search_dir / "tune" / f"trial_{t}" / "result.json").read_text().splitlines())
        for t in finished
    }
    assert finished and all(n == 3 for n in lines_before.values())

    resumed = subprocess.run(
        [SCALELAB, "tune", "--resume", "killed"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = _trial_states(search_dir)
    assert len(after) == 3 and set(after.values()) == {"TERMINATED"}  # the searcher did not start over
    assert set(finished) <= set(after)
    for t in finished:  # not rerun: the same three epochs, started once
        assert (
            len((search_dir / "tune" / f"trial_{t}" / "result.json").read_text().splitlines())
            == lines_before[t]
        )
        assert json.loads((search_dir / "trials.json").read_text())["trials"][t]["starts"] == 1
    # every checkpoint was kept while the search ran (a killed driver's snapshot may name an older
    # one: resuming from it used to fail); once it ended, only each trial's newest is left
    for trial in (search_dir / "tune").glob("trial_*"):
        assert len(list(trial.glob("checkpoint_*"))) == 1, sorted(p.name for p in trial.iterdir())
    rows = (search_dir / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and all(",completed," in r for r in rows)
    assert (search_dir / "best.yaml").is_file()
