"""``scalelab register | promote | rollback`` and ``scalelab models list | show``."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from scalelab.config.project import in_project

console = Console(width=160)


TrackingUri = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow URI (default: resolved).")]
ModelName = Annotated[str, typer.Argument(help="Registered model name.")]


def _client(uri: str | None):
    from scalelab.tracking.bundles import connect

    with in_project():  # the embedded store is the project's .scalelab/mlflow.db
        return connect(uri)


def _print_outcome(outcome) -> None:
    colour = {"promoted": "green", "would-promote": "green", "rolled-back": "yellow"}.get(
        outcome.decision, "red"
    )
    console.print(
        f"[bold {colour}]{outcome.decision}[/] {outcome.name}: candidate v{outcome.candidate}, "
        f"champion before: {('v' + outcome.previous) if outcome.previous else 'none'}",
        highlight=False,
    )
    for reason in outcome.reasons:
        console.print(f"  - {reason}", highlight=False)
    if outcome.numbers:
        console.print_json(json.dumps(outcome.numbers))


def register(
    ref: Annotated[str, typer.Argument(help="MLflow run id, run/search name, or a local bundle folder.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Registered model name (default: the recipe's).")
    ] = None,
    alias: Annotated[
        str | None, typer.Option("--alias", help="Also point this alias at it (e.g. challenger).")
    ] = None,
    tracking_uri: TrackingUri = None,
    *,
    description: str | None = None,
    quiet: bool = False,
):
    """Register a run's model as a new version, tagged with data version, commit, spec hash, metrics."""
    from scalelab.registry.register import register_run

    if Path(ref).is_dir():  # a bundle folder given relative to the caller's folder
        ref = str(Path(ref).absolute())
    client = _client(tracking_uri)
    with in_project():
        mv = register_run(client, ref, name=name, alias=alias, description=description)
    if quiet:
        return mv
    console.print(
        f"[bold green]registered[/] {mv.name} v{mv.version} from run {mv.run_id}"
        + (f" (@{alias})" if alias else ""),
        highlight=False,
    )
    typer.echo(json.dumps({"name": mv.name, "version": mv.version, "run_id": mv.run_id}))
    return mv


def promote(
    name: ModelName,
    version: Annotated[str | None, typer.Option("--version", "-v", help="Candidate version.")] = None,
    alias: Annotated[
        str | None, typer.Option("--alias", help="Candidate by alias (e.g. challenger).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Evaluate and print; move nothing.")] = False,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Take the promotion policy from this recipe.")
    ] = None,
    min_delta: Annotated[
        float | None, typer.Option(help="Override: required accuracy gain over the champion.")
    ] = None,
    min_accuracy: Annotated[float | None, typer.Option(help="Override: absolute accuracy floor.")] = None,
    latency_p95_ms: Annotated[
        float | None, typer.Option(help="Override: p95 single-image latency budget (ms).")
    ] = None,
    lock_timeout: Annotated[float, typer.Option(help="Seconds to wait for a concurrent promotion.")] = 300.0,
    tracking_uri: TrackingUri = None,
    *,
    policy: dict[str, Any] | None = None,
    quiet: bool = False,
):
    """Move @champion to a version if it passes the gate (accuracy vs champion, latency, smoke test)."""
    # ``policy`` (Python callers, the pipeline): a whole promotion section, e.g. a recipe's with
    # overrides applied; the three options above still win over it.
    from scalelab.registry.promote import promote as promote_version

    policy = dict(policy or {})
    if recipe:
        from scalelab.config import load_recipe

        policy = load_recipe(recipe).promotion.model_dump()
    policy.update(min_delta=min_delta, min_accuracy=min_accuracy, latency_p95_ms=latency_p95_ms)
    client = _client(tracking_uri)
    with in_project(recipe.absolute() if recipe else None):
        outcome = promote_version(
            client,
            name,
            version=version,
            alias=alias,
            policy=policy,
            dry_run=dry_run,
            lock_timeout_s=lock_timeout,
        )
    if not quiet:
        _print_outcome(outcome)
    return outcome


def promote_command(*args: Any, **kwargs: Any) -> None:
    outcome = promote(*args, **kwargs)
    if outcome.decision in ("refused", "would-refuse"):
        sys.exit(1)  # a refusal is an answer, not an error: exit 1 without a traceback


