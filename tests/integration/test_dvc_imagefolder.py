"""A user's own images: generated PNGs of several sizes, RGB and grayscale, one corrupt file,
prepared with the real `scalelab` command and tracked with `dvc add` -- whose hash must equal
the one scalelab computes and records as the data version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from scalelab.config.specs import DataSpec
from scalelab.data import load_dataset
from scalelab.data.versioning import dvc_dir_hash

pytestmark = pytest.mark.integration
SIZES = [(24, 24), (32, 20), (20, 40), (24, 24), (48, 48)]


def generate_images(root: Path) -> int:
    rng = np.random.default_rng(0)
    count = 0
    for c, cls in enumerate(("circle", "square", "stripe")):
        for i in range(10):
            w, h = SIZES[i % len(SIZES)]
            pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8) + np.uint8(60 * c)
            img = Image.fromarray(pixels, "RGB")
            img = img.convert("L") if i % 3 == 0 else img  # a third grayscale
            (root / cls).mkdir(parents=True, exist_ok=True)
            img.save(root / cls / f"img{i:02d}.png")
            count += 1
    (root / "square" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return count


def write_recipe(path: Path, **data) -> None:
    base = {
        "name": "pets",
        "kind": "imagefolder",
        "source": "images",
        "val_fraction": 0.1,
        "test_fraction": 0.2,
    }
    path.write_text(yaml.safe_dump({"name": "pets", "data": {**base, **data}}))


def test_imagefolder_prepares_and_is_versioned_by_dvc(dvc_repo: Path, sh):
    good = generate_images(dvc_repo / "images")

    write_recipe(dvc_repo / "strict.yaml")
    strict = sh("scalelab", "data", "prepare", "strict.yaml", check=False)
    assert strict.returncode == 2 and "square/corrupt.png" in strict.stderr.replace("\n", "")
    assert not (dvc_repo / "data" / "pets").exists()  # nothing half-written

    write_recipe(dvc_repo / "recipe.yaml", on_bad_file="skip", image_size=28)
    out = sh("scalelab", "data", "prepare", "recipe.yaml")
    assert "skipped 1 unreadable file(s): square/corrupt.png" in out.stdout.replace("\n", " ")

    meta = json.loads((dvc_repo / "data/pets/metadata.json").read_text())
    assert meta["classes"] == ["circle", "square", "stripe"]
    assert meta["shape"] == [28, 28, 3]  # colour wins over the grayscale third, every size made 28x28
    assert sum(meta["split_sizes"].values()) == good
    assert meta["source"]["skipped"] == ["square/corrupt.png"]

    sh("dvc", "add", "-q", "data/pets")
    recorded = yaml.safe_load((dvc_repo / "data/pets.dvc").read_text())["outs"][0]["md5"]
    assert recorded == dvc_dir_hash(dvc_repo / "data/pets")  # our hash is DVC's hash
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "pets v1")
    ds = load_dataset(DataSpec(name="pets", kind="imagefolder", source="images"))
    assert ds.version.content_hash == recorded and ds.version.path == "data/pets"
    assert ds.version.rev == sh("git", "rev-parse", "HEAD").stdout.strip()
    assert ds.splits["train"].x.dtype == np.uint8 and ds.hflip_ok
