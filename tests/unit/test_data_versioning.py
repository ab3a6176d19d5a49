"""Data versions without a DVC process: deterministic prepared bytes, DVC's hash, the dvc.lock guard.

A DVC repository is faked with an empty ``.dvc/`` folder and a hand-written ``dvc.lock``; the
integration tests check the same hash against real DVC.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from scalelab.config.specs import DataSpec
from scalelab.data import load_dataset, prepare, read_prepared
from scalelab.data.dataset import stratified_split
from scalelab.data.versioning import dvc_dir_hash, load_data_version, resolve_data_version, verify_prepared
from scalelab.errors import DataError


def digits(**kw) -> DataSpec:
    return DataSpec(name="digits", kind="digits", **kw)


def fake_dvc_repo(root: Path, relpath: str, md5: str) -> None:
    (root / ".dvc").mkdir(exist_ok=True)
    lock = {
        "schema": "2.0",
        "stages": {
            "prepare": {
                "cmd": "scalelab data prepare r.yaml",
                "outs": [{"path": relpath, "hash": "md5", "md5": md5}],
            }
        },
    }
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))


def test_prepare_is_byte_deterministic(workdir: Path):
    first = dvc_dir_hash(prepare(digits()))
    assert dvc_dir_hash(prepare(digits())) == first  # same data, same DVC hash (no zip timestamps)
    assert dvc_dir_hash(prepare(digits(split_seed=1))) != first
    assert first.endswith(".dir") and len(first) == 36


def test_split_determinism_and_stratification(workdir: Path):
    a = read_prepared(prepare(digits(split_seed=3)))
    b = read_prepared(prepare(digits(split_seed=3)))
    for name in ("train", "val", "test"):
        assert np.array_equal(a.splits[name].y, b.splits[name].y)
        assert np.array_equal(a.splits[name].x, b.splits[name].x)
    y = np.repeat(np.arange(4), 50)
    parts = stratified_split(y, (0.2, 0.1), seed=0)
    assert [len(p) for p in parts] == [40, 20, 140]
    assert all(np.bincount(y[p]).tolist() == [len(p) // 4] * 4 for p in parts)  # per-class proportions
    assert not set(parts[0]) & set(parts[1]) and not set(parts[1]) & set(parts[2])
    assert not np.array_equal(stratified_split(y, (0.2,), seed=1)[0], parts[0])


def test_untracked_dataset_gets_a_content_hash_version(workdir: Path):
    ds = load_dataset(digits())
    assert ds.version is not None and ds.version.name == "digits"
    assert ds.version.content_hash == dvc_dir_hash(workdir / "data" / "digits")
    assert ds.version.rev is None
    assert ds.version.as_tags()["data.hash"] == ds.version.content_hash


def test_version_recorded_in_dvc_lock(workdir: Path):
    path = prepare(digits())
    fake_dvc_repo(workdir, "data/digits", dvc_dir_hash(path))
    version = resolve_data_version(digits())
    assert version.path == "data/digits" and version.repo == str(workdir.resolve())
    assert version.rev is None  # not a git repository: no revision records it
    assert load_dataset(digits()).version == version


def test_reprepared_data_that_no_longer_matches_dvc_lock_is_refused(workdir: Path):
    fake_dvc_repo(workdir, "data/digits", dvc_dir_hash(prepare(digits())))
    prepare(digits(split_seed=1))  # different data, consistent checksums, but not what DVC recorded
    with pytest.raises(
        DataError,
        match=r"no longer matches dvc\.lock.*dvc checkout --force --relink data/digits.*data prepare",
    ):
        load_dataset(digits())
    report = verify_prepared(digits())
    assert not report["ok"] and "dvc.lock records" in report["problems"][0]


def test_tampered_file_is_refused(workdir: Path):
    path = prepare(digits())
    fake_dvc_repo(workdir, "data/digits", dvc_dir_hash(path))
    with open(path / "val.npz", "r+b") as f:  # flip one byte inside the pixel payload
        f.seek(-20, 2)
        byte = f.read(1)
        f.seek(-20, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DataError, match="dvc checkout"):
        load_dataset(digits())
    report = verify_prepared(digits())
    assert not report["ok"] and any("val.npz" in p for p in report["problems"])


def test_missing_prepared_data_without_auto_prepare(workdir: Path):
    with pytest.raises(DataError, match="scalelab data prepare"):
        load_dataset(digits(), prepare_if_missing=False)


def test_metadata_records_shape_stats_and_checksums(workdir: Path):
    meta = json.loads((prepare(digits()) / "metadata.json").read_text())
    assert meta["shape"] == [8, 8, 1] and meta["hflip_ok"] is False and meta["num_classes"] == 10
    assert set(meta["checksums"]) == {"train.npz", "val.npz", "test.npz"}
    assert sum(meta["split_sizes"].values()) == 1797


def test_load_data_version_reads_matching_local_copy(workdir: Path):
    version = load_dataset(digits()).version
    again = load_data_version(version, local="data/digits")
    assert again.version == version and len(again.splits["train"]) > 0


def test_load_data_version_refuses_without_a_source(workdir: Path):
    version = load_dataset(digits()).version
    prepare(digits(split_seed=2))  # local copy is now a different version; no DVC repo to fetch from
    with pytest.raises(DataError, match="no DVC repository"):
        load_data_version(version, local="data/digits")
