"""Serving pieces without servers: preprocessing parity with training, input decoding, deploy configs."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from scalelab.artifacts.preprocess import (
    BadInput,
    InputSpec,
    decode_array,
    decode_base64,
    decode_image_bytes,
    normalise,
)
from scalelab.config.specs import ServeSpec
from scalelab.data.dataset import Split
from scalelab.data.loader import TensorLoader

REPO = Path(__file__).resolve().parents[2]
SPEC1 = InputSpec(8, 1, (0.3,), (0.4,), tuple("0123456789"))
SPEC3 = InputSpec(16, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), ("a", "b"))


def _png(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    from PIL import Image

    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_normalisation_matches_the_training_loader():
    x = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    loader = TensorLoader(Split(x, np.zeros(5, dtype=np.int64)), 5, list(SPEC3.mean), list(SPEC3.std))
    train_x, _ = next(iter(loader))
    assert torch.equal(normalise(x, SPEC3), train_x)


def test_png_roundtrip_is_lossless_for_model_sized_images():
    x = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    out = decode_image_bytes(_png(x), SPEC1, 10_000)
    assert out.shape == (8, 8, 1) and np.array_equal(out[..., 0], x)
    assert np.array_equal(
        decode_base64("data:image/png;base64," + base64.b64encode(_png(x)).decode(), SPEC1, 10_000), out
    )
    assert np.array_equal(decode_array(x.tolist(), SPEC1, 10_000), out)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16", "1", "CMYK"])
def test_any_colour_mode_and_size_is_converted(mode):
    x = np.random.default_rng(2).integers(0, 256, (23, 41, 3), dtype=np.uint8)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    for spec in (SPEC1, SPEC3):
        out = decode_image_bytes(_png(x, fmt, mode), spec, 10_000)
        assert out.shape == (spec.image_size, spec.image_size, spec.channels) and out.dtype == np.uint8


@pytest.mark.parametrize(
    ("raw", "status"),
    [(b"", 422), (b"GIF89a....", 415), (b"\x89PNG\r\n\x1a\n\x00\x00", 422), (b"just text", 415)],
)
def test_bad_bytes_are_client_errors(raw, status):
    with pytest.raises(BadInput) as err:
        decode_image_bytes(raw, SPEC1, 10_000)
    assert err.value.status == status


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(BadInput) as err:
        decode_image_bytes(_png(np.zeros((200, 200), dtype=np.uint8)), SPEC1, 10_000)
    assert err.value.status == 413


@pytest.mark.parametrize(
    "value",
    [
        [],
        [[]],
        [[1, 2], [3]],
        [[float("nan")]],
        [[float("inf")]],
        [[-1]],
        [[256]],
        [[[[1]]]],
        [["a"]],
        [[True]],
        [[[1, 2]]],
        5,
        "x",
    ],
)
def test_bad_arrays_are_422(value):
    with pytest.raises(BadInput) as err:
        decode_array(value, SPEC1, 10_000)
    assert err.value.status in (413, 422)


def test_generated_deploy_files_are_up_to_date(tmp_path, monkeypatch):
    """platform/kuberay/{serve-config,rayservice}.yaml are `scalelab serve digits --emit-*` output."""
    from typer.testing import CliRunner

    from scalelab.cli import app

    monkeypatch.chdir(REPO)
    out = CliRunner().invoke(
        app,
        [
            "serve",
            "digits",
            "--emit-config",
            str(tmp_path / "c.yaml"),
            "--emit-rayservice",
            str(tmp_path / "r.yaml"),
        ],
    )
    assert out.exit_code == 0, out.output
    assert (tmp_path / "c.yaml").read_text() == (REPO / "platform/kuberay/serve-config.yaml").read_text()
    assert (tmp_path / "r.yaml").read_text() == (REPO / "platform/kuberay/rayservice.yaml").read_text()


def test_serve_config_is_valid_for_ray_serve_and_matches_the_spec():
    from ray.serve.schema import ServeDeploySchema

    from scalelab.serve.deploy import rayservice_manifest, serve_config

    spec = ServeSpec(
        autoscaling=True, min_replicas=1, max_replicas=3, max_batch_size=8, max_queued_requests=20
    )
    config = serve_config(spec, "digits@champion", "http://mlflow:5000")
    schema = (
        ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") else None
    )
    assert schema is not None
    dep = config["applications"][0]["deployments"][0]
    assert dep["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in dep
    assert dep["max_queued_requests"] == 20 and dep["user_config"]["max_batch_size"] == 8
    assert dep["user_config"]["api_key_sha256"] is None, "a key must never be written into a config file"
    manifest = rayservice_manifest(spec, "digits@champion", "http://mlflow:5000")
    inner = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert inner["applications"] == config["applications"]
    assert manifest["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize(
    ("target", "expected"),
    [("m", ("m", "champion", None)), ("m@challenger", ("m", "challenger", None)), ("m/3", ("m", None, "3"))],
)
def test_parse_target(target, expected):
    from scalelab.serve.deploy import parse_target

    assert parse_target(target) == expected


def test_api_key_is_only_hashed(monkeypatch):
    from scalelab.serve.settings import key_sha256, replica_config

    monkeypatch.setenv("SCALELAB_API_KEY", "s3cret")
    cfg = replica_config(ServeSpec(), "m")
    assert cfg.api_key_sha256 == key_sha256("s3cret") and "s3cret" not in cfg.model_dump_json()


def test_guard_answers_408_to_a_trickling_body_and_passes_a_whole_one(monkeypatch):
    """A client sending a byte at a time resets the ingress's inactivity timeout, never the Guard's
    whole-body deadline; a complete body still reaches the app, replayed whole."""
    import asyncio
    import time

    from scalelab.serve import app as served

    monkeypatch.setattr(served._Limits, "body_timeout_s", 0.3)
    scope = {"type": "http", "path": "/v1/predict", "headers": [(b"content-length", b"100000")]}

    async def trickle():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def never_called(scope, receive, send):
        raise AssertionError("the app must not see a partial body")

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    started = time.monotonic()
    asyncio.run(served.Guard(never_called)(scope, trickle, send))
    assert sent[0]["status"] == 408 and time.monotonic() - started < 2
    assert b"not complete within 0.3 s" in sent[1]["body"] and b"bytes arrived" in sent[1]["body"]

    parts = iter([b'{"ima', b'ges": []}'])
    seen: list[bytes] = []

    async def in_two_parts():
        part = next(parts)
        return {"type": "http.request", "body": part, "more_body": part != b'ges": []}'}

    async def app(scope, receive, send):
        seen.append((await receive())["body"])

    asyncio.run(served.Guard(app)(scope, in_two_parts, send))
    assert seen == [b'{"images": []}']


# ---- the hot path of POST /v1/predict (serve/app.py): the same answers as the FastAPI route's


JSON_BODIES = [
    b'{"images": ["aGk=", "aGk="], "top_k": 3}',
    b'{"images": ["aGk="], "top_k": null, "extra": 1}',
    b'{"images": ["a"], "images": ["b"]}',  # duplicate key: the last one, as json
    b'{"images": [[[0, 255], [255, 0]], "aGk="]}',
    b'{"images": ["x"], "top_k": NaN}',  # json accepts NaN, orjson does not
    '{"images": ["x"]}'.encode("utf-16"),  # json reads UTF-16, orjson does not
    b'{"images": ["\\ud800"]}',  # a lone surrogate
    b'{"images": [], "top_k": 123456789012345678901234567890}',  # past 64 bits
    b"[1, 2]",
    b'"images"',
]
BAD_JSON = [b'{"images": [', b"\xff\xfe\x00{", b"[" * 100_000, b'{"images": ["a"]} x', b"1" * 5000]


@pytest.mark.parametrize("body", JSON_BODIES)
def test_predict_json_reads_what_the_standard_parser_and_the_model_read(body):
    """orjson decides only the common shape; NaN, UTF-16, lone surrogates and integers past 64 bits
    (which orjson reads as floats) give the old path's values or its 422."""
    import json

    from scalelab.serve.app import PredictRequest, read_predict_json

    try:
        req = PredictRequest.model_validate(json.loads(body))
        want = (req.images, req.top_k)
    except ValueError:  # pydantic's ValidationError
        want = None
    if want is None:
        with pytest.raises(BadInput) as exc:
            read_predict_json(body)
        assert exc.value.status == 422 and exc.value.message.startswith("invalid request: ")
    else:
        got = read_predict_json(body)
        assert got == want and type(got[1]) is type(want[1])


