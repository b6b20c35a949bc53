"""The OHIF viewer at ``/viewer/``: its static files, a generated ``app-config.js``, SPA routing."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, RedirectResponse

from app.config import Settings
from app.errors import NotFound
from app.viewer import (
    APP_CONFIG,
    INDEX,
    ViewerFiles,
    app_config,
    data_sources,
    media_type,
)

MOUNT = "/viewer"

# index.html and the configuration name the current build and settings: always
# revalidate.  Everything else is named by content hash or versioned with the package.
_NO_CACHE = {"Cache-Control": "no-cache"}


def build_router(settings: Settings, dist: Path) -> APIRouter:
    """Routes serving the built viewer in *dist* for the gateway configured by *settings*."""
    files = ViewerFiles(dist)
    sources = data_sources(settings.nodes, settings.default_node)
    router = APIRouter(tags=["OHIF viewer"])

    def prefix(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}{MOUNT}/"

    @router.api_route(MOUNT, methods=["GET", "HEAD"], include_in_schema=False)
    async def viewer_root(request: Request) -> Response:
        return RedirectResponse(prefix(request), status_code=308)

    @router.api_route(f"{MOUNT}/{APP_CONFIG}", methods=["GET", "HEAD"], include_in_schema=False)
    async def viewer_config(request: Request) -> Response:
        config = app_config(prefix(request).rstrip("/"), sources, credentials=settings.auth_enabled)
        return Response(config, media_type=media_type(Path(APP_CONFIG)), headers=_NO_CACHE)

    @router.api_route(
        MOUNT + "/{relative:path}",
        methods=["GET", "HEAD"],
        summary="The OHIF viewer (static files)",
    )
    async def viewer_file(request: Request, relative: str) -> Response:
        path = files.resolve(relative)
        if path is None:
            if not _is_client_route(request, relative):
                raise NotFound(f"no file {relative!r} in the viewer")
            # Client-side routes (/viewer/viewer?StudyInstanceUIDs=...) are the app's own.
            path = files.dist / INDEX
        return await _serve(files, path, prefix(request))

    return router


def _is_client_route(request: Request, relative: str) -> bool:
    """A page address the single-page app routes itself, rather than a missing asset."""
    last = relative.rsplit("/", 1)[-1]
    return not relative or "." not in last or "text/html" in request.headers.get("accept", "")


async def _serve(files: ViewerFiles, path: Path, prefix: str) -> Response:
    ctype = media_type(path)
    headers = _NO_CACHE if path.name == INDEX else None
    patched = await asyncio.to_thread(files.patched, path, prefix)
    if patched is not None:
        return Response(patched, media_type=ctype, headers=headers)
    return FileResponse(path, media_type=ctype, headers=headers)
