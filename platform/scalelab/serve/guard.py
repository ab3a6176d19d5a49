"""The ingress guard: refuses, with a clear 4xx, what Ray Serve's own HTTP layer would answer with a 500.

Ray Serve reads a few request headers itself, before any application code runs: ``x-request-id``,
``x-request-timeout-seconds``, ``x-request-disconnect-disabled``, ``serve_multiplexed_model_id``, the
session-id header (``x-session-id``) and the tracing headers. It decodes them as UTF-8, in the
proxy (default ingress) or in the replica's own HTTP server (HAProxy ingress, where HAProxy forwards
straight to replicas), and a byte that is not UTF-8 there is an unhandled exception: a 500. A
websocket upgrade to an app without websocket routes gets an empty 403 from uvicorn.

Both ingresses wrap their ASGI app in the Starlette middlewares returned by the function named in
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (read when the proxy or replica process starts, so it
must be in the environment of the Ray cluster: ``ray start`` / ``ray.init``). Point it at
:func:`ingress_middlewares` (see :data:`PROXY_CALLBACK_ENV`) and this guard runs first, on the raw
header bytes. It imports nothing heavy: it is loaded into every proxy process.
"""

from __future__ import annotations

import json
import os

#: The environment a Ray cluster must start with for the guard to run in its proxies and replicas.
PROXY_CALLBACK_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "scalelab.serve.guard:ingress_middlewares"}


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


#: Headers Ray Serve decodes as UTF-8 itself (names normalised: lower case, ``-`` -> ``_``).
RAY_READ_HEADERS = frozenset(
    _norm(h)
    for h in (
        "x-request-id",
        "x-request-timeout-seconds",
        "x-request-disconnect-disabled",
        "serve_multiplexed_model_id",
        os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY", "x-session-id"),
        "traceparent",
        "tracestate",
    )
)


def header_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """What is wrong with the raw request headers for Ray Serve, or None when they are fine."""
    for raw_name, raw_value in headers:
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            return (
                f"header name {raw_name[:40]!r} is not ASCII: header names must be ASCII tokens "
                "(RFC 9110); rename or drop the header"
            )
        if _norm(name) in RAY_READ_HEADERS:
            try:
                raw_value.decode("utf-8")
            except UnicodeDecodeError:
                return (
                    f"header {name} has a value that is not valid UTF-8 ({raw_value[:40]!r}); "
                    "send it as ASCII (or UTF-8) text, or leave the header out"
                )
    return None


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


async def send_error(send, status: int, message: str, extra: dict[str, str] | None = None) -> None:
    """A complete JSON error response ``{"error": message}`` on an HTTP scope."""
    body = error_body(message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


WEBSOCKET_REFUSED = (
    "this server has no websocket endpoints: send images with an HTTP POST to /v1/predict "
    "(JSON, image bytes, .npy or multipart; see /openapi.json)"
)


async def refuse_websocket(scope, receive, send, message: str = WEBSOCKET_REFUSED, status: int = 400) -> None:
    """Deny a websocket handshake with an HTTP error that has a body (ASGI "websocket denial
    response"); servers without that extension close it (uvicorn then answers 403)."""
    first = await receive()  # websocket.connect
    if first.get("type") != "websocket.connect":
        return
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = error_body(message)
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})


class HeaderGuard:
    """Pure ASGI middleware for Ray Serve's ingress: 400 for header bytes Ray cannot decode, a clear
    4xx for websocket upgrades. Everything else passes through untouched."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        problem = header_problem(scope.get("headers") or [])
        if not problem and not str(scope.get("path", "/")).startswith("/"):
            problem = (
                f"request target {scope.get('path', '')[:40]!r} is not a path: send e.g. POST /v1/predict"
            )
        if kind == "websocket":
            return await refuse_websocket(
                scope, receive, send, f"{problem}" if problem else WEBSOCKET_REFUSED
            )
        if problem:
            return await send_error(send, 400, problem)
        return await self.app(scope, receive, send)


def ingress_middlewares() -> list:
    """``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` target: the middlewares Ray Serve's ingress applies."""
    from starlette.middleware import Middleware

    return [Middleware(HeaderGuard)]
