"""`scalelab models variants` figures: computed by torch once, then read from a cache without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scalelab.models import count_flops, count_params, create_model, list_models, summary


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("xdg-cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(home)
    summary.variant_counts(in_chans=1, image_size=16, num_classes=10)  # computes and writes the cache
    yield home
    if old is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = old


def test_counts_are_torch_counts_and_cached(cache_home: Path) -> None:
    files = list((cache_home / "scalelab").glob("variants-*.json"))
    assert len(files) == 1
    counts = json.loads(files[0].read_text())
    assert set(counts) == set(list_models())
    model = create_model("msresnet_tiny", in_chans=1, num_classes=10, image_size=16)
    assert counts["msresnet_tiny"] == {"params": count_params(model), "flops": count_flops(model, 1, 16)}


def test_cached_figures_are_read_not_recomputed(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compute(*args: object) -> None:
        raise AssertionError("computed although the cache matches")

    monkeypatch.setattr(summary, "_count", no_compute)
    rows = summary.variant_rows("msresnet_t*", in_chans=1, image_size=16, num_classes=10)
    assert [row["name"] for row in rows] == ["msresnet_tiny"]
    assert rows[0]["scales"] == 4 and rows[0]["params"] > 0 and rows[0]["flops"] > 0


def test_another_input_size_or_a_damaged_cache_computes_afresh(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert summary.cache_key(1, 16, 10) != summary.cache_key(1, 32, 10)
    assert summary.cache_key(1, 16, 10) != summary.cache_key(3, 16, 10)
    path = cache_home / "scalelab" / f"variants-{summary.cache_key(1, 16, 10)}.json"
    good = path.read_text()
    path.write_text("{not json")
    calls = []
    monkeypatch.setattr(summary, "_count", lambda *args: calls.append(args) or json.loads(good))
    assert summary.variant_counts(1, 16, 10) == json.loads(good)
    assert calls == [(1, 16, 10)]
    assert json.loads(path.read_text()) == json.loads(good)  # rewritten whole


def test_a_source_edit_changes_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "scalelab"
    (package / "models").mkdir(parents=True)
    (package / "models" / "blocks.py").write_text("WIDTH = 1\n")
    monkeypatch.setattr(summary, "PACKAGE_DIR", package)
    before = summary.cache_key(1, 28, 10)
    (package / "models" / "blocks.py").write_text("WIDTH = 2\n")
    assert summary.cache_key(1, 28, 10) != before


def test_listing_from_the_cache_imports_no_torch(cache_home: Path) -> None:
    code = (
        "import sys; from scalelab.models.summary import variant_rows; "
        "rows = variant_rows(in_chans=1, image_size=16, num_classes=10); "
        "print(len(rows), 'torch' in sys.modules)"
    )
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_home))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(len(list_models())), "False"]
