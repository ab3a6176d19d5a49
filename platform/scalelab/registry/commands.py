"""``scalelab register | promote | rollback`` and ``scalelab models list | show``."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

console = Console(width=160)


def _client(uri: str | None):
    from scalelab.tracking.bundles import connect

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


def register(app: typer.Typer) -> None:
    @app.command("register")
    def register_cmd(
        ref: str = typer.Argument(..., help="MLflow run id, run/search name, or a local bundle folder."),
        name: str = typer.Option(None, "--name", help="Registered model name (default: the recipe's)."),
        alias: str = typer.Option(None, "--alias", help="Also point this alias at it (e.g. challenger)."),
        tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow URI (default: resolved)."),
    ) -> None:
        """Register a run's model as a new version, tagged with data version, commit, spec hash, metrics."""
        from scalelab.registry.register import register_run

        mv = register_run(_client(tracking_uri), ref, name=name, alias=alias)
        console.print(
            f"[bold green]registered[/] {mv.name} v{mv.version} from run {mv.run_id}"
            + (f" (@{alias})" if alias else ""),
            highlight=False,
        )
        typer.echo(json.dumps({"name": mv.name, "version": mv.version, "run_id": mv.run_id}))

    @app.command("promote")
    def promote_cmd(
        name: str = typer.Argument(..., help="Registered model name."),
        version: str = typer.Option(None, "--version", "-v", help="Candidate version."),
        alias: str = typer.Option(None, "--alias", help="Candidate by alias (e.g. challenger)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Evaluate and print; move nothing."),
        recipe: str = typer.Option(None, "--recipe", help="Take the promotion policy from this recipe."),
        min_delta: float = typer.Option(None, help="Override: required accuracy gain over the champion."),
        min_accuracy: float = typer.Option(None, help="Override: absolute accuracy floor."),
        latency_p95_ms: float = typer.Option(None, help="Override: p95 single-image latency budget (ms)."),
        lock_timeout: float = typer.Option(300.0, help="Seconds to wait for a concurrent promotion."),
        tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow URI (default: resolved)."),
    ) -> None:
        """Move @champion to a version if it passes the gate (accuracy vs champion, latency, smoke test)."""
        from scalelab.registry.promote import promote

        policy: dict = {}
        if recipe:
            from scalelab.config import load_recipe

            policy = load_recipe(recipe).promotion.model_dump()
        policy.update(min_delta=min_delta, min_accuracy=min_accuracy, latency_p95_ms=latency_p95_ms)
        outcome = promote(
            _client(tracking_uri),
            name,
            version=version,
            alias=alias,
            policy=policy,
            dry_run=dry_run,
            lock_timeout_s=lock_timeout,
        )
        _print_outcome(outcome)
        if outcome.decision in ("refused", "would-refuse"):
            sys.exit(1)  # a refusal is an answer, not an error: exit 1 without a traceback

    @app.command("rollback")
    def rollback_cmd(
        name: str = typer.Argument(..., help="Registered model name."),
        to: str = typer.Option(
            None, "--to", help="Version to roll back to (default: the previous champion)."
        ),
        tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow URI (default: resolved)."),
    ) -> None:
        """Move @champion back to the champion it replaced."""
        from scalelab.registry.promote import rollback

        _print_outcome(rollback(_client(tracking_uri), name, to_version=to))


def add_model_commands(models_app: typer.Typer) -> None:
    """``models list`` / ``models show``, added to the existing ``scalelab models`` group."""

    @models_app.command("list")
    def list_cmd(
        tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow URI (default: resolved)."),
    ) -> None:
        """Registered models with their versions and aliases."""
        from scalelab.tracking.bundles import is_lock, list_versions

        client = _client(tracking_uri)
        table = Table(title="registered models")
        for col in ("name", "versions", "aliases", "champion test_acc", "description"):
            table.add_column(col)
        for model in client.search_registered_models(max_results=1000):
            if is_lock(model):
                continue
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

    @models_app.command("show")
    def show_cmd(
        name: str = typer.Argument(..., help="Registered model name."),
        history_limit: int = typer.Option(20, "--history", help="Promotion history entries to show."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
        tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow URI (default: resolved)."),
    ) -> None:
        """Versions (metrics, lineage, aliases) and the promotion history of one model."""
        from scalelab.registry.history import read_history
        from scalelab.tracking.bundles import get_model, list_versions, version_info

        client = _client(tracking_uri)
        model = get_model(client, name)
        aliases = model.aliases or {}
        versions = [version_info(v) for v in list_versions(client, name)]
        for v in versions:
            v["aliases"] = sorted(a for a, ver in aliases.items() if str(ver) == v["version"])
        history = read_history(client, name)[-history_limit:]
        if as_json:
            typer.echo(
                json.dumps(
                    {"name": name, "aliases": aliases, "versions": versions, "history": history},
                    indent=2,
                    default=str,
                )
            )
            return
        console.print(f"[bold]{name}[/] {model.description or ''}", highlight=False)
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
        console.print(table)
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
        console.print(hist)
