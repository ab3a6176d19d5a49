"""``scalelab up``, ``scalelab down``, ``scalelab status``: the local stack, owned by pid."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def register(app: typer.Typer) -> None:
    @app.command()
    def up(
        mlflow: bool = typer.Option(True, "--mlflow/--no-mlflow", help="Start an MLflow tracking server."),
        s3: bool = typer.Option(False, "--s3", help="Start an S3-compatible server (moto) for artifacts."),
        ray: bool = typer.Option(True, "--ray/--no-ray", help="Start a Ray head node."),
        num_cpus: int = typer.Option(None, help="CPUs the Ray head offers (default: all)."),
    ) -> None:
        """Start the local stack on 127.0.0.1 (free ports) and record it in .scalelab/stack.json."""
        from scalelab.cluster import stack

        state = stack.up(mlflow=mlflow, s3=s3, ray=ray, num_cpus=num_cpus)
        for key in ("mlflow_url", "ray_address", "dashboard_url", "s3_url"):
            if state.get(key):
                console.print(f"{key:14} {state[key]}", highlight=False)
        console.print(f"recorded in {stack.STACK_FILE}; stop with `scalelab down`", highlight=False)

    @app.command()
    def down(
        only: list[str] = typer.Argument(None, help="Stop only these services (mlflow, s3, ray)."),
    ) -> None:
        """Stop what `scalelab up` started (by pid; nothing else)."""
        from scalelab.cluster import stack

        stopped = stack.down(only or None)
        if not stopped:
            console.print("nothing to stop (no stack recorded in .scalelab/stack.json)")
        for svc in stopped:
            console.print(f"stopped {svc.name} (pid {svc.pid})", highlight=False)

    @app.command()
    def status() -> None:
        """Show the stack's processes, whether they run, and their addresses."""
        from scalelab.cluster import stack

        rows = stack.status()
        if not rows:
            console.print("no stack running (start one with `scalelab up`)")
            return
        table = Table("service", "pid", "alive", "address", "log")
        for r in rows:
            alive = "yes" if r["alive"] else "NO"
            table.add_row(r["name"], str(r["pid"]), alive, r["address"] or r["url"], r["log"])
        console.print(table)
