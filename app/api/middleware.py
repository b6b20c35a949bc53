"""The request id and the HTTP metrics, as one pure ASGI middleware.

Pure ASGI (not ``BaseHTTPMiddleware``) so streamed bodies pass through
untouched, the request's context variables stay those of the handler, and the
time measured ends with the last body byte of a streamed retrieve.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import request_id
from app.metrics import Metrics

HEADER = "X-Request-ID"
# A client's id is kept if it is short and plain: it goes into every log line.
_ACCEPTABLE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1").strip()
            return text if _ACCEPTABLE_ID.match(text) else None
    return None


def route_template(scope: Scope) -> str:
    """The path with each path parameter's value put back as ``{name}``:
    ``/pacs/{node}/dicomweb/studies/{study}``; ``unmatched`` when no route took it.

    Rebuilt from the path rather than read from the route object, which for an
    included router holds the path without its prefix.
    """
    if scope.get("route") is None:
        return "unmatched"
    path: str = scope["path"]
    params = {str(v): k for k, v in (scope.get("path_params") or {}).items() if str(v)}
    tail = ""
    for value, name in params.items():
        # A {name:path} parameter spans several segments: it is the path's tail.
        if "/" in value and path.endswith("/" + value):
            path, tail = path[: -len(value) - 1], "/{" + name + "}"
            break
    segments = ["{" + params[s] + "}" if s in params else s for s in path.split("/")]
    return "/".join(segments) + tail


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _incoming_id(scope) or uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500
        sent = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message).append(HEADER, rid)
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.observe_http(
                scope["method"], route_template(scope), status, time.perf_counter() - started, sent
            )
            request_id.reset(token)


class _HeadAnswered(Exception):
    """The headers of a HEAD are out: what would follow is a body nobody reads."""


class HeadAsGet:
    """HEAD answered as the GET of the same URL, without its body.

    RFC 9110 §9.1 asks every general-purpose server to support HEAD wherever it
    supports GET; FastAPI routes list GET only and would answer 405.  The
    request runs as a GET so its status and headers are the GET's own.  The
    first body message after the headers stops the GET, as a client that
    leaves would: a streamed retrieve on a cold cache lets go of its C-MOVE
    (C-CANCEL when nobody else waits) instead of running to its end unread.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] != "HEAD":
            await self.app(scope, receive, _allow_head(send))
            return
        ended = False

        async def send_head(message: Message) -> None:
            nonlocal ended
            if ended:
                if message["type"] == "http.response.body" and message.get("more_body"):
                    raise _HeadAnswered
                return
            await send(message)
            if message["type"] == "http.response.start":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                ended = True

        with contextlib.suppress(_HeadAnswered):
            await self.app({**scope, "method": "GET"}, receive, send_head)


def _allow_head(send: Send) -> Send:
    """A 405's ``Allow`` names HEAD wherever it names GET (RFC 9110 §15.5.6)."""

    async def send_allowing_head(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 405:
            headers = MutableHeaders(scope=message)
            allowed = [m.strip() for m in headers.get("allow", "").split(",") if m.strip()]
            if "GET" in allowed and "HEAD" not in allowed:
                headers["allow"] = ", ".join([*allowed, "HEAD"])
        await send(message)

    return send_allowing_head
