"""Process health, node list with pool state, and C-ECHO per node.

``/health`` is open (a liveness probe says nothing about the PACS); the node
list and C-ECHO need a credential when authentication is on, and list or reach
only the nodes the caller may use.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.auth import PrincipalDep
from app.api.deps import GatewayDep, NodeDep
from app.services.health import echo

router = APIRouter(tags=["health"])


@router.get("/health", summary="Process health")
async def health() -> dict[str, str]:
    """Liveness: 200 as long as the process serves HTTP. It does not contact any PACS."""
    return {"status": "ok"}


@router.get("/pacs", summary="Configured PACS nodes and the state of their association pools")
async def nodes(gateway: GatewayDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    """The configured PACS nodes the caller may use, which one is the default, and the state
    of each association pool (in use, idle, waiting, opened, failed, discarded, last error)."""
    default = gateway.settings.default_node
    return [
        {
            "name": node.name,
            "ae_title": node.ae_title,
            "host": node.host,
            "port": node.port,
            "default": default is not None and node.name == default.name,
            "query_model": node.query_model,
            "retrieve": node.retrieve,
            "tls": node.tls,
            "pool": gateway.pool(node).state().as_dict(),
        }
        for node in gateway.settings.nodes
        if principal.may_use(node)
    ]


@router.get("/pacs/{node}/echo", summary="C-ECHO the node through the association pool")
async def echo_node(node: NodeDep, gateway: GatewayDep) -> dict[str, Any]:
    """A C-ECHO to the node through its association pool, with the round trip time: checks that
    the PACS is up and accepts the gateway's AE title."""
    rtt = await echo(gateway, node)
    return {"node": node.name, "status": "ok", "rtt_ms": round(rtt * 1000, 2)}
