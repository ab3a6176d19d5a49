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
from typing import Any

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
        callbacks=[TuneReportCallback()],
    )
    trainer = build_torch_trainer(spec, data_version, run_config=run_config, run_name=run_config.name)
    trainer.fit()
