"""What one trial runs. Tune calls these in a trial process with the trial's (encoded) config.

- :func:`local_trial`: ``scalelab.train.loop.fit`` in the trial process (no worker group), each
  epoch reported with ``ray.tune.report`` and a Tune checkpoint, so a stopped or interrupted
  trial resumes from its last epoch (``tune.get_checkpoint``).
- :func:`worker_trial`: the Ray Train V2 pattern: a driver function that builds a
  ``TorchTrainer`` (``scalelab.train.ray_trainer.build_torch_trainer``) whose run config carries
  ``TuneReportCallback`` and calls ``fit()``; the trainer persists and restores its own
  checkpoints under the trial folder, by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from scalelab.config.console import quiet_third_party_logs
from scalelab.config.specs import ParamSpace, RecipeSpec
from scalelab.tune.space import apply_config, decode_config


def trial_spec(base: dict[str, Any], space: dict[str, ParamSpace], config: dict[str, Any]) -> RecipeSpec:
    from scalelab.config.loader import validate_recipe

    return validate_recipe(apply_config(base, decode_config(space, config)), "trial")


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def local_trial(config: dict[str, Any], base: dict[str, Any], space: dict[str, ParamSpace], dataset) -> None:
    import ray.tune
    from ray.tune import Checkpoint

    from scalelab.train.loop import fit

    quiet_third_party_logs()  # a trial process: its INFO lines would reach the driver's console
    spec = trial_spec(base, space, config)

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None:
            ray.tune.report(_numbers(metrics), checkpoint=Checkpoint.from_directory(checkpoint_dir))
        else:
            ray.tune.report(_numbers(metrics))

    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        fit(spec, dataset, report=report)
        return
    with checkpoint.as_directory() as resume_from:
        fit(spec, dataset, report=report, resume_from=resume_from)


def worker_trial(
    config: dict[str, Any], base: dict[str, Any], space: dict[str, ParamSpace], data_version
) -> None:
    import ray.train
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from scalelab.train.ray_trainer import build_torch_trainer

    spec = trial_spec(base, space, config)
    context = ray.tune.get_context()
    run_config = ray.train.RunConfig(
        name=f"train-{context.get_trial_id()}",  # stable per trial: a resumed trial resumes this run
        storage_path=os.path.abspath(spec.train.storage_path),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        callbacks=[TuneReportCallback(), _placement_group_recorder(Path(context.get_trial_dir()) / PG_FILE)],
    )
    trainer = build_torch_trainer(spec, data_version, run_config=run_config, run_name=run_config.name)
    trainer.fit()


PG_FILE = "train_placement_groups.txt"


def _placement_group_recorder(path: Path):
    """A Train callback (runs in the trainer's controller) that notes each worker group's placement group.

    When ASHA stops a worker-mode trial, Tune kills the driver function and with it the Train
    controller, which never removes its worker group's placement group; Ray Train's own cleaner
    needs the State API (a dashboard) and cannot tell this cluster from others on the machine. The
    search driver reads this file when the trial ends and removes what is left
    (:func:`release_placement_groups`), so the next trial gets the CPUs back.
    """
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class RecordPlacementGroup(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            with open(path, "a") as fh:
                fh.write(pg.id.hex() + "\n")

    return RecordPlacementGroup()


def release_placement_groups(trial_dir: str | Path | None) -> int:
    """Remove the worker-group placement groups a finished trial left behind; returns how many."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    path = Path(trial_dir or "") / PG_FILE
    if not trial_dir or not path.is_file() or not ray.is_initialized():
        return 0
    removed = 0
    for line in path.read_text().split():
        pg = PlacementGroup(PlacementGroupID(bytes.fromhex(line)))
        if ray.util.placement_group_table(pg).get("state") not in (None, "REMOVED"):
            remove_placement_group(pg)
            removed += 1
    return removed