@pytest.mark.parametrize("body", BAD_JSON)
def test_predict_json_refuses_bad_json_with_the_standard_parsers_reason(body):
    import json

    from scalelab.serve.app import JSON_HINT, read_predict_json

    with pytest.raises(BadInput) as exc:
        read_predict_json(body)
    assert exc.value.status == 422 and exc.value.message.endswith(JSON_HINT)
    try:
        json.loads(body)
    except (ValueError, RecursionError) as err:
        reason = getattr(err, "msg", None) or getattr(err, "reason", None) or str(err)[:40]
        reason = "nested too deeply" if isinstance(err, RecursionError) else reason
        assert str(reason) in exc.value.message


@pytest.mark.parametrize(
    "obj",
    [
        {"images": ["a", "b"]},
        {"images": ["a"], "top_k": 5, "other": [1]},
        {"images": [], "top_k": None},
        {"images": ["a"], "top_k": 1000},
        {"images": [[[1]], "a"]},
        {"images": ["a"], "top_k": "3"},  # lax pydantic: "3" -> 3
        {"images": ["a"], "top_k": 2.0},
        {"images": ["a"], "top_k": True},
        {"images": ["a"], "top_k": 0},
        {"images": ["a"], "top_k": 10**9},
        {"images": ["a"], "top_k": 10**30},
        {"images": ["a"], "top_k": 2.5},
        {"images": "a"},
        {"images": [1]},
        {"top_k": 3},
        [["a"]],
        None,
    ],
)
def test_predict_json_fast_check_agrees_with_the_pydantic_model(obj):
    import json

    from pydantic import ValidationError

    from scalelab.serve.app import PredictRequest, read_predict_json

    try:
        req = PredictRequest.model_validate(obj)
        want = (req.images, req.top_k)
    except ValidationError as err:
        want = err
    if isinstance(want, ValidationError):
        with pytest.raises(BadInput) as exc:
            read_predict_json(json.dumps(obj).encode())
        assert exc.value.status == 422 and exc.value.message.startswith("invalid request: ")
        assert want.errors()[0]["msg"] in exc.value.message
    else:
        got = read_predict_json(json.dumps(obj).encode())
        assert got == want and type(got[1]) is type(want[1])


