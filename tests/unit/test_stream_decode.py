"""The streamed classification decode path, without Ray: shards keep source files that need no
change byte for byte, and the fast uint8 decode + augment gives exactly the float path's batches."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scalelab.artifacts.preprocess import normalise_tensor, pixel_scale
from scalelab.config.specs import AugmentSpec
from scalelab.data.loader import augment_batch
from scalelab.data.prepare_stream import encode_chunk
from scalelab.data.shards import ShardWriter, decode_image, sha256_file
from scalelab.data.sources import _fit_square
from scalelab.data.stream import _generator, decode_augment, normalise_batch
from scalelab.errors import DataError

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def _save(path: Path, arr: np.ndarray, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format=fmt)
    return buf.getvalue()


def test_prepare_keeps_files_that_need_no_change_and_reencodes_the_rest(tmp_path: Path):
    rng = np.random.default_rng(0)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    files = [
        _save(tmp_path / "a" / "ok.jpg", rgb(16, 16), "JPEG"),  # kept: JPEG, 16 px, RGB
        _save(tmp_path / "a" / "ok.png", rgb(16, 16), "PNG"),  # kept: PNG, 16 px, RGB
        _save(tmp_path / "b" / "big.jpg", rgb(24, 20), "JPEG"),  # resized + cropped: re-encoded
        _save(tmp_path / "b" / "grey.jpg", grey, "JPEG"),  # mode L, converted to RGB: re-encoded
    ]
    corrupt = tmp_path / "b" / "cut.jpg"
    corrupt.write_bytes(files[0].read_bytes()[:300])  # a truncated JPEG: its header parses, its data not
    paths = [str(f) for f in [*files, corrupt]]

    res = encode_chunk(None, paths, [0, 1, 2, 3, 4], [0, 0, 1, 1, 1], 16, "RGB", "skip")
    assert res["skipped"] == [str(corrupt)] and res["kept"] == 2
    rows = {i: (raw, fmt) for i, _, raw, fmt in res["rows"]}
    assert rows[0] == (files[0].read_bytes(), "jpeg")  # the original bytes, untouched
    assert rows[1] == (files[1].read_bytes(), "png")
    for i in (2, 3):
        raw, fmt = rows[i]
        assert fmt == "png" and raw[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(files[i]) as src:  # re-encoded losslessly: the squared, converted pixels
            assert np.array_equal(decode_image(raw, 3), _fit_square(src.convert("RGB"), 16))
    with pytest.raises(DataError, match=r"cannot read image .*cut\.jpg.*on_bad_file=skip"):
        encode_chunk(None, paths, [0, 1, 2, 3, 4], [0, 0, 1, 1, 1], 16, "RGB", "error")

    writer = ShardWriter(tmp_path / "out", "train", target_bytes=10**9, row_group_rows=2)
    for row in res["rows"]:
        writer.add(*row)
    (shard,) = writer.close()
    assert shard["formats"] == {"jpeg": 1, "png": 3} and shard["rows"] == 4
    assert shard["sha256"] == sha256_file(tmp_path / "out" / shard["file"])


def _old_path(raws: list[bytes], channels: int, aug: AugmentSpec | None, seed: list[int]) -> torch.Tensor:
    """What the stream path computed before: decode, stack, float, augment on floats, normalise."""
    x = np.stack([decode_image(r, channels) for r in raws])
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float()
    if aug is not None:
        t = augment_batch(t, aug, _generator(seed))
    c = slice(0, channels)
    return normalise_tensor(t, *pixel_scale(MEAN[c], STD[c]))


@pytest.mark.parametrize(
    ("channels", "fmt", "aug"),
    [
        (3, "JPEG", AugmentSpec(crop_padding=3, hflip=True, random_erasing=0.5)),
        (3, "PNG", None),
        (1, "PNG", AugmentSpec(crop_padding=2, hflip=True)),
    ],
)
def test_fast_decode_augment_equals_the_float_path(channels: int, fmt: str, aug: AugmentSpec | None):
    rng = np.random.default_rng(1)
    # (H, W) = (12, 10): not square, so a swapped axis cannot pass
    raws = [_encode(rng.integers(0, 256, (12, 10, channels), dtype=np.uint8), fmt) for _ in range(24)]
    seed = [7, 1, 0, 3, 5]
    fast = decode_augment(raws, np.arange(24), channels, aug, seed, "train/shard-00000.parquet")
    assert fast.dtype == np.uint8 and fast.shape == (24, channels, 12, 10)
    c = slice(0, channels)
    got = normalise_batch(torch.from_numpy(fast), *pixel_scale(MEAN[c], STD[c]))
    assert torch.equal(got, _old_path(raws, channels, aug, seed))  # bit for bit, crops and flips alike


def test_fast_decode_names_a_corrupt_image():
    raws = [_encode(np.zeros((8, 8, 3), np.uint8), "PNG")] * 3
    raws[1] = raws[1][:20]
    with pytest.raises(DataError, match=r"corrupt image \(sample id 11\) in shard val/shard-00003"):
        decode_augment(raws, np.array([10, 11, 12]), 3, None, [0], "val/shard-00003.parquet")


def test_small_images_are_stored_raw_and_a_damaged_one_is_named():
    from scalelab.data.shards import RAW_MAGIC, encode_sample

    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    raw, fmt = encode_sample(small)
    assert fmt == "raw" and raw.startswith(RAW_MAGIC) and len(raw) == 28 * 28 + 15
    assert np.array_equal(decode_image(raw, 1), small)
    big = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)  # 6.9 KB of pixels: PNG, lossless
    png, fmt = encode_sample(big)
    assert fmt == "png" and np.array_equal(decode_image(png, 3), big)

    flipped = bytearray(raw)
    flipped[100] ^= 1  # one pixel bit: only the CRC can tell
    ids = np.array([5, 6, 7])
    for bad, why in ((bytes(flipped), "CRC-32"), (raw[:-1], "header says 28x28x1")):
        with pytest.raises(DataError, match=rf"corrupt image \(sample id 6\) in shard train/s.*{why}"):
            decode_augment([raw, bad, raw], ids, 1, None, [0], "train/s.parquet")
    with pytest.raises(DataError, match=r"has 1 channel\(s\), the dataset 3"):
        decode_augment([raw], ids[:1], 3, None, [0], "train/s.parquet")
