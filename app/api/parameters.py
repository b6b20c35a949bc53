"""Query parameters a WADO-RS resource does not support (PS3.18 §8.3).

"The origin server shall ignore any unsupported Query Parameters ... and may
return a response containing appropriate warning": each resource's router
names what it supports, an unknown name is recorded in the request's scope by
a dependency, and ``IgnoredParameterWarnings`` adds one ``Warning`` per name to
whatever answer the request gets.  A supported parameter with an invalid value
is refused (400) where that parameter is parsed.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SERVICE = "dimse-gateway"
_SCOPE_KEY = "dimse_gateway.ignored_parameters"

# PS3.18 §8.3.3 (content negotiation) applies to every retrieve resource.
RETRIEVE = frozenset({"accept", "charset"})
# §8.3.5.1: the rendering parameters, thumbnails included.
RENDERED = RETRIEVE | {"annotation", "quality", "viewport", "window", "iccprofile"}


def _printable(name: str) -> str:
    # The name goes into a header: no control characters, nothing beyond ASCII.
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in name[:40])


def ignore_unsupported(supported: frozenset[str]) -> Callable[[Request], None]:
    """A dependency recording the query parameters outside *supported*."""

    def record(request: Request) -> None:
        names = sorted({name for name in request.query_params if name.lower() not in supported})
        if names:
            request.scope[_SCOPE_KEY] = [_printable(name) for name in names]

    return record


class IgnoredParameterWarnings:
    """Adds ``Warning: 299 dimse-gateway: The query parameter 'x' is not
    supported and was ignored.`` for each name a route recorded.

    Innermost of the middlewares: it shares the scope the router fills in.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_warnings(message: Message) -> None:
            if message["type"] == "http.response.start" and scope.get(_SCOPE_KEY):
                headers = MutableHeaders(scope=message)
                for name in scope[_SCOPE_KEY]:
                    headers.append(
                        "Warning",
                        f"299 {SERVICE}: The query parameter '{name}' is not supported "
                        "and was ignored.",
                    )
            await send(message)

        await self.app(scope, receive, send_with_warnings)
