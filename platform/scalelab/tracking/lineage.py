"""Where a run came from: code revision, data version, library versions, Ray job."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def git_state(cwd: str | Path | None = None) -> dict[str, str]:
    """``git.commit`` and ``git.dirty`` of the working tree: the cwd's repository, else the one
    scalelab's own code is in (empty when neither is a git repository)."""
    if cwd is None:
        state = git_state(".")
        return state or git_state(Path(__file__).resolve().parents[3])
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(bool(status.strip())).lower()}


def library_versions() -> dict[str, str]:
    """``scalelab.version`` and the versions of torch, Ray and MLflow, where installed.

    Read from the package metadata, not by importing them: an in-process run never imports Ray,
    and importing it for its version string cost seconds. A module already imported reports its
    own ``__version__`` (the same string as the metadata for these wheels)."""
    from importlib import metadata

    import scalelab

    tags = {"scalelab.version": scalelab.__version__}
    for mod in ("torch", "ray", "mlflow"):
        loaded = sys.modules.get(mod)
        version = getattr(loaded, "__version__", None)
        if version is None:
            with contextlib.suppress(metadata.PackageNotFoundError):
                version = metadata.version(mod)
        if version is not None:
            tags[f"{mod}.version"] = str(version)
    return tags


def ray_job_ids() -> dict[str, str]:
    """``ray.job_id`` of this driver and, for a job sent through the Jobs API, ``ray.submission_id``."""
    tags: dict[str, str] = {}
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        submission = (config.get("metadata") or {}).get("job_submission_id")
        if submission:
            tags["ray.submission_id"] = submission
    except ValueError:
        pass
    try:
        import ray

        if ray.is_initialized():
            tags["ray.job_id"] = ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - lineage is best effort
        pass
    if "ray.job_id" not in tags and os.environ.get("RAY_JOB_ID"):
        tags["ray.job_id"] = os.environ["RAY_JOB_ID"]
    return tags


def run_tags(spec: Any, run_name: str, data_version: Any | None, mode: str) -> dict[str, str]:
    from scalelab.config.loader import spec_hash

    tags = {
        "mlflow.runName": run_name,
        "scalelab.run_name": run_name,
        "scalelab.recipe": spec.name,
        "scalelab.spec_hash": spec_hash(spec),
        "scalelab.mode": mode,
        "scalelab.workers": str(spec.train.workers),
        **git_state(),
        **library_versions(),
    }
    if data_version is not None:
        tags.update(data_version.as_tags())
    else:
        tags.update({"data.name": spec.data.name, "data.status": "unversioned"})
    if mode == "ray":  # the driver may not be connected yet: run_training tags the job again later
        tags.update(ray_job_ids())
    return tags
