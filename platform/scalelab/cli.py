"""The ``scalelab`` command: a plain map from verb to function.

Each concern owns its verbs in ``scalelab/<concern>/commands.py`` with a ``register(app)``
function; this file only assembles them and turns :class:`ScalelabError` into a clear message
and a non-zero exit (never a bare traceback for a user's mistake).
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
from rich.console import Console

from scalelab.config.console import quiet_third_party_logs
from scalelab.errors import ScalelabError

COMMAND_MODULES = [
    "scalelab.train.commands",
    "scalelab.train.evaluate_cmd",
    "scalelab.data.commands",
    "scalelab.models.commands",
    "scalelab.cluster.commands",
    "scalelab.registry.commands",
    "scalelab.serve.commands",
    "scalelab.cluster.job_commands",
    "scalelab.pipeline.commands",
    "scalelab.tune.commands",
    "scalelab.cluster.ui_commands",
]

app = typer.Typer(
    name="scalelab",
    help="Train, search, promote and serve multi-scale ResNets on Ray, MLflow and DVC.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


@app.command()
def version() -> None:
    """Print the versions of scalelab and the stack it runs on."""
    import scalelab

    typer.echo(f"scalelab {scalelab.__version__}")
    for mod in ("torch", "ray", "mlflow", "dvc"):
        try:
            typer.echo(f"{mod} {importlib.import_module(mod).__version__}")
        except Exception:  # noqa: BLE001 - a missing optional engine is reported, not fatal
            typer.echo(f"{mod} not installed")


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    quiet_third_party_logs()
    try:
        app(standalone_mode=False)
    except ScalelabError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and aborts
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        if os.environ.get("SCALELAB_DEBUG"):
            raise
        raise


if __name__ == "__main__":
    main()
