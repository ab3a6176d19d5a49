"""Serve's input forms and hostile clients, over real HTTP to a real Ray Serve (whichever ingress the
session's Ray runs: the default proxy or HAProxy; both wrap the app in `scalelab.serve.guard`).

Binary, .npy and multipart requests answer exactly as base64 JSON does for the same images; EXIF
orientation, transparency and MPO are handled; every framing of an over-limit body gets one 413;
header bytes Ray itself reads get a 400 (not a 500); and a fuzz run of 1000+ generated requests
(header bytes, encodings, framings, bodies, over raw sockets) gets no server error.
"""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from scalelab.cluster.services import free_port
from scalelab.config.specs import ServeSpec
from scalelab.serve.deploy import build_application
from scalelab.serve.settings import replica_config

pytestmark = pytest.mark.integration
APP = "scalelab-inputs"
LIMITS = {"max_images": 16, "max_pixels": 1_000_000, "max_body_bytes": 2_000_000, "max_batch_size": 16}
RAY_HEADERS = [
    "x-request-id",
    "x-request-timeout-seconds",
    "x-request-disconnect-disabled",
    "serve_multiplexed_model_id",
    "serve-multiplexed-model-id",
    "x-session-id",
    "traceparent",
]


def encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None, **kw) -> bytes:
    from PIL import Image

    img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr, mode=mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def bomb_png(w: int, h: int) -> bytes:
    """A PNG whose header declares w x h pixels (and holds none)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def app_url(ray_session, digits_bundles):
    """The `good` digits bundle served straight from its folder (no registry needed here)."""
    from PIL import Image
    from ray import serve

    from scalelab.data.samples import read_samples

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    spec = ServeSpec(port=port, **LIMITS)
    bundle = digits_bundles["good"]["dir"]
    cfg = replica_config(spec, "digits", None, None, None, bundle_path=str(bundle), include_key=False)
    serve.run(
        build_application({"serve": spec.model_dump(), "user_config": cfg.model_dump()}),
        name=APP,
        route_prefix="/",
    )
    samples = read_samples(bundle)[:16]  # held-out test digits kept in the bundle, with labels
    x = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s["png"]))))[..., None] for s in samples])
    y = np.array([int(s["label"]) for s in samples])
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, x=x, y=y)  # x: (16, 8, 8, 1) uint8
    serve.delete(APP)
    serve.shutdown()


def _answers(r: httpx.Response) -> np.ndarray:
    """(N, K) probabilities in class order, from a prediction response."""
    assert r.status_code == 200, r.text[:300]
    preds = r.json()["predictions"]
    out = np.zeros((len(preds), 10))
    for i, top in enumerate(preds):
        for c in top:
            out[i, c["index"]] = c["probability"]
    return out


def test_every_input_form_answers_like_base64_json(app_url):
    x, url = app_url.x, app_url.url  # (16, 8, 8, 1) uint8, held-out digits
    with httpx.Client(timeout=60) as http:
        post = lambda path="/v1/predict", **kw: http.post(f"{url}{path}?top_k=10", **kw)  # noqa: E731
        reference = _answers(post(json={"images": [b64(encode(a)) for a in x]}))
        assert (reference.argmax(1) == app_url.y).mean() >= 0.8  # a real model, not noise
        forms = {
            "npy (N, H, W, C)": post(content=npy(x), headers={"content-type": "application/x-npy"}),
            "npy (N, H, W)": post(content=npy(x[..., 0]), headers={"content-type": "application/x-npy"}),
            "npy untyped": post(content=npy(x), headers={"content-type": "application/octet-stream"}),
            "multipart at /v1/predict": post(
                files=[("files", (f"{i}.png", encode(a))) for i, a in enumerate(x)]
            ),
            "multipart at /v1/predict/file": post(
                "/v1/predict/file", files=[("files", (f"{i}.bmp", encode(a, "BMP"))) for i, a in enumerate(x)]
            ),
            "pixel arrays in JSON": post(json={"images": [a[..., 0].tolist() for a in x]}),
        }
        # no query string: the Guard's hot path (serve/app.py), past FastAPI; the same answers
        hot = lambda **kw: http.post(f"{url}/v1/predict", **kw)  # noqa: E731
        forms |= {
            "hot path: base64 JSON": hot(json={"images": [b64(encode(a)) for a in x], "top_k": 10}),
            "hot path: pixel arrays": hot(json={"images": [a[..., 0].tolist() for a in x], "top_k": "10"}),
        }
        for form, r in forms.items():
            np.testing.assert_allclose(_answers(r), reference, atol=1e-5, err_msg=form)
        npy_kw = {"content": npy(x), "headers": {"content-type": "application/x-npy; v=1"}}
        five = http.post(f"{url}/v1/predict?top_k=5", **npy_kw)  # the server's default top_k
        np.testing.assert_allclose(_answers(hot(**npy_kw)), _answers(five), atol=1e-5, err_msg="hot npy")
        assert hot(json={"images": []}).json() == post(json={"images": []}).json()  # the same 422
        r = hot(content=b'{"images": [', headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"].startswith("body is not valid JSON")
        for i in range(4):  # one image file per request body, each content type
            for ctype, fmt, kw in (
                ("image/png", "PNG", {}),
                ("image/bmp", "BMP", {}),
                ("image/webp", "WEBP", {"lossless": True}),
                ("", "PNG", {}),  # untyped: sniffed
            ):
                headers = {"content-type": ctype} if ctype else {}
                r = post(content=encode(x[i], fmt, **kw), headers=headers)
                np.testing.assert_allclose(
                    _answers(r)[0], reference[i], atol=1e-5, err_msg=f"{ctype or 'untyped'}"
                )

        # EXIF-rotated and transparent versions classify like the originals
        from PIL import Image

        for i in range(4):
            exif = Image.Exif()
            exif[0x0112] = 6  # stored turned left; "rotate 90 degrees clockwise to display"
            sideways = np.ascontiguousarray(np.rot90(x[i][..., 0]))
            r = post(content=encode(sideways, exif=exif), headers={"content-type": "image/png"})
            np.testing.assert_allclose(_answers(r)[0], reference[i], atol=1e-5, err_msg="EXIF rotated")
            ink = np.zeros((8, 8, 4), dtype=np.uint8)
            ink[..., 3] = x[i][..., 0]  # black ink, the strokes opaque, the ground transparent
            r = post(content=encode(ink, mode="RGBA"), headers={"content-type": "image/png"})
            np.testing.assert_allclose(_answers(r)[0], reference[i], atol=1e-5, err_msg="transparent")
        big = np.kron(x[0][..., 0], np.ones((8, 8), dtype=np.uint8))
        mpo = encode(big, "MPO", save_all=True, append_images=[Image.new("L", (64, 64), 255)])
        jpeg = encode(big, "JPEG")
        r_mpo, r_jpeg = (post(content=b, headers={"content-type": "image/jpeg"}) for b in (mpo, jpeg))
        np.testing.assert_allclose(_answers(r_mpo), _answers(r_jpeg), atol=0.02)


def _raw(port: int, data: bytes, half_close: bool = False, timeout: float = 15.0) -> bytes:
    """Send bytes on a fresh connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            if half_close:  # the declared body never comes: tell the server so
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before taking everything
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if _complete(out):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def _final(resp: bytes) -> bytes:
    """The final response, past any interim 1xx (100 Continue)."""
    while resp.startswith(b"HTTP/1.1 1") and b"\r\n\r\n" in resp:
        resp = resp.partition(b"\r\n\r\n")[2]
    return resp


