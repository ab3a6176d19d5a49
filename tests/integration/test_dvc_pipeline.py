"""The project's own dvc.yaml from a fresh clone: `dvc repro` runs prepare -> train -> evaluate,
records the data version in the model, and reruns only what a change touches.

The clone is the project's tracked + unignored files copied into a new git repository (a shorter
digits recipe: tiny model, one epoch, no tracking server), so the main repository is never touched.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
NEEDED = (
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
    ".dvc/config",
    ".dvc/.gitignore",
    ".gitignore",
    "data/.gitignore",
    "pipelines/",
    "platform/",
)


def project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [f for f in listed if f.startswith(NEEDED) and (REPO / f).is_file()]


@pytest.fixture()
def clone(tmp_path: Path, monkeypatch, sh) -> Path:
    dest = tmp_path / "clone"
    for rel in project_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    recipe = dest / "pipelines/digits.yaml"
    spec = yaml.safe_load(recipe.read_text())
    spec["model"] = {"variant": "msresnet_tiny"}
    spec["train"].update(epochs=1, threads=1)
    spec["tracking"] = {"enabled": False}
    recipe.write_text(yaml.safe_dump(spec, sort_keys=False))
    monkeypatch.chdir(dest)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "fresh clone")
    return dest


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def test_repro_from_a_fresh_clone_and_only_what_changed(clone: Path, sh):
    first = sh("dvc", "repro")
    assert ran(first.stdout) == ["prepare", "train", "evaluate"], first.stdout

    params = yaml.safe_load((clone / "params.yaml").read_text())
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    data_hash = lock["prepare"]["outs"][0]["md5"]
    metrics = json.loads((clone / params["metrics"]).read_text())
    assert 0 <= metrics["test_acc"] <= 1 and metrics["data_version"]["content_hash"] == data_hash
    bundle = clone / params["output_dir"] / params["run_name"] / "model" / "model.json"
    assert json.loads(bundle.read_text())["data_version"]["content_hash"] == data_hash  # training saw it
    assert "data/digits" not in sh("git", "status", "--porcelain", "--ignored=no").stdout  # DVC's, not git's

    assert ran(sh("dvc", "repro").stdout) == []  # nothing changed, nothing runs

    recipe = clone / "pipelines/digits.yaml"
    recipe.write_text(recipe.read_text().replace("epochs: 1", "epochs: 2"))
    stale = json.loads(sh("dvc", "status", "--json").stdout)
    assert list(stale) == ["train"]  # prepare untouched; evaluate follows once train reruns
    assert "pipelines/digits.yaml" in stale["train"][0]["changed deps"]