def test_json_response_is_the_json_of_fastapis_response():
    import json

    from fastapi.responses import JSONResponse

    from scalelab.serve.app import json_response

    content = {
        "model": {"name": "m", "version": "3"},
        "predictions": [[{"class": "é", "index": 1, "probability": p} for p in (1e-06, 0.123456, 1.0, 0.0)]],
    }
    fast, slow = json_response(content), JSONResponse(content)
    assert json.loads(fast.body) == json.loads(slow.body) == content
    assert fast.status_code == 200 and fast.headers["content-type"] == slow.headers["content-type"]


@pytest.mark.parametrize(
    "method, path, root, query, ctype, hot",
    [
        ("POST", "/v1/predict", "", b"", "application/json", True),
        ("POST", "/digits/v1/predict", "/digits", b"", "image/png", True),
        ("POST", "/v1/predict", "", b"", "", True),
        ("POST", "/v1/predict", "", b"top_k=3", "application/json", False),  # FastAPI validates it
        ("POST", "/v1/predict", "", b"", "multipart/form-data; boundary=x", False),
        ("POST", "/v1/predict/file", "", b"", "multipart/form-data; boundary=x", False),
        ("GET", "/v1/predict", "", b"", "", False),
        ("POST", "/v1/model", "", b"", "application/json", False),
    ],
)
def test_guard_answers_only_plain_predict_posts_itself(monkeypatch, method, path, root, query, ctype, hot):
    """The Guard hands a whole, authorised POST /v1/predict body to the replica's hot path; every
    other request (query parameters, multipart, other routes) goes through FastAPI as before."""
    import asyncio

    from scalelab.serve import app as served

    calls: list[tuple] = []

    class Server:
        async def answer_predict(self, scope, content_type, body, send):
            calls.append(("hot", content_type, body))

    async def fastapi_app(scope, receive, send):
        calls.append(("fastapi", (await receive())["body"]))

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        raise AssertionError("the stand-ins answer nothing")

    monkeypatch.setattr(served._Limits, "server", Server())
    headers = [(b"content-type", ctype.encode())] if ctype else []
    scope = {"type": "http", "method": method, "path": path, "root_path": root, "query_string": query}
    asyncio.run(served.Guard(fastapi_app)({**scope, "headers": headers}, receive, send))
    assert calls == ([("hot", ctype, b"{}")] if hot else [("fastapi", b"{}")])


def test_top_k_is_the_same_as_per_element_numpy():
    """``Predictor.top_k`` converts whole arrays to Python numbers; the answer is the old per-element one."""
    from types import SimpleNamespace

    from scalelab.artifacts.predictor import Predictor

    rng = np.random.default_rng(0)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(7, 10)).astype(np.float32)), 1).numpy()
    probs[0, :3] = probs[0, 3]  # ties keep argsort's order
    fake = SimpleNamespace(classes=tuple(f"c{i}" for i in range(10)))
    for k in (1, 5, 10, 50):
        got = Predictor.top_k(fake, probs, k)
        order = np.argsort(-probs, axis=1)[:, : min(k, 10)]
        want = [
            [{"class": fake.classes[j], "index": int(j), "probability": round(float(p[j]), 6)} for j in row]
            for p, row in zip(probs, order, strict=True)
        ]
        assert got == want
        assert all(type(c["index"]) is int and type(c["probability"]) is float for r in got for c in r)
