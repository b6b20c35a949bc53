"""HEAD answered as GET: a streamed body stops after the headers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from app.api.middleware import HeadAsGet


def test_head_stops_a_streamed_body_after_the_headers() -> None:
    produced: list[int] = []
    closed = asyncio.Event()

    async def parts() -> AsyncIterator[bytes]:
        try:
            for i in range(1000):
                produced.append(i)
                yield b"x" * 1024
                await asyncio.sleep(0)
        finally:
            closed.set()

    async def stream(_request: Any) -> StreamingResponse:
        return StreamingResponse(parts(), media_type="application/octet-stream")

    app = HeadAsGet(Starlette(routes=[Route("/s", stream)]))
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        async def receive() -> dict[str, Any]:
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "HEAD",
            "scheme": "http",
            "path": "/s",
            "raw_path": b"/s",
            "query_string": b"",
            "root_path": "",
            "headers": [],
            "server": ("test", 80),
            "client": ("test", 1),
        }
        await app(scope, receive, send)
        await asyncio.wait_for(closed.wait(), 5)

    asyncio.run(run())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200 and sent[1]["body"] == b""
    # The generator was left after its first part, not drained.
    assert len(produced) < 5