promote_command.__signature__ = inspect.signature(promote)  # the CLI shows promote's options
promote_command.__doc__ = promote.__doc__


def rollback(
    name: ModelName,
    to: Annotated[
        str | None, typer.Option("--to", help="Version to roll back to (default: the previous champion).")
    ] = None,
    tracking_uri: TrackingUri = None,
):
    """Move @champion back to the champion it replaced."""
    from scalelab.registry.promote import rollback as rollback_alias

    outcome = rollback_alias(_client(tracking_uri), name, to_version=to)
    _print_outcome(outcome)
    return outcome


def list_models(tracking_uri: TrackingUri = None) -> list:
    """Registered models with their versions and aliases."""
    from scalelab.tracking.bundles import is_lock, list_versions

    client = _client(tracking_uri)
    table = Table(title="registered models")
    for col in ("name", "versions", "aliases", "champion test_acc", "description"):
        table.add_column(col)
    models = [m for m in client.search_registered_models(max_results=1000) if not is_lock(m)]
    for model in models:
        versions = list_versions(client, model.name)
        aliases = model.aliases or {}
        champ = next((v for v in versions if str(v.version) == str(aliases.get("champion"))), None)
        table.add_row(
            model.name,
            str(len(versions)),
            ", ".join(f"@{a}=v{v}" for a, v in sorted(aliases.items())) or "-",
            (champ.tags or {}).get("metric.test_acc", "-") if champ else "-",
            (model.description or "")[:60],
        )
    console.print(table)
    return models


def show_model(
    name: ModelName,
    history_limit: Annotated[int, typer.Option("--history", help="Promotion history entries to show.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    tracking_uri: TrackingUri = None,
) -> dict[str, Any]:
    """Versions (metrics, lineage, aliases) and the promotion history of one model."""
    from scalelab.registry.history import read_history
    from scalelab.tracking.bundles import get_model, list_versions, version_info

    client = _client(tracking_uri)
    model = get_model(client, name)
    aliases = model.aliases or {}
    versions = [version_info(v) for v in list_versions(client, name)]
    for v in versions:
        v["aliases"] = sorted(a for a, ver in aliases.items() if str(ver) == v["version"])
    shown = {
        "name": name,
        "aliases": aliases,
        "versions": versions,
        "history": read_history(client, name)[-history_limit:],
    }
    if as_json:
        typer.echo(json.dumps(shown, indent=2, default=str))
    else:
        console.print(f"[bold]{name}[/] {model.description or ''}", highlight=False)
        console.print(_versions_table(versions))
        console.print(_history_table(shown["history"]))
    return shown


def _versions_table(versions: list[dict[str, Any]]) -> Table:
    table = Table(title="versions")
    for col in ("version", "aliases", "test_acc", "run", "data", "git", "spec", "weights"):
        table.add_column(col)
    for v in versions:
        dv = v["data_version"]
        table.add_row(
            v["version"],
            ", ".join("@" + a for a in v["aliases"]) or "-",
            v["metrics"].get("test_acc", "-"),
            (v["run_id"] or "")[:12],
            f"{dv.get('name', '')} {dv.get('hash', '')[:10]}".strip(),
            (v["git_commit"] or "")[:10],
            (v["spec_hash"] or "")[:10],
            (v["weights_sha256"] or "")[:12],
        )
    return table


def _history_table(history: list[dict[str, Any]]) -> Table:
    hist = Table(title="promotion history")
    for col in ("time", "user", "action", "from", "to", "decision", "numbers / reasons"):
        hist.add_column(col)
    for h in history:
        nums = h.get("numbers") or {}
        detail = ", ".join(
            f"{k}={nums[k]}" for k in ("candidate_acc", "champion_acc", "latency_p95_ms") if k in nums
        )
        hist.add_row(
            str(h.get("time", "")),
            str(h.get("user", "")),
            str(h.get("action", "")),
            str(h.get("from") or "-"),
            str(h.get("to") or "-"),
            str(h.get("decision", "")),
            detail or "; ".join(h.get("reasons", []))[:80],
        )
    return hist