def _complete(resp: bytes) -> bool:
    head, sep, body = _final(resp).partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value)
    return False


def _status(resp: bytes) -> int:
    parts = _final(resp).split(b"\r\n", 1)[0].split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _body(resp: bytes) -> dict:
    return json.loads(_final(resp).partition(b"\r\n\r\n")[2] or b"{}")


def test_hostile_clients_get_clear_4xx(app_url):
    url, port = app_url.url, app_url.port
    with httpx.Client(timeout=60) as http:
        limit = f"limit of {LIMITS['max_body_bytes']:,} bytes"
        by_length = http.post(
            f"{url}/v1/predict", content=b"x" * 2_100_000, headers={"content-type": "image/png"}
        )
        chunked = http.post(
            f"{url}/v1/predict", content=iter([b"x" * 100_000] * 25), headers={"content-type": "image/png"}
        )
        npy_big = http.post(
            f"{url}/v1/predict",
            content=iter([npy(np.zeros((40_000, 8, 8), np.uint8))]),
            headers={"content-type": "application/x-npy"},
        )
        for r in (by_length, chunked, npy_big):
            assert r.status_code == 413 and limit in r.json()["error"], r.text[:300]
        for side in (10_000, 50_000):
            r = http.post(
                f"{url}/v1/predict", content=bomb_png(side, side), headers={"content-type": "image/png"}
            )
            assert r.status_code == 413, r.text
            assert (
                f"{side}x{side} = {side * side:,} pixels exceeds the limit of 1,000,000" in r.json()["error"]
            )
        cases = {
            "bad base64": ({"json": {"images": ["abc"]}}, 422, "Incorrect padding"),
            "not JSON": (
                {"content": b"{nope", "headers": {"content-type": "application/json"}},
                422,
                "line 1",
            ),
            "unknown type": (
                {"content": b"x", "headers": {"content-type": "text/csv"}},
                415,
                "application/x-npy",
            ),
            "npy floats": (
                {
                    "content": npy(np.zeros((1, 8, 8), np.float32)),
                    "headers": {"content-type": "application/x-npy"},
                },
                422,
                "uint8",
            ),
            "npy wrong size": (
                {
                    "content": npy(np.zeros((1, 28, 28), np.uint8)),
                    "headers": {"content-type": "application/x-npy"},
                },
                422,
                "8x8",
            ),
            "multipart without boundary": (
                {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
                422,
                "files",
            ),
            "gif": (
                {"content": encode(app_url.x[0], "GIF"), "headers": {"content-type": "image/gif"}},
                415,
                "WebP",
            ),
        }
        for label, (kwargs, status, says) in cases.items():
            r = http.post(f"{url}/v1/predict", **kwargs)
            assert r.status_code == status and says in r.json()["error"], (label, r.status_code, r.text)
            assert "There was an error parsing the body" not in r.text
    for name in RAY_HEADERS:
        resp = _raw(port, f"GET /v1/model HTTP/1.1\r\nHost: t\r\n{name}: ".encode() + b"\xff\xfe\x80\r\n\r\n")
        assert _status(resp) == 400 and "not valid UTF-8" in _body(resp)["error"], (name, resp[:300])
    upgrade = (
        b"GET /v1/predict HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    resp = _raw(port, upgrade)
    assert 400 <= _status(resp) < 500 and "/v1/predict" in _body(resp)["error"], resp[:300]
    assert httpx.get(f"{url}/readyz").status_code == 200


# ----------------------------------------------------------------------------- fuzz


def _fuzz_requests(x: np.ndarray, n: int, seed: int = 0) -> list[tuple[bytes, bool, str]]:
    """``n`` raw HTTP requests: (bytes, half_close, label). Seeded: the same run every time."""
    rng = random.Random(seed)
    from PIL import Image

    good = encode(x[0])
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = x[1][..., 0]
    exif = Image.Exif()
    exif[0x0112] = rng.choice([3, 6, 8])
    images = [
        good,
        encode(x[2], "JPEG"),
        encode(x[3], "BMP"),
        encode(x[4], "WEBP"),
        encode(rgba, mode="RGBA"),
        encode(x[5], exif=exif),
        encode(x[6], "GIF"),
        encode(
            np.kron(x[7][..., 0], np.ones((4, 4), np.uint8)),
            "MPO",
            save_all=True,
            append_images=[Image.new("L", (4, 4))],
        ),
        good[: rng.randint(8, len(good) - 1)],
        good[:16] + bytes(rng.getrandbits(8) for _ in range(64)),
        bomb_png(50_000, 50_000),
        bomb_png(0, 5),
        b"",
    ]

    def rand_bytes(k: int) -> bytes:
        return bytes(rng.getrandbits(8) for _ in range(k))

    def multipart(parts: list[bytes]) -> tuple[bytes, str]:
        boundary = "b" + rng.choice(["oundary", "x" * 70, "é", ""])
        body = b"".join(
            b"--"
            + boundary.encode()
            + b'\r\nContent-Disposition: form-data; name="'
            + rng.choice([b"files", b"f", b"\xff"])
            + b'"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
            + p
            + b"\r\n"
            for p in parts
        )
        body += (b"--" + boundary.encode() + b"--\r\n") if rng.random() < 0.8 else b""
        return body, f"multipart/form-data; boundary={boundary}"

    def body_and_type() -> tuple[bytes, str]:
        kind = rng.choice(["json", "json", "image", "image", "npy", "npy", "multipart", "junk"])
        if kind == "json":
            choice = rng.random()
            if choice < 0.4:
                doc = {"images": [b64(rng.choice(images)) for _ in range(rng.randint(0, 3))]}
                if rng.random() < 0.3:
                    doc["top_k"] = rng.choice([0, 1, 5, 10**9, "3", None, -1, 2.5])
                raw = json.dumps(doc).encode()
            elif choice < 0.55:
                raw = json.dumps(
                    {"images": [[[rng.choice([0, 255, -1, 300, 1.5]) for _ in range(3)]] * 3]}
                ).encode()
            elif choice < 0.6:
                raw = b"[" * rng.choice([10, 5000, 100_000]) + b"]" * rng.choice([0, 10])
            elif choice < 0.65:  # integers past float range, and past Python's 4300-digit limit
                raw = b'{"images": [[[' + b"9" * rng.choice([400, 5000]) + b", 1], [1, 1]]]}"
            elif choice < 0.75:
                raw = json.dumps({"images": [b64(good)]}).encode(rng.choice(["utf-16", "utf-32", "latin-1"]))
            elif choice < 0.85:
                raw = b'{"images": ["' + rand_bytes(rng.randint(1, 40)).replace(b'"', b"") + b'"]}'
            else:
                raw = json.dumps({"images": "x", "extra": {"a": [1, None, True]}}).encode()
            ctype = rng.choice(
                ["application/json", "application/json; charset=latin-1", "application/problem+json", ""]
            )
            return raw, ctype
        if kind == "image":
            raw = rng.choice(images)
            ctype = rng.choice(["image/png", "image/jpeg", "image/webp", "image/x-whatever", "image/", ""])
            return raw, ctype
        if kind == "npy":
            shape = rng.choice(
                [(2, 8, 8), (1, 8, 8, 1), (3, 8, 8, 3), (1, 9, 8), (0, 8, 8), (17, 8, 8), (8, 8)]
            )
            dtype = rng.choice([np.uint8, np.uint8, np.float32, np.int64, np.bool_])
            raw = npy(np.zeros(shape, dtype))
            cut = rng.random()
            if cut < 0.15:
                raw = raw[: rng.randint(0, len(raw))]
            elif cut < 0.25:
                raw = raw[:10] + rand_bytes(rng.randint(0, 200))
            elif cut < 0.3:
                raw = npy(np.array([{"pickle": 1}], dtype=object))
            return raw, rng.choice(["application/x-npy", "application/octet-stream", "application/npy"])
        if kind == "multipart":
            raw, ctype = multipart([rng.choice(images) for _ in range(rng.randint(0, 3))])
            if rng.random() < 0.2:
                ctype = rng.choice(
                    ["multipart/form-data", "multipart/form-data; boundary=", "multipart/mixed"]
                )
            return raw, ctype
        return rand_bytes(rng.randint(0, 500)), rng.choice(["", "text/plain", "\xff/\xfe", "a" * 300])

    header_values = [
        b"abc",
        b"\xff\xfe\x80",
        "réq-ü".encode(),
        b"\xed\xa0\x80",
        b"x" * 6000,
        b"nan",
        b"-1",
        b"1e-9",
        b"inf",
        b"0",
        b"?1",
        b"\t \t",
        b"\x7f\x01",
    ]
    out = []
    for _ in range(n):
        method = rng.choice([b"POST"] * 12 + [b"GET", b"PUT", b"HEAD", b"OPTIONS", b"DELETE", b"P\xffST"])
        path = rng.choice(
            [b"/v1/predict"] * 14
            + [
                b"/v1/predict/file",
                b"/v1/predict?top_k=3",
                b"/v1/predict?top_k=abc",
                b"/v1/model",
                b"/readyz",
            ]
            + [b"/", b"/openapi.json", b"/v1/%ff%00", b"/v1/\xff", b"*", b"http://x/v1/predict"]
        )
        version = rng.choice([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0"])
        body, ctype = body_and_type()
        headers = [(b"Host", b"127.0.0.1")] if rng.random() < 0.97 else []
        headers.append((b"Connection", b"close"))
        if ctype:
            headers.append((b"Content-Type", ctype.encode("utf-8", "surrogateescape")))
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            name = rng.choice(
                RAY_HEADERS + ["user-agent", "authorization", "accept-encoding", "cookie"]
            ).encode()
            headers.append((name, rng.choice(header_values)))
        if rng.random() < 0.06:
            headers.append(
                (
                    rng.choice([b"x-\xff", b"bad header", b"x-ok"]),
                    rand_bytes(8).replace(b"\r", b"").replace(b"\n", b""),
                )
            )
        if rng.random() < 0.1:
            headers.append((b"Content-Encoding", rng.choice([b"gzip", b"br", b"\xff"])))
        if rng.random() < 0.05:
            headers.append((b"Expect", b"100-continue"))
        framing = rng.choice(
            ["length"] * 8
            + ["chunked"] * 4
            + ["none", "short", "long", "bad-chunk", "open-chunk", "both", "dup", "junk-length"]
        )
        half_close = framing in ("long", "open-chunk")
        if framing == "length":
            headers.append((b"Content-Length", str(len(body)).encode()))
            payload = body
        elif framing in ("chunked", "both", "bad-chunk", "open-chunk"):
            headers.append((b"Transfer-Encoding", b"chunked"))
            if framing == "both":
                headers.append((b"Content-Length", str(len(body)).encode()))
            pieces, i = [], 0
            while i < len(body):
                k = rng.randint(1, max(1, len(body) // 3 + 1))
                pieces.append(b"%x\r\n" % len(body[i : i + k]) + body[i : i + k] + b"\r\n")
                i += k
            payload = b"".join(pieces)
            payload += {"bad-chunk": b"zz\r\nxx\r\n0\r\n\r\n", "open-chunk": b""}.get(framing, b"0\r\n\r\n")
        elif framing == "short":
            headers.append((b"Content-Length", str(max(0, len(body) // 2)).encode()))
            payload = body
        elif framing == "long":
            headers.append((b"Content-Length", str(len(body) + 100).encode()))
            payload = body
        elif framing == "dup":
            headers += [(b"Content-Length", str(len(body)).encode()), (b"Content-Length", b"3")]
            payload = body
        elif framing == "junk-length":
            headers.append((b"Content-Length", rng.choice([b"+5", b"-1", b"1e3", b"0x10", b"\xff", b" 12 "])))
            payload = body
        else:
            payload = b""
        head = (
            method
            + b" "
            + path
            + b" "
            + version
            + b"\r\n"
            + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        )
        out.append((head + b"\r\n" + payload, half_close, f"{method!r} {path!r} {framing} {ctype[:40]!r}"))
    return out


def test_fuzz_1000_requests_never_a_server_error(app_url):
    requests = _fuzz_requests(app_url.x, 1000)
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: _raw(app_url.port, r[0], r[1], timeout=20), requests))
    elapsed = time.monotonic() - started
    statuses = [_status(a) for a in answers]
    server_errors = [
        (req[2], a[:300]) for req, a, s in zip(requests, answers, statuses, strict=True) if s >= 500
    ]
    assert not server_errors, server_errors[:5]
    silent = [req[2] for req, s in zip(requests, statuses, strict=True) if s == 0 and not req[1]]
    assert len(silent) <= 5, silent[:10]  # only where the client stops mid-request
    assert sum(200 <= s < 300 for s in statuses) >= 40 and sum(400 <= s < 500 for s in statuses) >= 300
    assert elapsed < 120, elapsed
    r = httpx.post(
        f"{app_url.url}/v1/predict", content=npy(app_url.x[:2]), headers={"content-type": "application/x-npy"}
    )
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
