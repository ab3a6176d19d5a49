"""Cluster jobs: typed job specs in ``jobs/*.yaml`` submitted through Ray's Jobs API.

Validation happens before anything is submitted: the verb, the recipe (with the job's overrides),
and the resources against what the cluster has. The entrypoint calls the cluster's own Python
explicitly (``<python> -m scalelab.cli <verb> ...``), because a bare ``python`` on a node's PATH
can be the system interpreter without scalelab.
"""

from __future__ import annotations

import getpass
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from scalelab.cluster.session import jobs_api_address, read_stack
from scalelab.config.loader import explain_validation, load_recipe, read_yaml
from scalelab.config.settings import runtime_settings
from scalelab.config.specs import JobSpec, RecipeSpec
from scalelab.errors import ConfigError, ScalelabError

RECIPE_VERBS = {"train", "tune", "pipeline", "data", "evaluate"}


def load_job_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    raw = read_yaml(path)
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(explain_validation(str(path), exc, JobSpec)) from None
    if overrides:
        spec = spec.model_copy(update={"overrides": [*spec.overrides, *overrides]})
    return spec


def recipe_overrides(spec: JobSpec) -> list[str]:
    """Overrides implied by the cluster settings, then the job's own (which win)."""
    c = spec.cluster
    out: list[str] = []
    if c.workers is not None:
        out.append(f"train.workers={c.workers}")
    if c.gpus_per_worker > 0:
        out.append("train.use_gpu=true")
    if c.cpus_per_worker is not None:
        out.append(f"train.cpus_per_worker={c.cpus_per_worker:g}")
    if c.placement_strategy is not None:
        out.append(f"train.placement_strategy={c.placement_strategy}")
    if c.storage_path is not None:
        out.append(f"train.storage_path={c.storage_path}")
    return out + list(spec.overrides)


def validate_job(spec: JobSpec, base_dir: str | Path = ".") -> RecipeSpec | None:
    """Check the recipe exists and validates with the job's overrides. Returns the recipe spec."""
    if spec.verb in RECIPE_VERBS and spec.recipe is None:
        raise ConfigError(f"job {spec.name!r}: verb {spec.verb!r} needs a recipe (set `recipe:`)")
    if spec.recipe is None:
        return None
    path = Path(base_dir) / spec.recipe
    if not path.is_file():
        raise ConfigError(
            f"job {spec.name!r}: recipe {spec.recipe!r} not found under {Path(base_dir).resolve()}"
        )
    return load_recipe(path, recipe_overrides(spec))


def check_resources(
    spec: JobSpec, recipe: RecipeSpec | None, cluster: dict[str, float], nodes: list[dict]
) -> None:
    """Refuse jobs the cluster can never run (instead of letting them hang pending forever)."""
    problems = []
    max_node_cpus = max((n.get("CPU", 0) for n in nodes), default=cluster.get("CPU", 0))
    if spec.resources.num_cpus > max_node_cpus:
        problems.append(
            f"entrypoint needs {spec.resources.num_cpus} CPUs; the largest node has {max_node_cpus}"
        )
    if spec.resources.num_gpus > cluster.get("GPU", 0):
        problems.append(
            f"entrypoint needs {spec.resources.num_gpus} GPUs; the cluster has {cluster.get('GPU', 0)}"
        )
    if recipe is not None and recipe.train.workers > 0 and spec.verb in ("train", "pipeline"):
        t = recipe.train
        need_cpu = t.workers * t.cpus_per_worker + spec.resources.num_cpus
        if need_cpu > cluster.get("CPU", 0):
            problems.append(
                f"{t.workers} workers x {t.cpus_per_worker} CPUs + {spec.resources.num_cpus} for the "
                f"entrypoint = {need_cpu} CPUs; the cluster has {cluster.get('CPU', 0)}"
            )
        if t.use_gpu and t.workers > cluster.get("GPU", 0):
            problems.append(f"{t.workers} GPU workers; the cluster has {cluster.get('GPU', 0)} GPUs")
        if t.placement_strategy == "STRICT_SPREAD" and t.workers > len(nodes):
            problems.append(
                f"STRICT_SPREAD of {t.workers} workers needs {t.workers} nodes; the cluster has {len(nodes)}"
            )
    if problems:
        raise ConfigError(f"job {spec.name!r} cannot run on this cluster: " + "; ".join(problems))


