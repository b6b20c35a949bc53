"""Request-scoped dependencies: the gateway, the node named in the URL, disconnect watching."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from app.api.audit import note
from app.api.auth import PrincipalDep
from app.config import PacsNode
from app.errors import Forbidden, UnknownNode
from app.runtime import Gateway

T = TypeVar("T")


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def get_node(request: Request, gateway: GatewayDep, principal: PrincipalDep) -> PacsNode:
    """The node of ``/pacs/{node}/...``, or the default node under ``/dicomweb``,
    once the caller is known to be allowed there (401 and 403 come first)."""
    name = request.path_params.get("node")
    try:
        node = gateway.node(name)
    except UnknownNode:
        if principal.may_use_any():
            raise
        # Only to those who may use every node: others cannot probe node names.
        raise Forbidden(f"{principal.name!r} may not use PACS node {name!r}") from None
    note(request, node=node.name)
    if not principal.may_use(node):
        raise Forbidden(f"{principal.name!r} may not use PACS node {node.name!r}")
    return node


NodeDep = Annotated[PacsNode, Depends(get_node)]


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready."""


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await *work*, cancelling it if the client disconnects first.

    Cancelling reaches the running C-FIND, which then sends C-CANCEL instead of
    letting the PACS finish an answer nobody will read.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done():
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
