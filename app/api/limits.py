"""Requests refused before routing: over-long URLs and headers, request bodies, and
paths that try to climb out of where they are (encoded slashes, dot segments, NUL).

Only POST (a job request) reads a body, and a small one: elsewhere a body is
refused rather than read.  uvicorn bounds what it buffers itself; these limits are the
gateway's own, the same whichever HTTP parser uvicorn picked, and answered
with a JSON body like every other error.
"""

from __future__ import annotations

import json
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Receive, Scope, Send

MAX_HEADERS = 100
MAX_BODY = 16384
# No resource of the gateway has these in its path; a client that sends them is probing.
_TRAVERSAL = (b"%2f", b"%5c", b"%00", b"\\", b"\x00")


class RequestLimits:
    """414 for a long URL, 431 for large or many headers, 413 for an unwanted or large body,
    411 for a POST body without a length, 400 for a path that climbs."""

    def __init__(self, app: ASGIApp, *, max_url_bytes: int, max_header_bytes: int) -> None:
        self.app = app
        self.max_url_bytes = max_url_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                status, message = refusal
                error = {"error": "RequestRefused", "message": message}
                if status == 400:
                    error.update(error="InvalidRequest", parameter="path")
                body = json.dumps(error).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        path: bytes = scope.get("raw_path") or scope["path"].encode()
        low = path.lower()
        climbs = any(unquote_to_bytes(seg) == b".." for seg in low.split(b"/"))
        if climbs or any(t in low for t in _TRAVERSAL):
            return 400, "the path holds an encoded slash or backslash, a NUL or a '..' segment"
        url = len(path) + len(scope.get("query_string", b""))
        if url > self.max_url_bytes:
            return 414, f"the request URL is longer than {self.max_url_bytes} bytes"
        headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
        if len(headers) > MAX_HEADERS:
            return 431, f"more than {MAX_HEADERS} request headers"
        if sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes:
            return 431, f"the request headers are larger than {self.max_header_bytes} bytes"
        length = next((v.strip() for k, v in headers if k == b"content-length"), b"0")
        chunked = any(k == b"transfer-encoding" for k, _ in headers)
        if scope["method"] != "POST":
            if chunked or length != b"0":
                return 413, f"{scope['method']} requests take no body"
            return None
        # POST /jobs: a few hundred bytes of JSON, its length said up front.
        if chunked:
            return 411, "a request body needs a Content-Length"
        if not length.isdigit() or int(length) > MAX_BODY:
            return 413, f"the request body is larger than {MAX_BODY} bytes"
        return None
