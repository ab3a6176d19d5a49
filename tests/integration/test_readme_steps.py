"""The README's "Bring your own images" steps, run as written in a fresh git + DVC folder (only the
placeholder /path/to/root becomes a folder of generated images, and 30 epochs become 2): the run
records a data version with a git revision, and the restore command a refusal suggests works."""

from __future__ import annotations

import re
import shlex
import sqlite3
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def write_images(root: Path, per_class: int = 100) -> None:
    """Two classes a model tells apart in a few epochs: bright left half vs bright right half."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, side in (("left", 0), ("right", 1)):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (12, 12), dtype=np.uint8)
            img[:, side * 6 : side * 6 + 6] += 180
            Image.fromarray(img).save(root / label / f"{i}.png")


def test_bring_your_own_images_as_written(dvc_repo: Path, sh, tmp_path: Path):
    images = tmp_path / "images"
    write_images(images)
    sh("dvc", "remote", "add", "-d", "local", str(tmp_path / "dvc-remote"))
    (dvc_repo / ".gitignore").write_text((REPO / ".gitignore").read_text())  # as in a clone
    sh("git", "add", ".dvc", ".gitignore")
    sh("git", "commit", "-qm", "dvc init")
    (dvc_repo / "pipelines").mkdir()
    block = readme_block("Bring your own images")
    assert "git commit" in block and "data/.gitignore" in block
    # the two values a reader adapts: where the images are, and (for a test's budget) the epochs
    assert "/path/to/root" in block and "epochs: 30" in block
    script = block.replace("/path/to/root", str(images)).replace("epochs: 30", "epochs: 2")
    out = sh("bash", "-euo", "pipefail", "-c", script, timeout=900)
    text = out.stdout + out.stderr
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", text).group(1)
    assert f"scalelab ui --run {run_id}" in text
    assert sh("git", "status", "--porcelain").stdout.strip() == ""  # nothing left uncommitted

    head = sh("git", "rev-parse", "HEAD").stdout.strip()
    recorded = re.search(r"md5: (\S+)", (dvc_repo / "data/mine.dvc").read_text()).group(1)
    with sqlite3.connect(dvc_repo / ".scalelab" / "mlflow.db") as db:
        tags = dict(db.execute("select key, value from tags where run_uuid = ?", (run_id,)).fetchall())
    assert tags["data.rev"] == head  # the commit the README's steps made
    assert tags["data.hash"] == recorded and tags["data.remote"] == str(tmp_path / "dvc-remote")
    assert tags["data.status"] == "versioned"

    # changed data is refused, and the command the refusal suggests restores it as printed
    from scalelab.config import load_recipe
    from scalelab.data.versioning import resolve_data_version
    from scalelab.errors import DataError

    victim = next(p for p in (dvc_repo / "data/mine").iterdir() if p.suffix == ".npz")
    victim.write_bytes(victim.read_bytes()[:-4] + b"\x00\x01\x02\x03")
    spec = load_recipe("pipelines/mine.yaml").data
    with pytest.raises(DataError) as refused:
        resolve_data_version(spec)
    command = re.search(r"Run `([^`]+)` to restore", str(refused.value)).group(1)
    sh(*shlex.split(command))
    assert resolve_data_version(spec).content_hash == recorded
