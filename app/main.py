"""The FastAPI application: ``create_app(settings)`` wires routers, errors and the lifespan."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import __version__
from app.api import (
    errors,
    health,
    jobs,
    metrics,
    nifti,
    openapi,
    rendered,
    retrieve,
    search,
    viewer,
)
from app.api.audit import AuditLog, AuditMiddleware
from app.api.limits import RequestLimits
from app.api.middleware import HEADER as REQUEST_ID_HEADER
from app.api.middleware import HeadAsGet, ObservabilityMiddleware
from app.api.parameters import IgnoredParameterWarnings
from app.auth import Authenticator
from app.config import Settings, load_settings
from app.metrics import Metrics
from app.runtime import Gateway
from app.services.jobs import JobManager

DESCRIPTION = """\
QIDO-RS (search) and WADO-RS (retrieve, metadata, frames, bulk data, rendered
images, thumbnails) for PACS that only speak DIMSE, plus a series as NIfTI.
Every DICOMweb route exists twice: under `/dicomweb` for the default PACS node
and under `/pacs/{node}/dicomweb` for a named one (`GET /pacs` lists them).

Errors are JSON: `{"error": "InvalidQuery", "message": "...", "parameter": "StudyDate"}`.
Each response carries an `X-Request-ID` (the client's, or a new one) that also
appears in the gateway's log lines for that request, DIMSE operations included.
"""

log = logging.getLogger(__name__)
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the gateway's pools live from lifespan start to end."""
    settings = settings or load_settings()
    registry = Metrics()
    audit = (
        AuditLog(settings.audit_log, query_values=settings.audit_query_values)
        if settings.audit_log is not None
        else None
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.auth_enabled and settings.http_host not in _LOOPBACK:
            log.warning(
                "authentication is off and the gateway listens on %s: anyone who can reach "
                "it can search and retrieve (configure [[api_keys]] or [oidc])",
                settings.http_host,
            )
        # Opened first: a gateway that cannot write its audit log does not serve.
        if audit is not None:
            audit.open()
        try:
            gateway = Gateway(settings)
            registry.instrument(gateway)
            await gateway.start()
            app.state.gateway = gateway
            job_manager = JobManager(gateway)
            job_manager.start()
            app.state.jobs = job_manager
            # Move start-up objects out of the collector's reach: a full collection
            # otherwise walks them on every large answer (about 30 ms per 1000 matches).
            gc.freeze()
            try:
                yield
            finally:
                await job_manager.close()
                await gateway.close()
        finally:
            if audit is not None:
                audit.close()

    app = FastAPI(
        title="dimse-gateway",
        version=__version__,
        summary="DICOMweb (QIDO-RS, WADO-RS) in front of DIMSE-only PACS",
        description=DESCRIPTION,
        lifespan=lifespan,
        # Served by openapi.install_docs without a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = registry
    registry.watch(lambda: getattr(app.state, "gateway", None))
    # Set when a shutdown's grace period is over (app/serving.py): streaming
    # answers then end at the next part boundary, marked incomplete.
    app.state.draining = threading.Event()
    app.state.authenticator = Authenticator(settings)
    errors.install(app)
    openapi.install(app)
    openapi.install_docs(app)
    # Innermost first: ignored query parameters become Warnings (sharing the
    # router's scope), HEAD runs as GET below the rest (which see it as HEAD),
    # the audit sees the route and every answer, CORS decorates them all, and
    # the request limits refuse before anything else runs.
    app.add_middleware(IgnoredParameterWarnings)
    app.add_middleware(HeadAsGet)
    if audit is not None:
        app.add_middleware(AuditMiddleware, log=audit)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["*"],
        # Paging and partial-result notes travel in Warning (PS3.18 §8.3.4.4).
        expose_headers=[
            "Warning",
            "Content-Location",
            "Location",
            REQUEST_ID_HEADER,
            "WWW-Authenticate",
            "Retry-After",
        ],
    )
    app.add_middleware(
        RequestLimits,
        max_url_bytes=settings.max_url_bytes,
        max_header_bytes=settings.max_header_bytes,
    )
    # Outside CORS, so that every answer (preflights too) has its request id.
    app.add_middleware(ObservabilityMiddleware, metrics=registry)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(search.router, prefix="/dicomweb")
    app.include_router(search.router, prefix="/pacs/{node}/dicomweb")
    app.include_router(retrieve.router, prefix="/dicomweb")
    app.include_router(retrieve.router, prefix="/pacs/{node}/dicomweb")
    app.include_router(rendered.router, prefix="/dicomweb")
    app.include_router(rendered.router, prefix="/pacs/{node}/dicomweb")
    app.include_router(nifti.router, prefix="/dicomweb")
    app.include_router(nifti.router, prefix="/pacs/{node}/dicomweb")
    app.include_router(jobs.create_router, prefix="/dicomweb")
    app.include_router(jobs.create_router, prefix="/pacs/{node}/dicomweb")
    app.include_router(jobs.router)
    if settings.viewer_dir is not None:
        app.include_router(viewer.build_router(settings, settings.viewer_dir))
    return app
