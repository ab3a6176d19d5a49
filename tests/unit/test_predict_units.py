"""Batch prediction without Ray: model references, pool sizing, source listing, one replica's batch,
the Parquet output (all or nothing)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from toy_bundle import CLASSES, save_toy_bundle

from scalelab.artifacts.predictor import Predictor
from scalelab.errors import ConfigError, DataError
from scalelab.models import create_model
from scalelab.predict.batch import ParquetOutput, parse_model_ref, plan_pool
from scalelab.predict.replica import PredictReplica
from scalelab.predict.sources import Source, label_layout, list_folder, resolve_source, s3_endpoint


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("msresnet_tiny", in_chans=1, num_classes=3, image_size=8).eval()
    return save_toy_bundle(model, tmp_path / "bundle")


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_model_references(bundle: Path):
    assert parse_model_ref("digits").alias == "champion"
    assert parse_model_ref("digits@staging").alias == "staging"
    assert parse_model_ref("digits:3").version == "3" and parse_model_ref("digits/3").version == "3"
    assert parse_model_ref(str(bundle)).bundle == bundle.resolve()
    for bad in ("digits:x", "@champion", "digits@", ":3"):
        with pytest.raises(ConfigError, match="bad model reference"):
            parse_model_ref(bad)
    with pytest.raises(ConfigError, match="not a model bundle"):
        parse_model_ref(str(bundle.parent))


def test_pool_is_sized_to_the_cluster():
    assert plan_pool({"CPU": 2}) == plan_pool({"CPU": 2.0}, None, 2, 256)
    assert plan_pool({"CPU": 16}).replicas == 4 and plan_pool({"CPU": 16}).threads == 4
    gpu = plan_pool({"CPU": 16, "GPU": 2})
    assert (gpu.replicas, gpu.gpus_per_replica, gpu.threads) == (2, 1, 4)
    assert plan_pool({"CPU": 4}, replicas=2, threads=1, batch_size=32).batch_size == 32
    with pytest.raises(ConfigError, match="need 8 CPUs; the Ray cluster has 4"):
        plan_pool({"CPU": 4}, replicas=2, threads=4)
    with pytest.raises(ConfigError, match="GPU"):
        plan_pool({"CPU": 16, "GPU": 1}, replicas=2)


def test_labels_come_from_an_imagefolder_layout_only():
    assert label_layout(["cat/1.png", "dog/2.png"]) == ["cat", "dog"]
    assert label_layout(["1.png", "2.png"]) == [None, None]
    assert label_layout(["cat/1.png", "cat/2.png"]) == [None, None]  # one class: not a labelling
    assert label_layout(["cat/1.png", "x/y/2.png"]) == [None, None]


def test_folder_listing_and_clear_errors(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "b").mkdir()
    (tmp_path / "imgs" / "a" / "1.png").write_bytes(b"x")
    (tmp_path / "imgs" / "b" / "2.JPG").write_bytes(b"x")
    (tmp_path / "imgs" / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / ".hidden").mkdir()
    (tmp_path / "imgs" / ".hidden" / "3.png").write_bytes(b"x")
    src = resolve_source("imgs")
    assert (src.kind, src.files, src.labels) == ("folder", ["a/1.png", "b/2.JPG"], ["a", "b"])
    assert src.locations[0] == str((tmp_path / "imgs" / "a" / "1.png").resolve())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        list_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="neither a folder"):
        resolve_source("nowhere")
    with pytest.raises(DataError, match="is a file"):
        resolve_source("imgs/a/1.png")


def test_s3_endpoint_precedence(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    assert s3_endpoint("b") is None  # no stack, no DVC remote: AWS itself
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert s3_endpoint("b") == "http://127.0.0.1:1"
    assert s3_endpoint("b", "http://127.0.0.1:2") == "http://127.0.0.1:2"


def test_a_replica_scores_a_batch_and_turns_bad_files_into_rows(bundle: Path, tmp_path: Path):
    files = {name: (bundle / name).read_bytes() for name in ("model.json", "model.safetensors")}
    replica = PredictReplica(files, {"name": "t", "version": "1"}, top_k=2, threads=1, max_pixels=10_000)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png(img))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\ncut")
    paths += [tmp_path / "bad.png", tmp_path / "gone.png"]
    names = np.array([p.name for p in paths], dtype=object)
    out = replica(
        {
            "file": names,
            "location": np.array([str(p) for p in paths], dtype=object),
            "label": np.array([""] * 5),
        }
    )
    assert list(out["file"]) == list(names)
    assert [bool(e) for e in out["error"]] == [False, False, False, True, True]
    assert "bad.png: truncated or corrupt" in out["error"][3] and "gone.png: cannot read" in out["error"][4]
    assert (out["top_index"][3:] == -1).all() and np.isnan(out["top_score"][3:]).all()
    probs = Predictor.from_bundle(bundle).predict_proba(images[..., None])  # what the server computes
    assert (out["top_index"][:3, 0] == probs.argmax(1)).all()
    assert np.allclose(out["top_score"][:3, 0], probs.max(1), atol=1e-6)
    assert (out["top_score"][:3, 0] >= out["top_score"][:3, 1]).all()
    # a dataset split: arrays in, the index passed through; another size goes through the server's resize
    big = np.repeat(np.repeat(images[..., None], 2, axis=1), 2, axis=2)  # (3, 16, 16, 1)
    out = replica({"index": np.arange(3), "label": np.array(["a", "b", "c"]), "image": big})
    assert list(out["index"]) == [0, 1, 2] and not any(out["error"])


def test_parquet_output_is_all_or_nothing(tmp_path: Path):
    info = {"name": "m", "version": "2"}
    src = Source(kind="folder", where="imgs", files=["a/1.png"], labels=["a"])
    out = tmp_path / "preds.parquet"
    writer = ParquetOutput(str(out), info, src, {"weights_sha256": "abc"})
    rows = {
        "file": np.array(["a/1.png", "b/2.png"], dtype=object),
        "label": np.array(["a", ""], dtype=object),
        "top_index": np.array([[0, 2], [1, 0]]),
        "top_score": np.array([[0.7, 0.2], [0.6, 0.3]], dtype=np.float32),
    }
    writer.write(rows, np.array([0, -1]), CLASSES)
    assert not out.exists()  # written only when the run succeeded
    writer.close()
    table = pq.read_table(out)
    assert table.column("prediction").to_pylist() == ["a", "b"]
    assert table.column("top_k_classes").to_pylist() == [["a", "c"], ["b", "a"]]
    assert table.column("label").to_pylist() == ["a", None] and table.column("label_index").to_pylist() == [
        0,
        None,
    ]
    assert table.column("model_version").to_pylist() == ["2", "2"]
    assert table.schema.metadata[b"scalelab.weights_sha256"] == b"abc"
    failed = ParquetOutput(str(tmp_path / "failed.parquet"), info, src, {})
    failed.write(rows, np.array([0, -1]), CLASSES)
    failed.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.parquet"]  # no temp file left


def test_a_bad_option_fails_before_anything_starts(tmp_path: Path, monkeypatch):
    from scalelab.predict.commands import predict_command

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--on-bad-file 'maybe': use skip"):
        predict_command("digits", "nowhere", on_bad_file="maybe", quiet=True)