def entrypoint(spec: JobSpec, python: str, isolate: bool = False) -> str:
    """The shell command of the job. ``isolate``: run in a private copy of the uploaded working dir.

    Ray extracts an uploaded working dir once per content hash and shares it between jobs (and we
    saw it vanish under a running driver), so a job that writes data/, outputs/ or .scalelab/
    relative to its cwd must not write there: it copies the folder first and runs in the copy.
    """
    parts = [python, "-m", "scalelab.cli", spec.verb, *spec.args]
    if spec.recipe:
        parts.append(spec.recipe)
    parts += recipe_overrides(spec) if spec.verb in RECIPE_VERBS else spec.overrides
    command = " ".join(shlex.quote(p) for p in parts)
    if not isolate:
        return command
    return (
        'job_dir=$(mktemp -d "${TMPDIR:-/tmp}/scalelab-job-XXXXXX") && cp -a . "$job_dir" && '
        f'cd "$job_dir" && echo "job folder: $job_dir" && exec {command}'
    )


def submission_id(spec: JobSpec) -> str:
    return (
        spec.submission_id.format(
            name=spec.name, timestamp=time.strftime("%Y%m%d-%H%M%S"), user=getpass.getuser()
        )
        + f"-{int(time.time() * 1000) % 1000:03d}"
    )


@dataclass
class Submitted:
    submission_id: str
    address: str
    entrypoint: str


class JobClient:
    """A thin layer over ``JobSubmissionClient`` that turns connection errors into clear messages."""

    def __init__(self, address: str | None = None) -> None:
        self.address = jobs_api_address(address)
        from ray.job_submission import JobSubmissionClient

        try:
            self.client = JobSubmissionClient(self.address)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot reach the cluster"
            raise ScalelabError(
                f"cannot reach the Ray Jobs API at {self.address}: {exc}. Is the cluster up "
                f"(`scalelab status`)?"
            ) from None

    def cluster_resources(self) -> tuple[dict[str, float], list[dict[str, float]]]:
        from ray.util.state import list_nodes

        nodes = [n for n in list_nodes(address=self.address, detail=True) if n.state == "ALIVE"]
        per_node = [dict(n.resources_total) for n in nodes]
        total: dict[str, float] = {}
        for res in per_node:
            for k, v in res.items():
                total[k] = total.get(k, 0) + v
        return total, per_node

    def submit(self, spec: JobSpec, base_dir: str | Path = ".", python: str | None = None) -> Submitted:
        recipe = validate_job(spec, base_dir)
        total, nodes = self.cluster_resources()
        check_resources(spec, recipe, total, nodes)
        stack = read_stack()
        py = python or spec.python or stack.get("python") or "python"
        sid = submission_id(spec)
        env_vars = {"SCALELAB_SUBMISSION_ID": sid, **spec.runtime_env.env_vars}
        if stack.get("mlflow_url") and "MLFLOW_TRACKING_URI" not in env_vars:
            env_vars["MLFLOW_TRACKING_URI"] = stack["mlflow_url"]
        runtime_env: dict[str, Any] = {"env_vars": env_vars}
        if spec.runtime_env.working_dir:
            runtime_env["working_dir"] = str(Path(base_dir) / spec.runtime_env.working_dir)
            runtime_env["excludes"] = spec.runtime_env.excludes
        if spec.runtime_env.pip:
            runtime_env["pip"] = spec.runtime_env.pip
        cmd = entrypoint(spec, py, isolate=bool(spec.runtime_env.working_dir))
        self.client.submit_job(
            entrypoint=cmd,
            submission_id=sid,
            runtime_env=runtime_env,
            metadata={"scalelab.job": spec.name, "scalelab.verb": spec.verb},
            entrypoint_num_cpus=spec.resources.num_cpus,
            entrypoint_num_gpus=spec.resources.num_gpus or None,
            entrypoint_memory=int(spec.resources.memory_gb * 2**30) if spec.resources.memory_gb else None,
        )
        return Submitted(sid, self.address, cmd)

    def status(self, sid: str) -> str:
        return str(self._call(self.client.get_job_status, sid))

    def logs(self, sid: str) -> str:
        return self._call(self.client.get_job_logs, sid)

    def stop(self, sid: str) -> bool:
        return self._call(self.client.stop_job, sid)

    def list(self) -> list:
        return self.client.list_jobs()

    def follow(self, sid: str, out) -> str:
        """Stream logs until the job ends; returns the final status."""
        import asyncio

        async def _tail() -> None:
            async for chunk in self.client.tail_job_logs(sid):
                out.write(chunk)
                out.flush()

        asyncio.run(_tail())
        return self.wait(sid)

    def wait(self, sid: str, timeout: float | None = None) -> str:
        """Poll until the job ends (``SCALELAB_JOB_POLL_INTERVAL_S``); ``timeout`` defaults to
        ``SCALELAB_JOB_WAIT_TIMEOUT_S``."""
        settings = runtime_settings()
        timeout = timeout or settings.job_wait_timeout_s
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.status(sid)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(settings.job_poll_interval_s)
        raise ScalelabError(f"job {sid} still running after {timeout:.0f}s")

    def _call(self, fn, sid: str):
        try:
            return fn(sid)
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                raise ScalelabError(f"no job {sid!r} on {self.address} (see `scalelab jobs list`)") from None
            raise
