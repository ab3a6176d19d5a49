"""Ray Train vs the bare loop, time to the first step, 2 workers vs 1 — side by side in one run.

    .venv/bin/python benchmarks/train.py [--rounds N]   # writes benchmarks/results/train.json (3 rounds)

Figures (digits, the default recipe's msresnet_s, fp32/bf16 as `precision: auto` picks):
- ``ray_vs_bare_throughput_ratio``: steady-state training images/s (median over epochs 2..N) of
  Ray Train with 1 worker (1 CPU, 1 thread) / the bare in-process loop on 1 thread. Also the same
  ratio on epoch wall time (report + checkpoint upload included) and on 2 threads.
- ``seconds_to_first_step``: from launching ``scalelab train ... train.workers=1`` (a fresh process,
  local Ray started by it, default embedded MLflow, the dataset prepared beforehand) to the end of
  the first training step (``timing.first_step`` in the run's metrics.json), with a breakdown
  of where the time goes; also the same with a running Ray head (``scalelab up``), which is how a
  cluster is used, and ``seconds_to_first_step_in_process`` with ``train.workers=0`` (no Ray).
- ``two_vs_one_worker_speedup``: images/s of 2 workers x 1 CPU / 1 worker x 2 CPUs (the whole
  machine either way), and / 1 worker x 1 CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import machine, refuse_while_stack_runs, write_results  # noqa: E402

EPOCHS = 6
ROUNDS = 3  # `--rounds N` for more: the 2-thread ratio's rounds spread by +-3% on an idle host
BASE = [
    "model.variant=msresnet_s",
    f"train.epochs={EPOCHS}",
    "train.batch_size=128",
    "tracking.enabled=false",
]


def steady(history: list[dict], key: str = "images_per_s") -> float:
    return float(statistics.median(h[key] for h in history[1:]))


def wall_throughput(report_times: list[float], n_images: int) -> float:
    gaps = [b - a for a, b in zip(report_times[1:], report_times[2:], strict=False)]
    return n_images / statistics.median(gaps)


def bare(threads: int) -> dict:
    """The bare loop in a fresh process (as `scalelab train` with workers=0 runs it), not in this
    one: a driver connected to Ray ran the loop measurably slower, which is not the loop's cost."""
    proc = subprocess.run(
        [sys.executable, __file__, "--bare", str(threads)], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        raise SystemExit(f"bare loop failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bare_in_process(threads: int) -> dict:
    from scalelab.config import load_recipe
    from scalelab.data import load_dataset
    from scalelab.train.loop import fit

    spec = load_recipe("pipelines/digits.yaml", BASE + [f"train.threads={threads}"])
    data = load_dataset(spec.data)
    times: list[float] = []
    result = fit(spec, data, report=lambda m, _c: times.append(time.time()))
    n = len(data.splits["train"]) // spec.train.batch_size * spec.train.batch_size
    return {
        "images_per_s": steady(result.history),
        "epoch_wall_images_per_s": wall_throughput([0.0, *times], n),
        "precision": result.runtime.precision,
    }


def on_ray(workers: int, cpus: int, name: str) -> dict:
    from scalelab.config import load_recipe
    from scalelab.data import load_dataset
    from scalelab.train.ray_trainer import run_on_ray

    spec = load_recipe(
        "pipelines/digits.yaml",
        BASE
        + [
            f"train.workers={workers}",
            f"train.cpus_per_worker={cpus}",
            f"train.run_name={name}",
            f"train.storage_path={tempfile.mkdtemp(prefix='bench-runs-')}",
        ],
    )
    data = load_dataset(spec.data)
    res = run_on_ray(spec, data, name)
    n = len(data.splits["train"]) // spec.train.batch_size * spec.train.batch_size
    return {
        "images_per_s": steady(res["history"]),
        "epoch_wall_images_per_s": wall_throughput([0.0, *res["timing"]["reports"]], n),
    }


def first_step(workdir: Path, env: dict, label: str, workers: int = 1) -> dict:
    """Launch the CLI as a user would and split its time to the first step into phases.

    ``workers=0``: the in-process loop (every recipe's default), no Ray; the MLflow run opens
    beside the model build and the first epoch, so its phase is what remained at epoch 1's end.
    """
    name = f"first-{label}"
    cmd = [
        str(Path(sys.executable).parent / "scalelab"),
        "train",
        "pipelines/digits.yaml",
        "model.variant=msresnet_s",
        "train.epochs=2",
        f"train.workers={workers}",
        f"train.run_name={name}",
    ]
    launched = time.time()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{label}: scalelab train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    t = json.loads((workdir / "outputs" / name / "metrics.json").read_text())["timing"]
    # the first step: when the loop finished its first training step (``first_step``, recorded by
    # the run); runs before it recorded that: epoch 1's report time minus its duration
    step = t.get("first_step") or t["first_epoch_reported"] - t["first_epoch_seconds"]
    if workers == 0:
        phases = {
            "process start + imports -> run_training": t["run_training"] - launched,
            "run_training -> first step done (optimiser: torch._dynamo import; model, loaders)": step
            - t["run_training"],
            "MLflow run still opening at the end of epoch 1 (extra wait)": t["tracking_opened"]
            - t["first_epoch_reported"],
        }
        return {
            "seconds_to_first_step": step - launched,
            "phases": {k: round(v, 2) for k, v in phases.items()},
            "wall_seconds": time.time() - launched,
        }
    phases = {
        "process start + imports -> run_training": t["run_training"] - launched,
        "ray.init / connect": t["ray_connected"] - t["run_training"],
        "MLflow run opened (overlaps Ray start; extra wait)": t["tracking_opened"] - t["ray_connected"],
        "TorchTrainer built, fit() called": t["submitted"] - t["tracking_opened"],
        "Ray Train controller + worker group + process group": t["worker_started"] - t["submitted"],
        "worker: spec, data, checkpoint lookup": t["data_loaded"] - t["worker_started"],
        "fit: model build, loaders (torch._dynamo import) -> first step done": step - t["data_loaded"],
    }
    return {
        "seconds_to_first_step": step - launched,
        "phases": {k: round(v, 2) for k, v in phases.items()},
        "wall_seconds": time.time() - launched,
    }


def main(rounds_wanted: int = ROUNDS) -> None:
    refuse_while_stack_runs()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    (workdir / "pipelines").symlink_to(REPO / "pipelines")
    os.chdir(workdir)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # the dataset is prepared once, as a user does (`scalelab data prepare`), so the first timed run
    # does not also pay for that one-time preparation (sklearn's import and the split)
    subprocess.run(
        [str(Path(sys.executable).parent / "scalelab"), "data", "prepare", "pipelines/digits.yaml"],
        cwd=workdir,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    out: dict = {"note": "runs side by side in rounds; read ratios, not absolutes (see load_average_at_end)"}

    print("time to first step: in-process (train.workers=0, the recipes' default; no Ray)", flush=True)
    in_process = first_step(workdir, env, "in-process", workers=0)
    print(json.dumps(in_process, indent=2), flush=True)
    print("time to first step: cold (the command starts its own local Ray)", flush=True)
    cold = first_step(workdir, env, "cold")
    print(json.dumps(cold, indent=2), flush=True)

    from scalelab.cluster.stack import start_ray_head

    head, addresses = start_ray_head(workdir / ".scalelab", num_cpus=2, dashboard=False)
    try:
        print("time to first step: warm (a running `scalelab up` Ray head)", flush=True)
        os.environ["RAY_AUTH_MODE"] = addresses["ray_auth_mode"]  # as `scalelab up`'s stack.json says
        warm_env = {
            **env,
            "RAY_ADDRESS": addresses["ray_address"],
            "RAY_AUTH_MODE": addresses["ray_auth_mode"],
        }
        warm = first_step(workdir, warm_env, "warm")
        print(json.dumps(warm, indent=2), flush=True)

        # The machine is shared: load changes minute to minute. So the runs being compared run
        # back to back, in rounds, and each figure is the median of its per-round ratios.
        print("throughput: bare loop vs Ray Train, side by side", flush=True)
        import ray

        ray.init(address=addresses["ray_address"], log_to_driver=False)
        rounds: list[dict] = []
        for i in range(rounds_wanted):
            r = {"bare_1thread": bare(1), "ray_1worker_1cpu": on_ray(1, 1, f"tp-1x1-{i}")}
            r["ray_1worker_2cpu"] = on_ray(1, 2, f"tp-1x2-{i}")
            r["ray_2workers_1cpu"] = on_ray(2, 1, f"tp-2x1-{i}")
            r["bare_2threads"] = bare(2)
            print(json.dumps(r), flush=True)
            rounds.append(r)
        ray.shutdown()
    finally:
        head.stop()

    def ratio(a: str, b: str, key: str = "images_per_s") -> float:
        return round(statistics.median(r[a][key] / r[b][key] for r in rounds), 3)

    def per_round(a: str, b: str) -> list[float]:
        return [round(r[a]["images_per_s"] / r[b]["images_per_s"], 3) for r in rounds]

    out.update(
        ray_vs_bare_throughput_ratio=ratio("ray_1worker_1cpu", "bare_1thread"),
        ray_vs_bare_throughput_ratio_2threads=ratio("ray_1worker_2cpu", "bare_2threads"),
        ray_vs_bare_throughput_ratio_rounds=per_round("ray_1worker_1cpu", "bare_1thread"),
        ray_vs_bare_throughput_ratio_2threads_rounds=per_round("ray_1worker_2cpu", "bare_2threads"),
        ray_vs_bare_epoch_wall_ratio=ratio("ray_1worker_1cpu", "bare_1thread", "epoch_wall_images_per_s"),
        seconds_to_first_step=round(cold["seconds_to_first_step"], 2),
        seconds_to_first_step_warm_cluster=round(warm["seconds_to_first_step"], 2),
        seconds_to_first_step_in_process=round(in_process["seconds_to_first_step"], 2),
        first_step_phases_in_process=in_process["phases"],
        first_step_phases_cold=cold["phases"],
        first_step_phases_warm=warm["phases"],
        two_vs_one_worker_speedup=ratio("ray_2workers_1cpu", "ray_1worker_2cpu"),
        two_vs_one_worker_speedup_1cpu_each=ratio("ray_2workers_1cpu", "ray_1worker_1cpu"),
        rounds=[
            {
                k: {kk: (round(vv, 1) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                for k, v in r.items()
            }
            for r in rounds
        ],
        setup=f"digits, msresnet_s, batch 128 (global), {EPOCHS} epochs, steady state = median of "
        f"epochs 2..N; {rounds_wanted} rounds, median of per-round ratios; checkpoint every epoch on local "
        f"disk; tracking off for the throughput runs",
        load_average_at_end=os.getloadavg()[0],
    )
    print(json.dumps({**out, **machine()}, indent=2))
    write_results("train", out)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"]:
        print(json.dumps(bare_in_process(int(sys.argv[2]))))
    elif sys.argv[1:2] == ["--rounds"]:
        main(int(sys.argv[2]))
    else:
        main()
