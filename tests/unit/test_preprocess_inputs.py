"""Client images as phones and drawing apps write them, .npy batches, and the ingress header guard."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import numpy as np
import pytest

from scalelab.artifacts.preprocess import BadInput, InputSpec, decode_base64, decode_image_bytes, decode_npy
from scalelab.serve.guard import HeaderGuard, header_problem, ingress_middlewares

SPEC1 = InputSpec(8, 1, (0.3,), (0.4,), tuple("0123456789"))  # digits: bright strokes on black
SPEC3 = InputSpec(16, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), ("a", "b"))
DETECT = InputSpec(64, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), ("a",), keep_size=True)


def _digit() -> np.ndarray:
    """An asymmetric bright-on-black 8x8 "digit" (a rotation changes it)."""
    x = np.zeros((8, 8), dtype=np.uint8)
    x[1:7, 2] = 255
    x[1, 2:6] = 200
    x[4, 2:5] = 120
    return x


def _encode(img, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(fmt):
    from PIL import Image

    upright = Image.fromarray(np.kron(_digit(), np.ones((4, 4), dtype=np.uint8)))  # 32x32, exact 8x8 blocks
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the sensor stored it turned left
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    rotated = decode_image_bytes(_encode(stored, fmt, exif=exif), SPEC1, 10_000)
    plain = decode_image_bytes(_encode(upright, fmt), SPEC1, 10_000)
    unrotated = decode_image_bytes(_encode(stored, fmt), SPEC1, 10_000)
    tol = 0 if fmt == "PNG" else 12
    assert np.abs(rotated.astype(int) - plain).max() <= tol
    assert np.abs(unrotated.astype(int) - plain).max() > 100  # the tag is what made them equal


@pytest.mark.parametrize("ink", [0, 40, 255])
def test_strokes_on_transparency_look_like_the_dataset(ink):
    """Dark or bright ink on a transparent sheet -> the digit as the dataset has it (bright on black)."""
    from PIL import Image

    x = _digit()
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = ink
    rgba[..., 3] = x  # the strokes are the opaque part
    out = decode_image_bytes(_encode(Image.fromarray(rgba, "RGBA")), SPEC1, 10_000)
    shade = 255 - ink if ink < 128 else ink  # dark ink would vanish on black: inverted
    expected = np.rint(shade * (x / 255.0)).astype(np.uint8)  # ink over black, weighted by alpha
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
    la = Image.fromarray(np.stack([np.full((8, 8), ink, np.uint8), x], -1), "LA")
    assert np.abs(decode_image_bytes(_encode(la), SPEC1, 10_000)[..., 0].astype(int) - expected).max() <= 1


def test_opaque_alpha_changes_nothing_and_colour_models_get_the_mean():
    from PIL import Image

    x = np.random.default_rng(0).integers(0, 60, (8, 8, 3), dtype=np.uint8)  # dark, fully opaque
    rgba = np.concatenate([x, np.full((8, 8, 1), 255, np.uint8)], -1)
    grey = decode_image_bytes(_encode(Image.fromarray(x)), SPEC1, 10_000)
    assert np.array_equal(decode_image_bytes(_encode(Image.fromarray(rgba, "RGBA")), SPEC1, 10_000), grey)
    clear = np.zeros((16, 16, 4), dtype=np.uint8)  # all transparent
    out = decode_image_bytes(_encode(Image.fromarray(clear, "RGBA")), SPEC3, 10_000)
    assert out[0, 0].tolist() == [128, 102, 76]  # the dataset mean: normalises to zero
    assert SPEC1.background == (0,) and InputSpec(8, 1, (0.8,), (0.2,), ()).background == (255,)


def test_multi_picture_jpeg_is_read_as_its_first_frame():
    from PIL import Image

    first = Image.fromarray(np.kron(_digit(), np.ones((4, 4), dtype=np.uint8)))
    mpo = _encode(first, "MPO", save_all=True, append_images=[Image.new("L", (32, 32), 255)])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    out = decode_image_bytes(mpo, SPEC1, 10_000)
    assert np.abs(out.astype(int) - decode_image_bytes(_encode(first, "JPEG"), SPEC1, 10_000)).max() <= 2


def test_webp_is_accepted_and_gif_is_not():
    from PIL import Image

    img = Image.fromarray(np.kron(_digit(), np.ones((2, 2), dtype=np.uint8)))
    assert decode_image_bytes(_encode(img, "WEBP", lossless=True), SPEC1, 10_000).shape == (8, 8, 1)
    with pytest.raises(BadInput) as err:
        decode_image_bytes(_encode(img, "GIF"), SPEC1, 10_000)
    assert err.value.status == 415 and "PNG, JPEG, BMP or WebP" in err.value.message


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels and holds none (what a decompression bomb's header says)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [10_000, 50_000])
def test_huge_declared_images_get_one_clear_413_with_the_pixel_count(side):
    with pytest.raises(BadInput) as err:
        decode_image_bytes(_png_header_only(side, side), SPEC1, 16_000_000)
    assert err.value.status == 413
    assert f"{side}x{side} = {side * side:,} pixels exceeds the limit of 16,000,000" in err.value.message


def test_base64_errors_say_why_and_what_to_send():
    with pytest.raises(BadInput) as err:
        decode_base64("abc", SPEC1, 10_000, "images[0]")
    assert "Incorrect padding" in err.value.message and "base64-encoded" in err.value.message
    with pytest.raises(BadInput) as err:
        decode_base64("ab$=", SPEC1, 10_000)
    assert "invalid base64 (" in err.value.message


def test_pixel_arrays_with_numbers_past_float_range_are_422():
    from scalelab.artifacts.preprocess import decode_array

    with pytest.raises(BadInput) as err:
        decode_array([[10**400, 1], [1, 1]], SPEC1, 10_000)
    assert err.value.status == 422 and "[0, 255]" in err.value.message


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_npy_batches_decode_without_copies_of_pixels_changed():
    x = np.random.default_rng(3).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    out = decode_npy(_npy(x), SPEC1, 64, 10_000)
    assert out.shape == (5, 8, 8, 1) and np.array_equal(out[..., 0], x) and out.flags.writeable
    assert np.array_equal(decode_npy(_npy(x[..., None]), SPEC1, 64, 10_000), out)
    assert np.array_equal(decode_npy(_npy(np.asfortranarray(x)), SPEC1, 64, 10_000), out)
    rgb = np.random.default_rng(4).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert np.array_equal(decode_npy(_npy(rgb), SPEC3, 64, 10_000), rgb)
    anysize = np.zeros((2, 30, 50, 3), dtype=np.uint8)
    assert decode_npy(_npy(anysize), DETECT, 64, 10_000).shape == (2, 30, 50, 3)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (_npy(np.zeros((2, 8, 8), np.float32)), 422, "dtype float32"),
        (_npy(np.zeros((2, 9, 8), np.uint8)), 422, "9x8 but the model takes 8x8"),
        (_npy(np.zeros((2, 8, 8, 3), np.uint8)), 422, "3 channel(s) but the model takes 1"),
        (_npy(np.zeros((8, 8), np.uint8)), 422, "shape (8, 8)"),
        (_npy(np.zeros((0, 8, 8), np.uint8)), 422, "no images"),
        (_npy(np.zeros((65, 8, 8), np.uint8)), 413, "65 images"),
        (_npy(np.zeros((2, 8, 8), np.uint8))[:-5], 422, "send the whole file"),
        (_npy(np.zeros((2, 8, 8), np.uint8)) + b"x", 422, "send the whole file"),
        (_npy(np.array([{"a": 1}], dtype=object)), 422, "dtype object"),
        (b"\x93NUMPY\x01\x00\x05\x00{'de", 422, "unreadable .npy header"),
        (b"PK\x03\x04 a zip", 422, "not a .npy file"),
    ],
)
def test_bad_npy_bodies_are_clear_4xx(body, status, says):
    with pytest.raises(BadInput) as err:
        decode_npy(body, SPEC1, 64, 10_000)
    assert err.value.status == status and says in err.value.message, err.value.message
    assert "numpy.save" in err.value.message or status == 413 or "send" in err.value.message


# ----------------------------------------------------------------------------- ingress header guard


@pytest.mark.parametrize(
    ("headers", "bad"),
    [
        ([(b"x-request-id", b"\xff\xfe")], "x-request-id"),
        ([(b"X-Request-Timeout-Seconds", b"1\x80")], "X-Request-Timeout-Seconds"),
        ([(b"serve-multiplexed-model-id", b"\xc3")], "serve-multiplexed-model-id"),
        ([(b"x-session-id", b"\xed\xa0\x80")], "x-session-id"),  # a UTF-8-encoded surrogate
        ([(b"x-\xffname", b"v")], "not ASCII"),
        ([(b"x-request-id", "réq".encode())], None),  # UTF-8 is fine
        ([(b"user-agent", b"\xff\xfe")], None),  # Ray does not read it: left to the app (latin-1)
    ],
)
def test_header_problem(headers, bad):
    problem = header_problem(headers)
    assert (problem is None) if bad is None else (bad in problem and "send" in problem or "rename" in problem)


def test_header_guard_answers_400_and_websockets_get_a_body():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = ingress_middlewares()[0].cls(app)
    assert isinstance(guard, HeaderGuard)

    def run(scope):
        sent = []

        async def receive():
            return {"type": "websocket.connect"} if scope["type"] == "websocket" else {"type": "http.request"}

        async def send(message):
            sent.append(message)

        asyncio.run(guard(scope, receive, send))
        return sent

    ok = run({"type": "http", "headers": [(b"x-request-id", b"abc")]})
    assert ok[0]["status"] == 200
    bad = run({"type": "http", "headers": [(b"x-request-id", b"\xff")]})
    assert bad[0]["status"] == 400 and b"not valid UTF-8" in bad[1]["body"]
    ws = run({"type": "websocket", "headers": [], "extensions": {"websocket.http.response": {}}})
    assert ws[0]["type"] == "websocket.http.response.start" and ws[0]["status"] == 400
    assert b"/v1/predict" in ws[1]["body"]
    ws_old = run({"type": "websocket", "headers": []})  # no denial-response extension: a close
    assert ws_old[0]["type"] == "websocket.close"
