"""The Ray Serve application: a FastAPI ingress in front of a model loaded from the registry.

One replica = one process holding one :class:`Predictor`. Requests are decoded and validated
on the replica's event loop; the model runs in one worker thread of its own (torch releases the
GIL), one forward pass at a time, fed by ``@serve.batch`` so concurrent requests share one.
The hot request, ``POST /v1/predict`` with a JSON, image or .npy body and no query string, is
answered by the :class:`Guard` straight after it reads the body, past FastAPI's routing, parameter
validation and response-model serialisation: the event loop's Python time per request is what the
model thread waits for (one GIL), so the same answers and errors come cheaper there. The
alias is polled in the background and a new version is loaded beside the old one and swapped in
by reference, so no request ever sees a half-loaded model. ``reconfigure`` (a ``user_config``
change) applies new limits, batching and auth in place, and pins or unpins a version.
"""

import asyncio
import hmac
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from scalelab.artifacts.predictor import Predictor
from scalelab.artifacts.preprocess import (
    ACCEPTED,
    MAGIC,
    NPY_MAGIC,
    BadInput,
    decode_array,
    decode_base64,
    decode_image_bytes,
    decode_npy,
)
from scalelab.data.samples import read_samples
from scalelab.serve.guard import refuse_websocket, send_error
from scalelab.serve.settings import ReplicaConfig, key_sha256

log = logging.getLogger("ray.serve")
PUBLIC_PATHS = {"/healthz", "/readyz", "/", "/favicon.ico"}
STATIC = Path(__file__).parent / "static"


class PredictRequest(BaseModel):
    images: list[str | list[Any]] = Field(
        ...,
        description="Images: base64 PNG/JPEG/BMP/WebP (a data: URL is fine) or nested lists "
        "(H, W) / (H, W, C) of pixel values in [0, 255]. Any size or colour mode; converted to the "
        "model's input.",
        examples=[["iVBORw0KGgo..."], [[[0, 255], [255, 0]]]],
    )
    top_k: int | None = Field(None, ge=1, le=1000, description="Classes per image (default: server's top_k).")


class ClassScore(BaseModel):
    class_name: str = Field(..., alias="class", description="Class name.")
    index: int = Field(..., description="Class index in the model's output.")
    probability: float = Field(..., description="Softmax probability.")


class PredictResponse(BaseModel):
    model: dict[str, Any] = Field(..., description="Name and version that answered.")
    predictions: list[list[ClassScore]] = Field(..., description="Per image, the top-k classes.")


class Detections(BaseModel):
    boxes: list[list[float]] = Field(..., description="[x1, y1, x2, y2] in the input image's pixels.")
    labels: list[str] = Field(..., description="Class name per box.")
    label_ids: list[int] = Field(..., description="Class index per box.")
    scores: list[float] = Field(..., description="Confidence per box, highest first.")


class DetectResponse(BaseModel):
    model: dict[str, Any] = Field(..., description="Name and version that answered.")
    detections: list[Detections] = Field(..., description="Per image, the detected objects.")


class ErrorResponse(BaseModel):
    error: str = Field(..., description="What was wrong and what to do.")


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503)}

api = FastAPI(
    title="scalelab model server",
    description="Image classification with a multi-scale ResNet from the scalelab registry. Send "
    "`Authorization: Bearer <key>` when the server has an API key (all endpoints but /healthz, /readyz "
    "and the demo page).",
    version="1",
    docs_url=None,  # Swagger UI loads from a CDN; the schema is at /openapi.json
    redoc_url=None,
)


class _Limits:
    """Per-process settings the ASGI guard reads (one replica per process)."""

    max_body_bytes = 8_000_000
    body_timeout_s = 30.0
    api_key_sha256: str | None = None
    server: "ModelServer | None" = None  # the replica's instance, for the hot path


DRAIN_BYTES = 64 << 20  # read (and drop) at most this much of an over-limit body before the 413
DRAIN_SECONDS = 5.0


