"""The ``scalelab`` command: a plain map from verb to function (as litgpt's ``__main__`` does).

Every verb is a module-level function in its concern's ``commands.py``, with typed arguments, so
Python code and the pipeline call the very function the command line does. :data:`VERBS` names
them as ``"module:function"``; a module is imported only when its verb runs or shows its own
help, so ``scalelab --help`` never imports torch, Ray or MLflow. Groups (``data``, ``models``,
``jobs``, ``pipeline``) are nested maps. :func:`main` turns a :class:`ScalelabError` into a clear
message and exit status 2 (with ``SCALELAB_DEBUG=1``, also its traceback).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import typer
from rich.console import Console
from typer import _click as click
from typer.core import TyperCommand, TyperGroup

from scalelab.config.console import quiet_third_party_logs
from scalelab.errors import ScalelabError


@dataclass(frozen=True)
class Verb:
    target: str  # "module:function"
    help: str  # the one line `scalelab --help` shows (a test keeps it equal to the docstring's)


@dataclass(frozen=True)
class Group:
    help: str
    verbs: dict[str, Verb | Group] = field(default_factory=dict)
    # the verb run when the first word is none of ``verbs`` (``scalelab serve NAME`` = ``serve run NAME``)
    default: str | None = None


VERBS: dict[str, Verb | Group] = {
    "version": Verb("scalelab.cli:version", "Print the versions of scalelab and the stack it runs on."),
    "train": Verb(
        "scalelab.train.commands:train",
        "Train a model from a recipe (in-process, or on Ray Train when train.workers > 0).",
    ),
    "evaluate": Verb(
        "scalelab.train.evaluate_cmd:evaluate_command",
        "Evaluate a trained model bundle on the recipe's prepared data.",
    ),
    "up": Verb(
        "scalelab.cluster.commands:up",
        "Start the local stack on 127.0.0.1 (free ports) and record it in .scalelab/stack.json.",
    ),
    "down": Verb("scalelab.cluster.commands:down", "Stop what `scalelab up` started (by pid; nothing else)."),
    "status": Verb(
        "scalelab.cluster.commands:status",
        "Show the stack's processes, whether they run, and their addresses.",
    ),
    "register": Verb(
        "scalelab.registry.commands:register",
        "Register a run's model as a new version, tagged with data version, commit, spec hash, metrics.",
    ),
    "promote": Verb(
        "scalelab.registry.commands:promote_command",
        "Move @champion to a version if it passes the gate (accuracy vs champion, latency, smoke test).",
    ),
    "rollback": Verb(
        "scalelab.registry.commands:rollback", "Move @champion back to the champion it replaced."
    ),
    "serve": Group(
        "Serve models over HTTP with Ray Serve; `scalelab serve NAME` is `scalelab serve run NAME`.",
        {
            "run": Verb(
                "scalelab.serve.commands:serve_command",
                "Serve a registered model over HTTP with Ray Serve (batching, autoscaling, hot swap).",
            ),
            "list": Verb(
                "scalelab.serve.commands:list_served",
                "List the models served on the running cluster: application, status, URL.",
            ),
            "stop": Verb(
                "scalelab.serve.commands:stop_served",
                "Stop one served model on the running cluster; the others keep serving.",
            ),
        },
        default="run",
    ),
    "predict": Verb(
        "scalelab.predict.commands:predict_command",
        "Score an image folder, an S3 prefix or a dataset version with a model on Ray Data, into Parquet.",
    ),
    "submit": Verb(
        "scalelab.cluster.job_commands:submit", "Submit a job spec to a Ray cluster through the Jobs API."
    ),
    "tune": Verb(
        "scalelab.tune.commands:tune_command",
        "Search scales, depths, widths and optimiser settings with Ray Tune (ASHA + Optuna).",
    ),
    "ui": Verb(
        "scalelab.cluster.ui_commands:ui_command",
        "Open the MLflow UI (runs, searches, registry) on this project's store; Ctrl-C stops it.",
    ),
    "data": Group(
        "Datasets: prepare and version them with DVC.",
        {
            "prepare": Verb(
                "scalelab.data.commands:prepare",
                "Materialise the recipe's dataset into data_dir/name in the canonical form.",
            ),
            "push": Verb(
                "scalelab.data.commands:push",
                "`dvc push` the prepared dataset, after checking the remote (endpoint, bucket) answers.",
            ),
            "pull": Verb(
                "scalelab.data.commands:pull",
                "`dvc pull` the dataset version recorded in dvc.lock (on the driver, never per worker).",
            ),
            "versions": Verb(
                "scalelab.data.commands:versions",
                "List the dataset's versions: git revisions where DVC recorded a new content hash.",
            ),
            "verify": Verb(
                "scalelab.data.commands:verify",
                "Recompute checksums of the prepared data against metadata.json and dvc.lock.",
            ),
            "remote": Verb(
                "scalelab.data.commands:remote",
                "Add (or replace) a DVC remote. "
                "Credentials stay in the AWS env/profile, never in the config.",
            ),
        },
    ),
    "models": Group(
        "Model family (variants) and the model registry.",
        {
            "list": Verb(
                "scalelab.registry.commands:list_models", "Registered models with their versions and aliases."
            ),
            "show": Verb(
                "scalelab.registry.commands:show_model",
                "Versions (metrics, lineage, aliases) and the promotion history of one model.",
            ),
            "variants": Verb(
                "scalelab.models.commands:variants",
                "List registered variants with scales, depths, widths, parameters and FLOPs.",
            ),
        },
    ),
    "jobs": Group(
        "Jobs on the Ray cluster.",
        {
            "list": Verb(
                "scalelab.cluster.job_commands:list_jobs",
                "Jobs with status, entrypoint and their MLflow run.",
            ),
            "logs": Verb("scalelab.cluster.job_commands:logs", "Print (or follow) a job's logs."),
            "stop": Verb("scalelab.cluster.job_commands:stop", "Stop a running job."),
        },
    ),
    "pipeline": Group(
        "The whole path of one model, step by step.",
        {
            "run": Verb(
                "scalelab.pipeline.commands:run_command",
                "data -> tune -> train -> register -> promote -> serve -> smoke -> report; "
                "finished steps skip.",
            ),
        },
    ),
}


def version() -> None:
    """Print the versions of scalelab and the stack it runs on."""
    import scalelab

    typer.echo(f"scalelab {scalelab.__version__}")
    for mod in ("torch", "ray", "mlflow", "dvc"):
        try:
            typer.echo(f"{mod} {importlib.import_module(mod).__version__}")
        except Exception:  # noqa: BLE001 - a missing optional engine is reported, not fatal
            typer.echo(f"{mod} not installed")


def load_verb(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _evaluated(annotation: Any, fn: Callable[..., Any]) -> Any:
    """A string annotation (``from __future__ import annotations``) as the object it names."""
    return eval(annotation, fn.__globals__) if isinstance(annotation, str) else annotation  # noqa: S307


def as_command(fn: Callable[..., Any]) -> Callable[..., None]:
    """``fn`` as typer reads it: its parameters' annotations evaluated, its keyword-only parameters
    (for Python callers, such as the pipeline) left out, the return value dropped.

    A verb returns a typed result (``TrainOutcome``) whose class its module imports only under
    ``TYPE_CHECKING`` (it would pull in torch); typer evaluates every annotation, the return's too.
    """
    sig = inspect.signature(fn)
    params = [
        p.replace(annotation=_evaluated(p.annotation, fn))
        for p in sig.parameters.values()
        if p.kind is not p.KEYWORD_ONLY  # keyword-only parameters are for Python callers only
    ]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> None:
        fn(**kwargs)

    command.__signature__ = sig.replace(parameters=params, return_annotation=inspect.Signature.empty)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


class LazyVerb(TyperCommand):
    """Stands in for a verb in its group's listing; the real command is built (and its module
    imported) only when the verb is invoked or asked for its own ``--help``."""

    def __init__(self, name: str, verb: Verb) -> None:
        super().__init__(name=name, help=verb.help)
        self.verb = verb
        self._real: click.Command | None = None

    def real(self) -> click.Command:
        if self._real is None:
            single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
            single.command(self.name)(as_command(load_verb(self.verb.target)))
            self._real = typer.main.get_command(single)
        return self._real

    def make_context(self, info_name, args, parent=None, **extra: Any) -> click.Context:
        return self.real().make_context(info_name, args, parent=parent, **extra)


class LazyGroup(TyperGroup):
    """A group whose verbs come from a :class:`Group` table, each a :class:`LazyVerb`."""

    def __init__(self, *, table: Group, **attrs: Any) -> None:
        attrs.setdefault("help", table.help)
        attrs.setdefault("no_args_is_help", True)
        super().__init__(**attrs)
        self.default_verb = table.default
        for name, entry in table.verbs.items():
            if isinstance(entry, Group):
                self.add_command(LazyGroup(name=name, table=entry))
            else:
                self.add_command(LazyVerb(name, entry))

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """A first word that is no verb of this group (and no option) goes to its default verb."""
        if self.default_verb and args and args[0] not in self.commands and not args[0].startswith("-"):
            args = [self.default_verb, *args]
        return super().resolve_command(ctx, args)


class RootGroup(LazyGroup):
    def __init__(self, **attrs: Any) -> None:
        super().__init__(table=Group(HELP, VERBS), **attrs)


HELP = "Train, search, promote and serve multi-scale ResNets on Ray, MLflow and DVC."
app = typer.Typer(
    name="scalelab",
    help=HELP,
    cls=RootGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """The verbs are in :data:`VERBS`; this callback only makes ``app`` a group."""


err_console = Console(stderr=True)


def main() -> None:
    quiet_third_party_logs()
    try:
        app(standalone_mode=False)
    except ScalelabError as exc:
        if os.environ.get("SCALELAB_DEBUG"):  # where it was raised, for a bug report
            err_console.print("".join(traceback.format_exception(exc)), highlight=False, markup=False)
        from rich.markup import escape  # messages quote paths and logs: "[...]" is text, not markup

        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors
        exc.show()
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)


if __name__ == "__main__":
    main()
