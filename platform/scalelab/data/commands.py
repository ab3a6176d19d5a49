"""``scalelab data``: prepare, push, pull, versions, verify, remote.

Each verb runs in the recipe's project (:mod:`scalelab.config.project`), whatever the current
folder, and returns what it made or found (paths absolute).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from scalelab.config.project import absolute, in_project, shown
from scalelab.errors import DataError

console = Console()

Recipe = Annotated[
    Path, typer.Argument(help="Recipe YAML whose data section to use, e.g. pipelines/digits.yaml.")
]
Overrides = Annotated[list[str] | None, typer.Argument(help="Dotted overrides, e.g. data.split_seed=1.")]
Remote = Annotated[
    str | None, typer.Option("--remote", "-r", help="DVC remote (default: the repo's default).")
]


def _data_spec(recipe: Path, overrides: list[str] | None):
    from scalelab.config import load_recipe

    return load_recipe(recipe, overrides or []).data


def _repo_and_target(spec) -> tuple[Path, str]:
    from scalelab.data.versioning import find_dvc_root

    prepared = Path(spec.data_dir) / spec.name
    root = find_dvc_root(prepared if prepared.exists() else Path(spec.data_dir))
    if root is None:
        raise DataError(f"{prepared} is not inside a DVC repository; run `dvc init` at the project root")
    return root, (prepared.resolve()).relative_to(root).as_posix()


def prepare(recipe: Recipe, overrides: Overrides = None, *, quiet: bool = False) -> Path:
    """Materialise the recipe's dataset into data_dir/name in the canonical form."""
    from scalelab.data import prepare as prepare_dataset
    from scalelab.data.versioning import dvc_dir_hash, read_any

    with in_project(absolute(recipe)):
        path = absolute(prepare_dataset(_data_spec(absolute(recipe), overrides)))
    if quiet:
        return path
    ds = read_any(path, verify=False)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in ds.splits.items())
    meta = getattr(ds, "meta", None)
    form = (
        f"{sum(len(s) for s in meta['shards'].values())} Parquet shards ({meta['format_reason']})"
        if meta
        else "arrays (memory)"
    )
    console.print(
        f"prepared {ds.name} -> {shown(path)}: {sizes}; {ds.num_classes} classes, "
        f"{ds.image_size}x{ds.image_size}x{ds.channels}; {form}; md5 {dvc_dir_hash(path)}",
        highlight=False,
    )
    if ds.source_report.get("skipped_count"):
        skipped = ds.source_report["skipped"]
        console.print(
            f"[yellow]skipped {len(skipped)} unreadable file(s):[/] {', '.join(skipped[:10])}"
            f"{' ...' if len(skipped) > 10 else ''}",
            highlight=False,
        )
    return path


def _transfer(
    direction: str, recipe: Path, overrides: list[str] | None, remote: str | None, quiet: bool = False
) -> str:
    from scalelab.data.remote import transfer

    with in_project(absolute(recipe)):
        root, target = _repo_and_target(_data_spec(absolute(recipe), overrides))
        summary = transfer(root, direction, [target], remote)
    if not quiet:
        console.print(f"{direction} {target}: {summary}", highlight=False)
    return summary


def push(recipe: Recipe, overrides: Overrides = None, remote: Remote = None, *, quiet: bool = False) -> str:
    """`dvc push` the prepared dataset, after checking the remote (endpoint, bucket) answers."""
    return _transfer("push", recipe, overrides, remote, quiet)


def pull(recipe: Recipe, overrides: Overrides = None, remote: Remote = None) -> str:
    """`dvc pull` the dataset version recorded in dvc.lock (on the driver, never per worker)."""
    return _transfer("pull", recipe, overrides, remote)


def versions(recipe: Recipe, overrides: Overrides = None) -> list[dict[str, Any]]:
    """List the dataset's versions: git revisions where DVC recorded a new content hash."""
    from scalelab.data.versioning import list_versions

    with in_project(absolute(recipe)):
        spec = _data_spec(absolute(recipe), overrides)
        found = list_versions(spec)
    console.print(
        f"versions of {spec.name} (newest first): rev, date, DVC content hash, commit", highlight=False
    )
    for v in found:
        console.print(
            f"{v['rev'][:10]:<10}  {v['date'][:19]:<19}  {v['content_hash']}  {v['subject'][:50]}",
            highlight=False,
            soft_wrap=True,
        )
    return found


def verify(recipe: Recipe, overrides: Overrides = None) -> dict[str, Any]:
    """Recompute checksums of the prepared data against metadata.json and dvc.lock."""
    from scalelab.data.versioning import verify_prepared

    with in_project(absolute(recipe)):
        report = verify_prepared(_data_spec(absolute(recipe), overrides))
    if not report["ok"]:
        raise DataError("verification failed: " + "; ".join(report["problems"]))
    where = f"matches {report['recorded_in']}" if report["recorded"] else "not tracked by DVC"
    console.print(f"[green]ok[/] {report['path']}: md5 {report['content_hash']} ({where})", highlight=False)
    return report


def remote(
    name: Annotated[str, typer.Argument(help="Remote name, e.g. storage.")],
    url: Annotated[str, typer.Argument(help="s3://bucket/prefix, or a folder for a local remote.")],
    endpoint_url: Annotated[
        str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint (MinIO, moto).")
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="AWS profile to take credentials from.")
    ] = None,
    default: Annotated[
        bool, typer.Option("--default/--no-default", help="Make it the default remote.")
    ] = True,
    local: Annotated[bool, typer.Option("--local", help="Write to git-ignored .dvc/config.local.")] = False,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Check the endpoint and bucket answer.")
    ] = True,
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
