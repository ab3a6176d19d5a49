"""``scalelab ui``: the MLflow UI on the project's tracking store, on loopback, until Ctrl-C.

A local service like `scalelab up`'s (cluster part); what to start for which store is
:mod:`scalelab.tracking.ui`."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(soft_wrap=True)  # URLs stay whole, to click or copy


def ray_dashboard_url() -> str | None:
    """The Ray dashboard of the running `scalelab up` / pipeline stack, if one runs."""
    from scalelab.cluster.session import live_ray_address, read_stack

    if live_ray_address() is None:
        return None
    return read_stack().get("dashboard_url")


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _print_run_link(ui_url: str, tracking_uri: str, run_id: str | None) -> None:
    from scalelab.tracking.ui import experiment_of, run_url

    if not run_id:
        return
    experiment_id = experiment_of(tracking_uri, run_id)
    if experiment_id is None:
        console.print(f"[yellow]run {run_id} not found in {tracking_uri}[/]", highlight=False)
        return
    console.print(f"run            {run_url(ui_url, experiment_id, run_id)}", highlight=False)


def ui(
    host: str = "127.0.0.1",
    port: int | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> None:
    """Start the MLflow UI on the project's store (or print the server's URL); block until stopped."""
    from scalelab.cluster.services import free_port, start_mlflow_server
    from scalelab.tracking.ui import plan_ui
    from scalelab.tracking.uri import STATE_DIR, resolve_tracking_uri

    plan = plan_ui(resolve_tracking_uri(tracking_uri))
    dashboard = ray_dashboard_url()
    if plan.existing_url:
        console.print(f"MLflow UI      {plan.existing_url}  (the tracking server itself)", highlight=False)
        _print_run_link(plan.existing_url, plan.tracking_uri, run_id)
        if dashboard:
            console.print(f"Ray dashboard  {dashboard}", highlight=False)
        return
    port = port or free_port(host)
    console.print(f"starting the MLflow UI on {plan.tracking_uri} ...", highlight=False)
    svc = start_mlflow_server(
        Path(STATE_DIR) / "ui",
        host=host,
        port=port,
        backend_uri=plan.backend_uri,
        artifacts_destination=plan.artifacts_destination,
    )
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill PID` stops it like Ctrl-C
    try:
        console.print(f"MLflow UI      {svc.url}", highlight=False)
        _print_run_link(svc.url, plan.tracking_uri, run_id)
        if dashboard:
            console.print(f"Ray dashboard  {dashboard}", highlight=False)
        console.print(f"(server log: {svc.log}; Ctrl-C stops the UI)", highlight=False)
        while svc.alive():
            time.sleep(0.5)
        from scalelab.errors import ScalelabError

        tail = Path(svc.log).read_text(errors="replace")[-1500:] if Path(svc.log).exists() else ""
        raise ScalelabError(f"the MLflow UI server exited on its own:\n{tail}")
    except KeyboardInterrupt:
        pass
    finally:
        svc.stop()
        signal.signal(signal.SIGTERM, previous)
    console.print("MLflow UI stopped")


def ui_command(
    port: Annotated[int | None, typer.Option("--port", help="Port for the UI (default: a free one).")] = None,
    host: Annotated[str, typer.Option("--host", help="Bind address (loopback by default).")] = "127.0.0.1",
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri", help="Store to show (default: $MLFLOW_TRACKING_URI, stack, embedded)."
        ),
    ] = None,
    run_id: Annotated[
        str | None, typer.Option("--run", help="Also print the UI link of this MLflow run.")
    ] = None,
) -> None:
    """Open the MLflow UI (runs, searches, registry) on this project's store; Ctrl-C stops it."""
    from scalelab.config.project import in_project

    if host not in ("127.0.0.1", "localhost"):
        console.print(f"[yellow]warning[/]: the MLflow UI on {host} has no authentication", highlight=False)
    with in_project():  # the project's embedded store, whatever folder this runs from
        ui(host=host, port=port, tracking_uri=tracking_uri, run_id=run_id)
