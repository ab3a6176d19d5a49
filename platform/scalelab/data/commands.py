"""``scalelab data``: prepare, push, pull, versions, verify, remote."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from scalelab.errors import DataError

console = Console()

RECIPE = typer.Argument(..., help="Recipe YAML whose data section to use, e.g. pipelines/digits.yaml.")
OVERRIDES = typer.Argument(None, help="Dotted overrides, e.g. data.split_seed=1.")


def _data_spec(recipe: str, overrides: list[str] | None):
    from scalelab.config import load_recipe

    return load_recipe(recipe, overrides or []).data


def _repo_and_target(spec) -> tuple[Path, str]:
    from scalelab.data.versioning import find_dvc_root

    prepared = Path(spec.data_dir) / spec.name
    root = find_dvc_root(prepared if prepared.exists() else Path(spec.data_dir))
    if root is None:
        raise DataError(f"{prepared} is not inside a DVC repository; run `dvc init` at the project root")
    return root, (prepared.resolve()).relative_to(root).as_posix()


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Datasets: prepare and version them with DVC.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("prepare")
    def prepare_cmd(recipe: str = RECIPE, overrides: list[str] = OVERRIDES) -> None:
        """Materialise the recipe's dataset into data_dir/name in the canonical form."""
        from scalelab.data import prepare, read_prepared
        from scalelab.data.versioning import dvc_dir_hash

        spec = _data_spec(recipe, overrides)
        path = prepare(spec)
        ds = read_prepared(path)
        sizes = ", ".join(f"{k} {len(v)}" for k, v in ds.splits.items())
        console.print(
            f"prepared {ds.name} -> {path}: {sizes}; {ds.num_classes} classes, "
            f"{ds.image_size}x{ds.image_size}x{ds.channels}; md5 {dvc_dir_hash(path)}",
            highlight=False,
        )
        if ds.source_report.get("skipped_count"):
            skipped = ds.source_report["skipped"]
            console.print(
                f"[yellow]skipped {len(skipped)} unreadable file(s):[/] {', '.join(skipped[:10])}"
                f"{' ...' if len(skipped) > 10 else ''}",
                highlight=False,
            )

    @data_app.command("push")
    def push_cmd(
        recipe: str = RECIPE,
        overrides: list[str] = OVERRIDES,
        remote: str = typer.Option(None, "--remote", "-r", help="DVC remote (default: the repo's default)."),
    ) -> None:
        """`dvc push` the prepared dataset, after checking the remote (endpoint, bucket) answers."""
        from scalelab.data.remote import transfer

        root, target = _repo_and_target(_data_spec(recipe, overrides))
        console.print(f"push {target}: {transfer(root, 'push', [target], remote)}", highlight=False)

    @data_app.command("pull")
    def pull_cmd(
        recipe: str = RECIPE,
        overrides: list[str] = OVERRIDES,
        remote: str = typer.Option(None, "--remote", "-r", help="DVC remote (default: the repo's default)."),
    ) -> None:
        """`dvc pull` the dataset version recorded in dvc.lock (on the driver, never per worker)."""
        from scalelab.data.remote import transfer

        root, target = _repo_and_target(_data_spec(recipe, overrides))
        console.print(f"pull {target}: {transfer(root, 'pull', [target], remote)}", highlight=False)

    @data_app.command("versions")
    def versions_cmd(recipe: str = RECIPE, overrides: list[str] = OVERRIDES) -> None:
        """List the dataset's versions: git revisions where DVC recorded a new content hash."""
        from scalelab.data.versioning import list_versions

        spec = _data_spec(recipe, overrides)
        console.print(
            f"versions of {spec.name} (newest first): rev, date, DVC content hash, commit", highlight=False
        )
        for v in list_versions(spec):
            console.print(
                f"{v['rev'][:10]:<10}  {v['date'][:19]:<19}  {v['content_hash']}  {v['subject'][:50]}",
                highlight=False,
                soft_wrap=True,
            )

    @data_app.command("verify")
    def verify_cmd(recipe: str = RECIPE, overrides: list[str] = OVERRIDES) -> None:
        """Recompute checksums of the prepared data against metadata.json and dvc.lock."""
        from scalelab.data.versioning import verify_prepared

        report = verify_prepared(_data_spec(recipe, overrides))
        if not report["ok"]:
            raise DataError("verification failed: " + "; ".join(report["problems"]))
        where = f"matches {report['recorded_in']}" if report["recorded"] else "not tracked by DVC"
        console.print(
            f"[green]ok[/] {report['path']}: md5 {report['content_hash']} ({where})", highlight=False
        )

    @data_app.command("remote")
    def remote_cmd(
        name: str = typer.Argument(..., help="Remote name, e.g. storage."),
        url: str = typer.Argument(..., help="s3://bucket/prefix, or a folder for a local remote."),
        endpoint_url: str = typer.Option(
            None, "--endpoint-url", help="S3-compatible endpoint (MinIO, moto)."
        ),
        profile: str = typer.Option(None, "--profile", help="AWS profile to take credentials from."),
        default: bool = typer.Option(True, "--default/--no-default", help="Make it the default remote."),
        local: bool = typer.Option(False, "--local", help="Write to git-ignored .dvc/config.local."),
        check: bool = typer.Option(True, "--check/--no-check", help="Check the endpoint and bucket answer."),
    ) -> None:
        """Add (or replace) a DVC remote. Credentials stay in the AWS env/profile, never in the config."""
        from scalelab.data.remote import RemoteSettings, check_remote, configure_remote
        from scalelab.data.versioning import find_dvc_root

        root = find_dvc_root(Path.cwd())
        if root is None:
            raise DataError("not inside a DVC repository; run `dvc init` first")
        if check:  # before writing anything: a wrong endpoint or bucket leaves the config untouched
            check_remote(RemoteSettings(name, url, endpoint_url, profile))
        configure_remote(root, name, url, endpoint_url, profile, default, local)
        console.print(
            f"remote {name} -> {url}{' via ' + endpoint_url if endpoint_url else ''}"
            f"{' (default)' if default else ''}",
            highlight=False,
        )
