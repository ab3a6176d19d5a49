"""Two dataset versions on two git revisions, produced by a real `dvc repro` of a prepare stage.

Each revision resolves to the hash DVC recorded there, and reading it yields that version's data:
from the DVC cache, then -- with the cache gone -- from the S3 remote, never through `dvc pull`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from scalelab.cli import app
from scalelab.config.specs import DataSpec
from scalelab.data import load_dataset, read_prepared
from scalelab.data.versioning import (
    CACHE_DIR,
    dvc_dir_hash,
    list_versions,
    load_data_version,
    resolve_data_version,
)

pytestmark = pytest.mark.integration

DVC_YAML = """\
stages:
  prepare:
    cmd: scalelab data prepare recipe.yaml
    params:
      - recipe.yaml:
          - data
    outs:
      - data/digits
"""


def recipe(seed: int) -> str:
    return f"name: digits\ndata:\n  name: digits\n  kind: digits\n  split_seed: {seed}\n"


def commit_version(sh, repo: Path, seed: int) -> tuple[str, str, np.ndarray]:
    (repo / "recipe.yaml").write_text(recipe(seed))
    sh("dvc", "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", f"digits split_seed={seed}")
    rev = sh("git", "rev-parse", "HEAD").stdout.strip()
    return rev, dvc_dir_hash(repo / "data/digits"), read_prepared(repo / "data/digits").splits["test"].y


def test_two_revisions_resolve_to_their_own_hash_and_data(dvc_repo: Path, sh, s3_server, s3_bucket):
    (dvc_repo / "dvc.yaml").write_text(DVC_YAML)
    rev1, hash1, y1 = commit_version(sh, dvc_repo, seed=0)
    rev2, hash2, y2 = commit_version(sh, dvc_repo, seed=1)
    assert hash1 != hash2 and not np.array_equal(y1, y2)
    spec = DataSpec(name="digits", kind="digits")

    v1, v2 = resolve_data_version(spec, rev=rev1), resolve_data_version(spec, rev=rev2[:8])
    assert (v1.rev, v1.content_hash) == (rev1, hash1)
    assert (v2.rev, v2.content_hash) == (rev2, hash2)
    current = load_dataset(spec).version  # the workspace is at rev2, committed: same version
    assert current == v2

    old = load_data_version(v1)  # local copy is v2: v1 comes out of the DVC cache at rev1
    assert old.version == v1 and np.array_equal(old.splits["test"].y, y1)
    assert (CACHE_DIR / hash1 / "metadata.json").is_file()

    # Cache gone: the same version is read from the S3 remote through DVCFileSystem.
    sh("dvc", "remote", "add", "-d", "--local", "s3", f"s3://{s3_bucket}/dvc")
    sh("dvc", "remote", "modify", "--local", "s3", "endpointurl", s3_server.url)
    sh("dvc", "push", "-q", "--all-commits")
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    shutil.rmtree(CACHE_DIR)
    again = load_data_version(v1)
    assert np.array_equal(again.splits["test"].y, y1) and dvc_dir_hash(CACHE_DIR / hash1) == hash1

    versions = list_versions(spec)
    assert [(v["rev"], v["content_hash"]) for v in versions] == [(rev2, hash2), (rev1, hash1)]
    out = CliRunner().invoke(app, ["data", "versions", "recipe.yaml"])
    assert out.exit_code == 0 and hash1 in out.output and rev2[:10] in out.output

    # A new version recorded in dvc.lock but not committed: no revision pins it yet.
    (dvc_repo / "recipe.yaml").write_text(recipe(5))
    sh("dvc", "repro", "-q")
    version = resolve_data_version(spec)
    assert version.rev is None and version.content_hash == dvc_dir_hash(dvc_repo / "data/digits")
    assert list_versions(spec)[0]["rev"] == "workspace"
