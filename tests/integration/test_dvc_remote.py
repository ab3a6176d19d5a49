"""Prepared data through a real DVC S3 remote on moto's server: push, lose everything, pull back.

Also the failure modes: an unreachable endpoint and a missing bucket fail before DVC runs, naming
both, and leave the workspace as it was.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scalelab.cli import app
from scalelab.cluster.services import free_port
from scalelab.config.specs import DataSpec
from scalelab.data import prepare
from scalelab.data.remote import RemoteSettings, check_remote
from scalelab.data.versioning import dvc_dir_hash, resolve_data_version
from scalelab.errors import DataError

pytestmark = pytest.mark.integration
runner = CliRunner()
RECIPE = "name: digits\ndata: {name: digits, kind: digits}\n"


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def cli(*args: str):
    result = runner.invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def tracked_digits(sh, repo: Path) -> Path:
    (repo / "recipe.yaml").write_text(RECIPE)
    path = prepare(DataSpec(name="digits", kind="digits"))
    sh("dvc", "add", "-q", "data/digits")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "digits v1")
    return path


def test_push_wipe_pull_gives_identical_bytes(dvc_repo: Path, sh, s3_server, s3_bucket):
    import boto3

    data = tracked_digits(sh, dvc_repo)
    before = file_digests(data)
    cli("data", "remote", "s3", f"s3://{s3_bucket}/dvc", "--endpoint-url", s3_server.url, "--local")
    tracked_config = (dvc_repo / ".dvc" / "config").read_text()
    assert s3_server.url not in tracked_config  # loopback endpoint kept in git-ignored config.local
    for secret in ("access_key", "secret", "testing"):  # credentials only from the environment
        assert secret not in tracked_config
        assert secret not in (dvc_repo / ".dvc" / "config.local").read_text()

    cli("data", "push", "recipe.yaml")
    keys = (
        boto3.client("s3", endpoint_url=s3_server.url).list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    )
    assert len(keys) == 5  # 4 files + the .dir manifest

    shutil.rmtree(data)
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    cli("data", "pull", "recipe.yaml")
    assert file_digests(data) == before

    version = resolve_data_version(DataSpec(name="digits", kind="digits"))
    assert version.remote == f"s3://{s3_bucket}/dvc" and version.content_hash == dvc_dir_hash(data)
    assert version.rev == sh("git", "rev-parse", "HEAD").stdout.strip()


def test_unreachable_endpoint_names_endpoint_and_bucket(dvc_repo: Path, sh):
    data = tracked_digits(sh, dvc_repo)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DataError, match=rf"{dead}.*bucket 'nowhere'.*unreachable"):
        check_remote(RemoteSettings("s3", "s3://nowhere/dvc", endpoint_url=dead), timeout=2)

    sh("dvc", "remote", "add", "--local", "-d", "s3", "s3://nowhere/dvc")
    sh("dvc", "remote", "modify", "--local", "s3", "endpointurl", dead)
    shutil.rmtree(data)
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    result = runner.invoke(app, ["data", "pull", "recipe.yaml"])
    assert isinstance(result.exception, DataError)
    assert dead in str(result.exception) and "nowhere" in str(result.exception)
    assert not data.exists() and not (dvc_repo / ".dvc" / "cache").exists()  # nothing half-written


def test_missing_bucket_is_named_and_config_untouched(dvc_repo: Path, sh, s3_server):
    tracked_digits(sh, dvc_repo)
    config = (dvc_repo / ".dvc" / "config").read_text()
    result = runner.invoke(
        app, ["data", "remote", "s3", "s3://no-such-bucket/dvc", "--endpoint-url", s3_server.url]
    )
    assert isinstance(result.exception, DataError)
    message = str(result.exception)
    assert "no-such-bucket" in message and s3_server.url in message and "does not exist" in message
    assert (dvc_repo / ".dvc" / "config").read_text() == config  # checked before anything was written

    sh("dvc", "remote", "add", "--local", "-d", "s3", "s3://no-such-bucket/dvc")
    sh("dvc", "remote", "modify", "--local", "s3", "endpointurl", s3_server.url)
    result = runner.invoke(app, ["data", "push", "recipe.yaml"])
    assert isinstance(result.exception, DataError) and "no-such-bucket" in str(result.exception)
