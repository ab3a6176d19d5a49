"""``scalelab up``, ``scalelab down``, ``scalelab status``: the local stack, owned by pid."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from scalelab.config.project import in_project

console = Console()


def up(
    mlflow: Annotated[
        bool, typer.Option("--mlflow/--no-mlflow", help="Start an MLflow tracking server.")
    ] = True,
    s3: Annotated[
        bool, typer.Option("--s3", help="Start an S3-compatible server (moto) for artifacts.")
    ] = False,
    ray: Annotated[bool, typer.Option("--ray/--no-ray", help="Start a Ray head node.")] = True,
    num_cpus: Annotated[
        int | None, typer.Option(help="CPUs the Ray head offers (default: all; 1 with --workers).")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", help="Worker nodes (separate raylets) joining the head.")
    ] = 0,
    cpus_per_worker: Annotated[
        int | None, typer.Option(help="CPUs per worker node (default: CPUs / workers).")
    ] = None,
    host: Annotated[
        str,
        typer.Option(help="Bind address. Anything but loopback exposes unauthenticated services: a warning."),
    ] = "127.0.0.1",
) -> dict[str, Any]:
    """Start the local stack on 127.0.0.1 (free ports) and record it in .scalelab/stack.json."""
    from scalelab.cluster import stack

    with in_project():
        state = stack.up(
            mlflow=mlflow,
            s3=s3,
            ray=ray,
            num_cpus=num_cpus,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            host=host,
        )
    for key in ("mlflow_url", "ray_address", "dashboard_url", "s3_url"):
        if state.get(key):
            console.print(f"{key:14} {state[key]}", highlight=False)
    nodes = [s["name"] for s in state["services"] if s["name"].startswith("ray")]
    console.print(f"ray nodes      {len(nodes)} ({', '.join(nodes)})", highlight=False)
    console.print(f"recorded in {stack.STACK_FILE}; stop with `scalelab down`", highlight=False)
    return state


def down(
    only: Annotated[
        list[str] | None, typer.Argument(help="Stop only these services (mlflow, s3, ray).")
    ] = None,
) -> list:
    """Stop what `scalelab up` started (by pid; nothing else)."""
    from scalelab.cluster import stack

    with in_project():
        stopped = stack.down(only or None)
    if not stopped:
        console.print("nothing to stop (no stack recorded in .scalelab/stack.json)")
    for svc in stopped:
        console.print(f"stopped {svc.name} (pid {svc.pid})", highlight=False)
    return stopped


def status() -> list[dict[str, Any]]:
    """Show the stack's processes, whether they run, and their addresses."""
    from scalelab.cluster import stack
    from scalelab.cluster.session import live_ray_address

    with in_project():
        rows = stack.status()
        state = stack.read_stack()
        live = bool(state.get("dashboard_url")) and live_ray_address() is not None
    if not rows:
        console.print("no stack running (start one with `scalelab up`)")
        return rows
    table = Table("service", "pid", "alive", "address", "log")
    for r in rows:
        alive = "yes" if r["alive"] else "NO"
        table.add_row(r["name"], str(r["pid"]), alive, r["address"] or r["url"], r["log"])
    console.print(table)
    for key in ("mlflow_url", "dashboard_url", "s3_url"):
        if state.get(key):
            console.print(f"{key:14} {state[key]}", highlight=False)
    if live:
        _print_cluster(state["dashboard_url"])
    return rows


def _print_cluster(dashboard_url: str) -> None:
    """Nodes with their resources, and the jobs, as the Ray dashboard reports them."""
    from scalelab.cluster.jobs import JobClient

    try:
        client = JobClient(dashboard_url)
        total, nodes = client.cluster_resources()
        jobs = client.list()
    except Exception as exc:  # noqa: BLE001 - status still shows the processes
        console.print(f"(cluster details unavailable: {exc})")
        return
    table = Table("node", "CPU", "GPU", "memory GiB")
    for i, res in enumerate(nodes):
        table.add_row(
            str(i), f"{res.get('CPU', 0):g}", f"{res.get('GPU', 0):g}", f"{res.get('memory', 0) / 2**30:.1f}"
        )
    console.print(table)
    running = [
        j for j in jobs if str(j.status) in ("RUNNING", "PENDING", "JobStatus.RUNNING", "JobStatus.PENDING")
    ]
    console.print(f"jobs: {len(jobs)} submitted, {len(running)} running", highlight=False)
    for j in running:
        console.print(f"  {j.submission_id}  {j.status}  {j.entrypoint[-80:]}", highlight=False)
