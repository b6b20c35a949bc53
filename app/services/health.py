"""C-ECHO of a node, for the health endpoints and the CLI."""

from __future__ import annotations

from app.config import PacsNode
from app.dimse.find import c_echo
from app.runtime import Gateway


async def echo(gateway: Gateway, node: PacsNode) -> float:
    """Round-trip time of a C-ECHO to *node*, in seconds."""
    return await c_echo(gateway.pool(node))
