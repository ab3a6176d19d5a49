"""The Ray Serve application: a FastAPI ingress in front of a model loaded from the registry.

One replica = one process holding one :class:`Predictor`. Requests are decoded and validated
on the replica's event loop; the model runs in a worker thread (torch releases the GIL), fed by
``@serve.batch`` so concurrent requests share one forward pass. The alias is polled in the
background and a new version is loaded beside the old one and swapped in by reference, so no
request ever sees a half-loaded model. ``reconfigure`` (a ``user_config`` change) applies new
limits, batching and auth in place, and pins or unpins a version.
"""

import asyncio
import hmac
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from scalelab.artifacts.predictor import Predictor
from scalelab.artifacts.preprocess import BadInput, decode_array, decode_base64, decode_image_bytes
from scalelab.data.samples import read_samples
from scalelab.serve.settings import ReplicaConfig, key_sha256

log = logging.getLogger("ray.serve")
PUBLIC_PATHS = {"/healthz", "/readyz", "/", "/favicon.ico"}
STATIC = Path(__file__).parent / "static"


class PredictRequest(BaseModel):
    images: list[str | list[Any]] = Field(
        ...,
        description="Images: base64 PNG/JPEG/BMP (a data: URL is fine) or nested lists (H, W) / (H, W, C) "
        "of pixel values in [0, 255]. Any size or colour mode; converted to the model's input.",
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


ERRORS = {code: {"model": ErrorResponse} for code in (401, 413, 415, 422, 503)}

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
    api_key_sha256: str | None = None


class _TooLarge(Exception):
    pass


class Guard:
    """Pure ASGI middleware: API key (401) and body size (413) before any parsing happens."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if _Limits.api_key_sha256 and scope.get("path", "") not in PUBLIC_PATHS:
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not token or not hmac.compare_digest(key_sha256(token), _Limits.api_key_sha256):
                return await _send_json(
                    send,
                    401,
                    "missing or wrong API key: send Authorization: Bearer <key>",
                    {"www-authenticate": "Bearer"},
                )
        limit = _Limits.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_json(send, 400, "invalid Content-Length header")
            if int(length) > limit:
                return await _send_json(send, 413, f"request body of {int(length):,} bytes exceeds {limit:,}")
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, f"request body exceeds {limit:,} bytes")


async def _send_json(send, status: int, message: str, extra: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


api.add_middleware(Guard)


@api.exception_handler(BadInput)
async def _bad_input(_: Request, exc: BadInput) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
        for e in exc.errors()[:5]
    )
    return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)


@api.exception_handler(_TooLarge)
async def _too_large(_: Request, exc: _TooLarge) -> JSONResponse:
    return JSONResponse({"error": f"request body exceeds {_Limits.max_body_bytes:,} bytes"}, status_code=413)


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

    # ---- configuration and model swaps -------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        import os

        import torch

        cfg = ReplicaConfig.model_validate(user_config)
        torch.set_num_threads(cfg.threads)
        env_key = os.environ.get(cfg.api_key_env)
        _Limits.api_key_sha256 = cfg.api_key_sha256 or (key_sha256(env_key) if env_key else None)
        _Limits.max_body_bytes = cfg.max_body_bytes
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

    async def _swap(self, new: Predictor) -> None:
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
            log.info("serving %s version %s", name, version)

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
                    new = await asyncio.to_thread(load_predictor, cfg, target)
                    if cfg is self.cfg:  # not reconfigured meanwhile
                        await self._swap(new)
                self.last_poll_error = None
            except Exception as exc:  # noqa: BLE001 - the registry being down must not stop serving
                self.last_poll_error = f"{type(exc).__name__}: {exc}"
                log.warning("alias poll failed, still serving the loaded version: %s", self.last_poll_error)

    def check_health(self) -> None:
        if self.watcher is not None and self.watcher.done():
            raise RuntimeError("the registry watcher stopped")

    # ---- inference -------------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, chunks: list[np.ndarray]) -> list[tuple[np.ndarray, Predictor]]:
        predictor = self.predictor
        version = str(predictor.info.get("version"))
        sizes = [len(c) for c in chunks]
        probs = await asyncio.to_thread(predictor.predict_proba, np.concatenate(chunks))
        self.m["batch"].observe(len(chunks), tags={"model_version": version})
        parts = np.split(probs, np.cumsum(sizes)[:-1])
        return [(p, predictor) for p in parts]  # the reply names the version that computed it

    async def _infer(self, images: np.ndarray) -> tuple[np.ndarray, Predictor]:
        if self.cfg.batching:
            return await self._batched(images)
        predictor = self.predictor
        return await asyncio.to_thread(predictor.predict_proba, images), predictor

    async def _predict(self, images: list[np.ndarray], top_k: int | None) -> dict[str, Any]:
        started = time.perf_counter()
        if self.predictor is not None and self.predictor.task == "detection":
            return await self._detect(images, started)
        probs, predictor = await self._infer(np.stack(images))
        version = str(predictor.info.get("version"))
        self.m["latency"].observe((time.perf_counter() - started) * 1000, tags={"model_version": version})
        self.m["images"].inc(len(images), tags={"model_version": version})
        self.m["requests"].inc(tags={"model_version": version, "status": "ok"})
        k = top_k or self.cfg.top_k
        return {
            "model": {"name": predictor.info.get("name"), "version": version},
            "predictions": predictor.top_k(probs, k),
        }

    async def _detect(self, images: list[np.ndarray], started: float) -> dict[str, Any]:
        """Detection models: images keep their sizes (no stacking, no dynamic batching)."""
        predictor = self.predictor
        detections = await asyncio.to_thread(predictor.detect, images)
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
            raise BadInput(422, "no images given: send at least one")
        if n > self.cfg.max_images:
            raise BadInput(413, f"{n} images in one request exceeds the limit of {self.cfg.max_images}")

    @api.post(
        "/v1/predict",
        response_model=PredictResponse | DetectResponse,
        responses=ERRORS,
        summary="Classify images (JSON)",
    )
    async def predict(self, body: PredictRequest) -> dict[str, Any]:
        """Top-k classes with probabilities for each image (base64 image files or pixel arrays)."""
        predictor = self._require_model()
        self._check_count(len(body.images))
        images = [
            decode_base64(item, predictor.input, self.cfg.max_pixels, f"images[{i}]")
            if isinstance(item, str)
            else decode_array(item, predictor.input, self.cfg.max_pixels, f"images[{i}]")
            for i, item in enumerate(body.images)
        ]
        return await self._predict(images, body.top_k)

    @api.post(
        "/v1/predict/file",
        response_model=PredictResponse | DetectResponse,
        responses=ERRORS,
        summary="Classify uploaded image files (multipart)",
    )
    async def predict_file(self, files: list[UploadFile] = File(..., description="PNG, JPEG or BMP files.")):
        """Top-k classes for each uploaded file (form field `files`, repeatable)."""
        predictor = self._require_model()
        self._check_count(len(files))
        images = []
        for i, f in enumerate(files):
            raw = await f.read()
            images.append(
                decode_image_bytes(raw, predictor.input, self.cfg.max_pixels, f.filename or f"files[{i}]")
            )
        return await self._predict(images, None)

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