class Guard:
    """Pure ASGI middleware: API key (401), then the whole body read up to the limit (413 above it,
    whatever the framing: Content-Length or chunked) and within the body deadline (408 after it: the
    ingress only cuts idle clients, not one sending a byte a second) before any parsing; websockets
    get a clear 4xx."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":
            return await refuse_websocket(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if _Limits.api_key_sha256 and scope.get("path", "") not in PUBLIC_PATHS:
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not token or not hmac.compare_digest(key_sha256(token), _Limits.api_key_sha256):
                return await send_error(
                    send,
                    401,
                    "missing or wrong API key: send Authorization: Bearer <key>",
                    {"www-authenticate": "Bearer"},
                )
        limit = _Limits.max_body_bytes
        too_large = (
            f"request body exceeds the limit of {limit:,} bytes; send fewer or smaller images per request "
            "(several requests, or image files instead of pixel arrays)"
        )
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await send_error(
                    send, 400, f"invalid Content-Length header {length[:40]!r}: send the body size in bytes"
                )
            if int(length) > limit:
                if headers.get("expect", "").lower() == "100-continue":  # the body was not sent yet
                    return await send_error(send, 413, f"{int(length):,} bytes: {too_large}")
                await _drain(receive)
                return await send_error(send, 413, f"{int(length):,} bytes: {too_large}")
        chunks: list[bytes] = []
        try:
            outcome = await asyncio.wait_for(_read_body(receive, chunks, limit), _Limits.body_timeout_s)
        except asyncio.TimeoutError:
            return await send_error(
                send,
                408,
                f"request body not complete within {_Limits.body_timeout_s:g} s "
                f"({sum(map(len, chunks)):,} bytes arrived); send the whole body at once",
                {"connection": "close"},
            )
        if outcome == "gone":  # the client went away
            return
        if outcome == "too large":  # chunked (no Content-Length), or more bytes than it said
            await _drain(receive)
            return await send_error(send, 413, too_large)
        body, replayed = b"".join(chunks), False
        server = _Limits.server
        if server is not None and _is_hot_predict(scope, headers):
            return await server.answer_predict(scope, headers.get("content-type", ""), body, send)

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then only http.disconnect, from the server

        await self.app(scope, replay, send)


def _is_hot_predict(scope, headers: dict[str, str]) -> bool:
    """``POST /v1/predict`` with no query string (``top_k`` then comes from the body or the server)
    and a body that is not multipart (the form parser needs Starlette's request)."""
    return (
        scope.get("method") == "POST"
        and not scope.get("query_string")
        and _route_path(scope) == "/v1/predict"
        and not _media_of(headers.get("content-type", "")).startswith("multipart/")
    )


def _route_path(scope) -> str:
    """The path below the app's route prefix (Serve passes the prefix as ``root_path``), as
    Starlette's router matches it."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


async def _read_body(receive, chunks: list[bytes], limit: int) -> str:
    """Append the request's body chunks to ``chunks``: "complete", "too large" or "gone"."""
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return "gone"
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            return "too large"
        chunks.append(chunk)
        if not message.get("more_body", False):
            return "complete"


async def _body_read() -> dict:
    """``receive`` for a response sent after the Guard consumed the body: nothing more comes."""
    return {"type": "http.disconnect"}


async def _drain(receive) -> None:
    """Read the rest of a refused body (bounded in bytes and time), so the client, still sending,
    reads the 413 instead of a reset connection."""
    seen, deadline = 0, time.monotonic() + DRAIN_SECONDS
    while seen < DRAIN_BYTES:
        try:
            message = await asyncio.wait_for(receive(), max(0.01, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


api.add_middleware(Guard)


@api.exception_handler(BadInput)
async def _bad_input(_: Request, exc: BadInput) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


ROUTES = (
    "POST /v1/predict, POST /v1/predict/file, GET /v1/model, /v1/samples, /healthz, /readyz, / (demo page); "
    "the API is described at /openapi.json"
)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = str(exc.detail)
    if exc.status_code in (404, 405):  # say what exists instead
        message = f"{message}: {request.method} {request.url.path}; this server answers {ROUTES}"
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": f"invalid request: {_problems(exc.errors())}"}, status_code=422)


TopK = Annotated[int | None, Query(ge=1, le=1000, description="Classes per image (default: server's top_k).")]
SEND_ONE_OF = (
    'send one of: application/json {"images": [base64 image file or pixel array, ...]}; '
    "image/png, image/jpeg, image/bmp or image/webp (the body is one image file); "
    "application/x-npy (numpy.save of a uint8 (N, H, W[, C]) batch); multipart/form-data (field files)"
)
JSON_HINT = 'send {"images": ["<base64 PNG/JPEG>", ...], "top_k": 5} with Content-Type: application/json'
NPY_TYPES = {"application/x-npy", "application/npy", "application/x-numpy"}
SNIFFED = {"", "application/octet-stream", "application/x-www-form-urlencoded", "text/plain"}
_BINARY = {"type": "string", "format": "binary"}
MULTIPART = {
    "schema": {
        "type": "object",
        "properties": {"files": {"type": "array", "items": _BINARY, "description": f"{ACCEPTED} files."}},
        "required": ["files"],
    }
}
PREDICT_BODY = {
    "required": True,
    "description": "One form per request, chosen by Content-Type; each may hold several images.",
    "content": {
        "application/json": {"schema": PredictRequest.model_json_schema()},
        **{f"image/{t}": {"schema": _BINARY} for t in ("png", "jpeg", "bmp", "webp")},
        "application/x-npy": {
            "schema": {
                **_BINARY,
                "description": "numpy.save() of a uint8 array (N, H, W) or (N, H, W, C), H = W = the "
                "model's image_size and C its channels (see GET /v1/model).",
            }
        },
        "multipart/form-data": MULTIPART,
    },
}


def _media_of(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _media_type(request: Request) -> str:
    return _media_of(request.headers.get("content-type", ""))


def json_response(content: Any, status: int = 200) -> Response:
    """The body FastAPI's ``JSONResponse`` would send, encoded by orjson (floats may be written
    differently, e.g. ``1e-6`` for ``1e-06``: the same numbers)."""
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def read_predict_json(body: bytes) -> tuple[list[str | list[Any]], int | None]:
    """``images`` and ``top_k`` of a JSON body. The common shape (a list of base64 strings, an int
    ``top_k`` or none) is parsed by orjson and checked here as :class:`PredictRequest` would accept
    it; anything else (pixel arrays, lax values like ``"top_k": "3"``, JSON orjson refuses or reads
    otherwise, such as integers past 64 bits, which it makes floats) goes the standard way, for the
    same values or the same 422."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if type(obj) is dict:
        images, top_k = obj.get("images"), obj.get("top_k")
        if (
            type(images) is list
            and all(type(item) is str for item in images)
            and (top_k is None or (type(top_k) is int and 1 <= top_k <= 1000))
        ):
            return images, top_k
    return predict_request(parse_json(body))


def parse_json(body: bytes) -> Any:
    """The standard parser, its failures said as what to fix."""
    try:
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise BadInput(
            422, f"body is not UTF-8 text ({exc.reason} at byte {exc.start}): {JSON_HINT}"
        ) from None
    except json.JSONDecodeError as exc:
        raise BadInput(
            422,
            f"body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): {JSON_HINT}",
        ) from None
    except RecursionError:
        raise BadInput(422, f"JSON nested too deeply: {JSON_HINT}") from None
    except ValueError as exc:  # e.g. an integer literal of more than 4300 digits
        raise BadInput(422, f"body is not usable JSON ({exc}): {JSON_HINT}") from None


def predict_request(obj: Any) -> tuple[list[str | list[Any]], int | None]:
    try:
        req = PredictRequest.model_validate(obj)
    except ValidationError as exc:
        raise BadInput(422, f"invalid request: {_problems(exc.errors())}; {JSON_HINT}") from None
    return req.images, req.top_k


def _sniff(body: bytes) -> str | None:
    """The form of an untyped body, from its first bytes."""
    if body.startswith(NPY_MAGIC):
        return "application/x-npy"
    if body.startswith(MAGIC) or body[8:12] == b"WEBP":
        return "image/unknown"
    if body.lstrip()[:1] in (b"{", b"["):
        return "application/json"
    return None


def _problems(errors: list[dict]) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
        for e in errors[:5]
    )


def _metrics():
    from ray.serve import metrics

    tags = ("model_version",)
    return {
        "requests": metrics.Counter(
            "scalelab_requests",
            description="Prediction requests by outcome.",
            tag_keys=("model_version", "status"),
        ),
        "images": metrics.Counter("scalelab_images", description="Images predicted.", tag_keys=tags),
        "latency": metrics.Histogram(
            "scalelab_predict_latency_ms",
            description="Time in the replica per request (ms).",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
            tag_keys=tags,
        ),
        "batch": metrics.Histogram(
            "scalelab_batch_size",
            description="Requests per model call.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
            tag_keys=tags,
        ),
        "swaps": metrics.Counter(
            "scalelab_model_swaps", description="Model versions swapped in.", tag_keys=tags
        ),
        "info": metrics.Gauge(
            "scalelab_model_info",
            description="1 for the version served.",
            tag_keys=("model_name", "model_version"),
        ),
    }


def load_predictor(cfg: ReplicaConfig, version: str | None = None, cache: Path | None = None) -> Predictor:
    """A local bundle, or a registry version (pinned, given, or the alias's) with verified weights."""
    if cfg.bundle_path:
        info = {"name": cfg.model_name or "local", "version": "local", "source": cfg.bundle_path}
        return Predictor.from_bundle(cfg.bundle_path, {**info, "samples": read_samples(cfg.bundle_path)})
    from scalelab.tracking.bundles import (
        connect,
        fetch_version_bundle,
        get_version,
        version_by_alias,
        version_info,
    )

    client = connect(cfg.tracking_uri)
    ver = version or cfg.version
    mv = (
        get_version(client, cfg.model_name, ver)
        if ver
        else version_by_alias(client, cfg.model_name, cfg.alias)
    )
    info = version_info(mv)
    info.update(
        alias=cfg.alias if not cfg.version else None, **run_links(client, cfg.tracking_uri, mv.run_id)
    )
    with tempfile.TemporaryDirectory(prefix=f"scalelab-serve-v{mv.version}-", dir=cache) as dest:
        bundle = fetch_version_bundle(client, mv, dest)
        info["samples"] = read_samples(bundle)  # held-out examples for the demo page
        return Predictor.from_bundle(bundle, info)  # weights now in memory


def run_links(client, tracking_uri: str | None, run_id: str | None) -> dict[str, str]:
    """Where to look at the model's training run: its MLflow UI page on a tracking server, else the
    command that opens the UI on the embedded store."""
    from scalelab.tracking.ui import run_url

    if not run_id:
        return {}
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        try:
            experiment_id = client.get_run(run_id).info.experiment_id
            return {"run_url": run_url(tracking_uri, experiment_id, run_id)}
        except Exception:  # noqa: BLE001 - lineage links are best effort
            pass
    return {"run_view_command": f"scalelab ui --run {run_id}"}


def current_alias_version(cfg: ReplicaConfig) -> str:
    from scalelab.tracking.bundles import connect, version_by_alias

    return str(version_by_alias(connect(cfg.tracking_uri), cfg.model_name, cfg.alias).version)


@serve.deployment(name="ModelServer")
@serve.ingress(api)
class ModelServer:
    def __init__(self) -> None:
        self.cfg = ReplicaConfig()
        self.predictor: Predictor | None = None
        self.loaded_at: float | None = None
        self.watcher: asyncio.Task | None = None
        self.last_poll_error: str | None = None
        self.swap_lock = asyncio.Lock()
        self.m = _metrics()
        # Forward passes run here, one at a time on cfg.threads intra-op threads: the replica's CPU
        # budget (asyncio's default pool would run up to cpu_count + 4 unbatched forwards at once).
        # Registry polls and model loads stay on the default pool, so they never queue behind
        # forward passes, nor these behind them.
        self.model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scalelab-model")
        _Limits.server = self  # one replica per process: the Guard answers the hot path here

    async def _in_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.model_pool, fn, *args)

    # ---- configuration and model swaps -------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        import os

        import torch

        cfg = ReplicaConfig.model_validate(user_config)
        torch.set_num_threads(cfg.threads)
        await self._in_model_thread(torch.set_num_threads, cfg.threads)  # OpenMP's setting is per thread
        env_key = os.environ.get(cfg.api_key_env)
        _Limits.api_key_sha256 = cfg.api_key_sha256 or (key_sha256(env_key) if env_key else None)
        _Limits.max_body_bytes = cfg.max_body_bytes
        _Limits.body_timeout_s = cfg.body_timeout_s
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        source_changed = (cfg.model_name, cfg.alias, cfg.version, cfg.bundle_path, cfg.tracking_uri) != (
            self.cfg.model_name,
            self.cfg.alias,
            self.cfg.version,
            self.cfg.bundle_path,
            self.cfg.tracking_uri,
        )
        self.cfg = cfg
        if source_changed or self.predictor is None:
            await self._swap(await asyncio.to_thread(load_predictor, cfg))
        if self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _swap(self, new: Predictor, why: str = "") -> None:
        async with self.swap_lock:
            old = self.predictor
            self.predictor = new  # in-flight batches keep the reference they started with
            self.loaded_at = time.time()
            name, version = new.info.get("name", ""), str(new.info.get("version"))
            if old is not None:
                self.m["info"].set(
                    0,
                    tags={
                        "model_name": old.info.get("name", ""),
                        "model_version": str(old.info.get("version")),
                    },
                )
            self.m["info"].set(1, tags={"model_name": name, "model_version": version})
            self.m["swaps"].inc(tags={"model_version": version})
            log.info("serving %s version %s%s", name, version, f" ({why})" if why else "")

    async def _watch(self) -> None:
        """Follow the alias: load a moved-to version beside the old one, then swap."""
        while True:
            await asyncio.sleep(self.cfg.poll_interval_s)
            cfg = self.cfg
            if cfg.bundle_path or cfg.version or not cfg.model_name or self.predictor is None:
                continue
            try:
                target = await asyncio.to_thread(current_alias_version, cfg)
                if target != str(self.predictor.info.get("version")):
                    started = time.perf_counter()
                    new = await asyncio.to_thread(load_predictor, cfg, target)
                    if cfg is self.cfg:  # not reconfigured meanwhile
                        await self._swap(
                            new, f"@{cfg.alias} moved; loaded in {time.perf_counter() - started:.1f} s"
                        )
                self.last_poll_error = None
            except Exception as exc:  # noqa: BLE001 - the registry being down must not stop serving
                self.last_poll_error = f"{type(exc).__name__}: {exc}"
                log.warning("alias poll failed, still serving the loaded version: %s", self.last_poll_error)

    def check_health(self) -> None:
        if self.watcher is not None and self.watcher.done():
            raise RuntimeError("the registry watcher stopped")

    # ---- inference -------------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, chunks: list[np.ndarray]) -> list[tuple[np.ndarray, Predictor]]:
        predictor = self.predictor
        version = str(predictor.info.get("version"))
        sizes = [len(c) for c in chunks]
        probs = await self._in_model_thread(predictor.predict_proba, np.concatenate(chunks))
        self.m["batch"].observe(len(chunks), tags={"model_version": version})
        self._count_ok(version, len(chunks), sum(sizes))  # once per batch: a metric call costs ~50 us
        parts = np.split(probs, np.cumsum(sizes)[:-1])
        return [(p, predictor) for p in parts]  # the reply names the version that computed it

    async def _infer(self, images: np.ndarray) -> tuple[np.ndarray, Predictor]:
        if self.cfg.batching:
            return await self._batched(images)
        predictor = self.predictor
        probs = await self._in_model_thread(predictor.predict_proba, images)
        self._count_ok(str(predictor.info.get("version")), 1, len(images))
        return probs, predictor

    def _count_ok(self, version: str, requests: int, images: int) -> None:
        self.m["images"].inc(images, tags={"model_version": version})
        self.m["requests"].inc(requests, tags={"model_version": version, "status": "ok"})

    async def _predict(self, images: list[np.ndarray] | np.ndarray, top_k: int | None) -> dict[str, Any]:
        """``images``: uint8 (H, W, C) arrays, or one (N, H, W, C) batch (a .npy body)."""
        started = time.perf_counter()
        if self.predictor is not None and self.predictor.task == "detection":
            return await self._detect(list(images), started)
        probs, predictor = await self._infer(images if isinstance(images, np.ndarray) else np.stack(images))
        version = str(predictor.info.get("version"))
        self.m["latency"].observe((time.perf_counter() - started) * 1000, tags={"model_version": version})
        k = top_k or self.cfg.top_k
        return {
            "model": {"name": predictor.info.get("name"), "version": version},
            "predictions": predictor.top_k(probs, k),
        }

    async def _detect(self, images: list[np.ndarray], started: float) -> dict[str, Any]:
        """Detection models: images keep their sizes (no stacking, no dynamic batching)."""
        predictor = self.predictor
        detections = await self._in_model_thread(predictor.detect, images)
        version = str(predictor.info.get("version"))
        self.m["latency"].observe((time.perf_counter() - started) * 1000, tags={"model_version": version})
        self.m["images"].inc(len(images), tags={"model_version": version})
        self.m["requests"].inc(tags={"model_version": version, "status": "ok"})
        return {"model": {"name": predictor.info.get("name"), "version": version}, "detections": detections}

    def _require_model(self) -> Predictor:
        if self.predictor is None:
            raise BadInput(503, "no model loaded yet; retry shortly (see /readyz)")
        return self.predictor

    def _check_count(self, n: int) -> None:
        if n == 0:
            raise BadInput(422, f"no images given: send at least one ({SEND_ONE_OF})")
        if n > self.cfg.max_images:
            raise BadInput(413, f"{n} images in one request exceeds the limit of {self.cfg.max_images}")

    @api.post(
        "/v1/predict",
        response_model=PredictResponse | DetectResponse,
        responses=ERRORS,
        summary="Classify images (JSON, image bytes, .npy batch or multipart files)",
        openapi_extra={"requestBody": PREDICT_BODY},
    )
    async def predict(self, request: Request, top_k: TopK = None) -> Response:
        """Top-k classes with probabilities for each image. The body's `Content-Type` says its form:
        `application/json` (`{"images": [base64 file | pixel array, ...]}`), `image/png|jpeg|bmp|webp`
        (the body is one image file), `application/x-npy` (`numpy.save` of a uint8 (N, H, W[, C])
        batch in the model's size) or `multipart/form-data` (image files, field `files`, repeatable).
        Several images in one request are scored in one forward pass, with other requests' images."""
        predictor = self._require_model()
        body = await request.body()  # already read and size-checked by the Guard
        if _media_type(request) == "multipart/form-data":
            images, body_top_k = await self._decode_form(request, predictor), None
        else:
            images, body_top_k = self._decode_body(_media_type(request), body, predictor)
        return json_response(await self._predict(images, body_top_k or top_k))

    async def answer_predict(self, scope, content_type: str, body: bytes, send) -> None:
        """``POST /v1/predict`` without FastAPI (see :func:`_is_hot_predict`): the answer, or the
        4xx, that :meth:`predict` and the ``BadInput`` handler give for the same request."""
        try:
            predictor = self._require_model()
            images, top_k = self._decode_body(_media_of(content_type), body, predictor)
            response = json_response(await self._predict(images, top_k))
        except BadInput as exc:
            response = JSONResponse({"error": exc.message}, status_code=exc.status)
        except Exception:  # as Starlette's ServerErrorMiddleware: a plain 500, the traceback in the log
            log.exception("POST /v1/predict failed")
            response = Response("Internal Server Error", status_code=500, media_type="text/plain")
        await response(scope, _body_read, send)

    @api.post(
        "/v1/predict/file",
        response_model=PredictResponse | DetectResponse,
        responses=ERRORS,
        summary="Classify uploaded image files (multipart)",
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": MULTIPART}}},
    )
    async def predict_file(self, request: Request, top_k: TopK = None) -> Response:
        """Top-k classes for each uploaded file (form field `files`, repeatable)."""
        predictor = self._require_model()
        if _media_type(request) != "multipart/form-data":
            raise BadInput(
                415, f"send multipart/form-data (curl -F files=@a.png), not {_media_type(request)!r}"
            )
        return json_response(await self._predict(await self._decode_form(request, predictor), top_k))

    def _decode_body(
        self, media: str, body: bytes, predictor: Predictor
    ) -> tuple[list[np.ndarray] | np.ndarray, int | None]:
        """A non-multipart body's images (uint8, the model's size and channels) by its media type;
        JSON's top_k."""
        if media in SNIFFED:  # curl -d / --data-binary without -H: look at the bytes
            media = _sniff(body) or media
        if media == "application/json" or media.endswith("+json"):
            return self._decode_json(body, predictor)
        if media in NPY_TYPES:  # one (N, H, W, C) batch, no per-image work
            return decode_npy(body, predictor.input, self.cfg.max_images, self.cfg.max_pixels), None
        if media.startswith("image/"):
            return [decode_image_bytes(body, predictor.input, self.cfg.max_pixels, "body")], None
        raise BadInput(415, f"Content-Type {media or '(none)'!r} is not accepted: {SEND_ONE_OF}")

    def _decode_json(self, body: bytes, predictor: Predictor) -> tuple[list[np.ndarray], int | None]:
        if not body.strip():
            raise BadInput(422, f'empty body: send {{"images": [...]}} as JSON ({SEND_ONE_OF})')
        items, top_k = read_predict_json(body)
        self._check_count(len(items))
        images = [
            decode_base64(item, predictor.input, self.cfg.max_pixels, f"images[{i}]")
            if isinstance(item, str)
            else decode_array(item, predictor.input, self.cfg.max_pixels, f"images[{i}]")
            for i, item in enumerate(items)
        ]
        return images, top_k

    async def _decode_form(self, request: Request, predictor: Predictor) -> list[np.ndarray]:
        try:
            form = await request.form(max_files=self.cfg.max_images + 1, max_fields=self.cfg.max_images + 16)
        except Exception as exc:  # noqa: BLE001 - python-multipart's parse errors are the client's body
            detail = (
                getattr(exc, "detail", None)
                or getattr(exc, "message", None)
                or str(exc)
                or type(exc).__name__
            )
            raise BadInput(
                413 if "too many" in str(detail).lower() else 422,
                f"malformed multipart body ({detail}); send image files as form fields named files "
                "(curl -F files=@a.png -F files=@b.png)",
            ) from None
        try:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            self._check_count(len(files))
            images = []
            for i, f in enumerate(files):
                raw = await f.read()
                where = f"files[{i}]" + (f" ({f.filename})" if f.filename else "")
                images.append(decode_image_bytes(raw, predictor.input, self.cfg.max_pixels, where))
            return images
        finally:
            await form.close()

    @api.get("/v1/model", responses=ERRORS, summary="The model being served")
    async def model_info(self) -> dict[str, Any]:
        """Name, version, alias, lineage (run id, data version, git commit), input and classes."""
        p = self._require_model()
        info = {k: v for k, v in p.info.items() if k not in ("tags", "samples")}
        return {
            **info,
            "input": {
                "image_size": p.input.image_size,
                "channels": p.input.channels,
                "mean": list(p.input.mean),
                "std": list(p.input.std),
            },
            "classes": list(p.classes),
            "task": p.task,
            "loaded_at": self.loaded_at,
            "watching": None if (self.cfg.version or self.cfg.bundle_path) else self.cfg.alias,
            "poll_error": self.last_poll_error,
            "limits": {
                "max_images": self.cfg.max_images,
                "max_pixels": self.cfg.max_pixels,
                "max_body_bytes": self.cfg.max_body_bytes,
                "top_k": self.cfg.top_k,
            },
            "batching": {
                "enabled": self.cfg.batching,
                "max_batch_size": self.cfg.max_batch_size,
                "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s,
            },
        }

    @api.get("/v1/samples", responses=ERRORS, summary="Held-out test images with their true labels")
    async def samples(self) -> dict[str, Any]:
        """A few test-split images the model never trained on (PNG, base64) and their true labels."""
        p = self._require_model()
        return {"version": str(p.info.get("version")), "samples": p.info.get("samples", [])}

    @api.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", responses={503: {"model": ErrorResponse}}, summary="Readiness: a model is loaded")
    async def readyz(self):
        if self.predictor is None:
            return JSONResponse({"error": "model not loaded yet"}, status_code=503)
        return {"status": "ready", "version": str(self.predictor.info.get("version"))}

    @api.get("/", response_class=HTMLResponse, summary="Demo page")
    async def demo(self) -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())
