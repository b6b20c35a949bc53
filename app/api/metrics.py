"""``GET /metrics``: the Prometheus text exposition of this app's registry."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.auth import PrincipalDep
from app.metrics import Metrics

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request, principal: PrincipalDep) -> Response:
    """Needs a credential when authentication is on (node names and pool state are in it;
    Prometheus sends one with ``authorization: {credentials: KEY}``).

    Requests by route and status with latencies, DIMSE operations by node, type
    and status with latencies, association pools (in use, idle, waiting) per node,
    the instance cache (bytes, hits, misses) and response bytes sent, in the
    Prometheus text format. Metric names are listed in `docs/architecture.md`."""
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
