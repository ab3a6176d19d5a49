"""``scalelab submit`` and ``scalelab jobs list|logs|stop``: Ray Jobs API from the terminal."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console(width=160)


def mlflow_runs_by_submission() -> dict[str, str]:
    """submission id -> MLflow run id, from the tag the training run writes (best effort)."""
    try:
        import mlflow

        from scalelab.tracking.uri import resolve_tracking_uri

        client = mlflow.MlflowClient(resolve_tracking_uri())
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, "tags.`ray.submission_id` != ''", max_results=500) if exps else []
        return {r.data.tags["ray.submission_id"]: r.info.run_id for r in runs}
    except Exception:  # noqa: BLE001 - the job table is still useful without the MLflow column
        return {}


Address = Annotated[str | None, typer.Option(help="Ray dashboard URL.")]


def submit(
    job: Annotated[Path, typer.Argument(help="Job spec YAML, e.g. jobs/train.yaml.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Extra recipe overrides for the job.")] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray dashboard/Jobs API URL (default: the running stack).")
    ] = None,
    python: Annotated[str | None, typer.Option(help="The cluster's Python interpreter.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the logs until the job ends.")] = False,
) -> str:
    """Submit a job spec to a Ray cluster through the Jobs API."""
    from scalelab.cluster.jobs import JobClient, load_job_spec

    spec = load_job_spec(job, overrides or [])
    client = JobClient(address)
    sub = client.submit(spec, python=python)
    console.print(
        f"submitted [bold]{sub.submission_id}[/] to {sub.address}\n  {sub.entrypoint}", highlight=False
    )
    if wait:
        status = client.follow(sub.submission_id, sys.stdout)
        console.print(f"job {sub.submission_id}: {status}")
        if status != "SUCCEEDED":
            raise typer.Exit(1)
    return sub.submission_id


def list_jobs(address: Address = None) -> list:
    """Jobs with status, entrypoint and their MLflow run."""
    from scalelab.cluster.jobs import JobClient

    client = JobClient(address)
    runs = mlflow_runs_by_submission()
    table = Table(title=f"jobs on {client.address}")
    for col in ("submission id", "status", "mlflow run", "entrypoint"):
        table.add_column(col)
    jobs = sorted(client.list(), key=lambda j: j.start_time or 0)
    for info in jobs:
        sid = info.submission_id or info.job_id or ""
        table.add_row(sid, str(info.status), runs.get(sid, ""), info.entrypoint[-80:])
    console.print(table)
    return jobs


def logs(
    submission_id: Annotated[str, typer.Argument(help="Submission id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False,
    address: Address = None,
) -> None:
    """Print (or follow) a job's logs."""
    from scalelab.cluster.jobs import JobClient

    client = JobClient(address)
    if follow:
        client.follow(submission_id, sys.stdout)
    else:
        sys.stdout.write(client.logs(submission_id))


def stop(
    submission_id: Annotated[str, typer.Argument(help="Submission id.")], address: Address = None
) -> bool:
    """Stop a running job."""
    from scalelab.cluster.jobs import JobClient

    client = JobClient(address)
    stopped = client.stop(submission_id)
    console.print(
        f"{submission_id}: {'stop requested' if stopped else 'was not running'} "
        f"(status {client.status(submission_id)})"
    )
    return stopped
