"""Rendered and thumbnail resources (PS3.18 §10.4.1.1.3-4, §8.3.5), for every level."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.api import openapi, parameters
from app.api.deps import GatewayDep, NodeDep
from app.api.retrieve import frame_numbers
from app.cache import CachedInstance
from app.config import PacsNode
from app.dicomweb import multipart
from app.dicomweb.accept import negotiate_rendered
from app.dicomweb.query import check_uid
from app.errors import GatewayError, NotFound
from app.render.encode import RenderedType
from app.render.params import RenderParams, check_annotation, check_iccprofile, parse
from app.runtime import Gateway
from app.services import rendering
from app.services.retrieve import Delivery
from app.services.studies import series_of_study

router = APIRouter(
    tags=["WADO-RS rendered"],
    dependencies=[Depends(parameters.ignore_unsupported(parameters.RENDERED))],
)

SERVICE = "dimse-gateway"
# Thumbnails without a viewport fit this box (they are never enlarged).
THUMBNAIL_BOX = 256

WindowParam = Annotated[str | None, Query(description=openapi.WINDOW)]
ViewportParam = Annotated[str | None, Query(description=openapi.VIEWPORT)]
QualityParam = Annotated[str | None, Query(description=openapi.QUALITY)]
AnnotationParam = Annotated[str | None, Query(description=openapi.ANNOTATION)]
IccProfileParam = Annotated[str | None, Query(description=openapi.ICCPROFILE)]


def _media_type(request: Request) -> RenderedType:
    accept = request.headers.get("accept")
    return RenderedType(negotiate_rendered(accept, request.query_params.getlist("accept")))


@dataclass(frozen=True)
class View:
    """How a request wants its image: the rendering parameters and the media type."""

    params: RenderParams
    media_type: RenderedType


def _check_unapplied(annotation: str | None, iccprofile: str | None) -> None:
    if annotation is not None:
        check_annotation(annotation)
    if iccprofile is not None:
        check_iccprofile(iccprofile)


def _rendered_view(
    request: Request,
    window: WindowParam = None,
    viewport: ViewportParam = None,
    quality: QualityParam = None,
    annotation: AnnotationParam = None,
    iccprofile: IccProfileParam = None,
) -> View:
    _check_unapplied(annotation, iccprofile)
    return View(parse(window, viewport, quality), _media_type(request))


def _thumbnail_view(
    request: Request,
    window: WindowParam = None,
    viewport: ViewportParam = None,
    quality: QualityParam = None,
    annotation: AnnotationParam = None,
    iccprofile: IccProfileParam = None,
) -> View:
    _check_unapplied(annotation, iccprofile)
    params = parse(window, viewport, quality, default_viewport=THUMBNAIL_BOX)
    return View(params, _media_type(request))


# Parameters are checked (400 naming the parameter, 406) before anything is fetched.
RenderedView = Annotated[View, Depends(_rendered_view)]
ThumbnailView = Annotated[View, Depends(_thumbnail_view)]


def _base(request: Request) -> str:
    root = str(request.base_url).rstrip("/")
    node = request.path_params.get("node")
    return f"{root}/pacs/{node}/dicomweb" if node else f"{root}/dicomweb"


def _instance_url(request: Request, inst: CachedInstance) -> str:
    return (
        f"{_base(request)}/studies/{inst.study_uid}/series/{inst.series_uid}"
        f"/instances/{inst.sop_uid}"
    )


def _check(**uids: str) -> None:
    for name, uid in uids.items():
        check_uid(name, uid)


def _image(body: bytes, media_type: RenderedType) -> Response:
    return Response(body, media_type=str(media_type))


async def _one_frame(
    gateway: Gateway, node: PacsNode, uids: tuple[str, str, str], frame: int, view: View
) -> Response:
    """One rendered frame of one instance (the instance and thumbnail resources)."""
    inst = await gateway.retriever.instance(node, *uids)
    return _image(
        await rendering.rendered(inst, frame, view.params, view.media_type), view.media_type
    )


def _multipart(parts: list[tuple[bytes, str]], media_type: RenderedType) -> Response:
    boundary = multipart.new_boundary()
    chunks: list[bytes] = []
    for body, location in parts:
        chunks += [
            multipart.part_header(boundary, str(media_type), location, len(body)),
            body,
            multipart.part_trailer(),
        ]
    chunks.append(multipart.closing(boundary))
    return Response(b"".join(chunks), media_type=multipart.content_type(boundary, media_type))


async def _rendered_instances(
    request: Request, delivery: Delivery, params: RenderParams, media_type: RenderedType
) -> Response:
    """Frame 1 of each instance, one part each, streamed as instances arrive."""
    warning = await delivery.prepare()
    boundary = multipart.new_boundary()

    async def body() -> AsyncIterator[bytes]:
        async for inst in delivery:
            try:
                image = await rendering.rendered(inst, 1, params, media_type)
            except NotFound:
                continue  # no pixels (a report, a presentation state): nothing to show
            except GatewayError:
                # Headers are sent: an unterminated body tells the client.
                return
            yield multipart.part_header(
                boundary, str(media_type), f"{_instance_url(request, inst)}/rendered", len(image)
            )
            yield image
            yield multipart.part_trailer()
            await asyncio.sleep(0)
        if delivery.complete:
            yield multipart.closing(boundary)

    headers = {"Warning": f"299 {SERVICE}: {warning}"} if warning else {}
    return StreamingResponse(
        body(),
        status_code=206 if delivery.partial else 200,
        media_type=multipart.content_type(boundary, media_type),
        headers=headers,
    )


# -- rendered ------------------------------------------------------------------------------


@router.get(
    "/studies/{study}/rendered",
    summary="Render every instance of a study",
    description=openapi.RENDERED_MANY.format(level="study"),
    responses=openapi.RENDERED_RESPONSES,
)
async def study_rendered(
    study: str,
    request: Request,
    gateway: GatewayDep,
    node: NodeDep,
    view: RenderedView,
) -> Response:
    _check(study=study)
    params, media_type = view.params, view.media_type
    series = await series_of_study(gateway, node, study)
    if not series:
        raise NotFound(f"study {study} was not found on {node.name!r}")
    delivery = Delivery(gateway.retriever, node, study, series)
    return await _rendered_instances(request, delivery, params, media_type)


@router.get(
    "/studies/{study}/series/{series}/rendered",
    summary="Render every instance of a series",
    description=openapi.RENDERED_MANY.format(level="series"),
    responses=openapi.RENDERED_RESPONSES,
)
async def series_rendered(
    study: str,
    series: str,
    request: Request,
    gateway: GatewayDep,
    node: NodeDep,
    view: RenderedView,
) -> Response:
    _check(study=study, series=series)
    params, media_type = view.params, view.media_type
    delivery = Delivery(gateway.retriever, node, study, [series])
    return await _rendered_instances(request, delivery, params, media_type)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/rendered",
    summary="Render an instance",
    description=openapi.RENDERED_INSTANCE,
    responses=openapi.RENDERED_RESPONSES,
)
async def instance_rendered(
    study: str,
    series: str,
    instance: str,
    gateway: GatewayDep,
    node: NodeDep,
    view: RenderedView,
) -> Response:
    _check(study=study, series=series, instance=instance)
    return await _one_frame(gateway, node, (study, series, instance), 1, view)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
    summary="Render frames of an instance",
    description=openapi.RENDERED_FRAMES,
    responses=openapi.RENDERED_RESPONSES,
)
async def frames_rendered(
    study: str,
    series: str,
    instance: str,
    frames: str,
    request: Request,
    gateway: GatewayDep,
    node: NodeDep,
    view: RenderedView,
) -> Response:
    _check(study=study, series=series, instance=instance)
    numbers = frame_numbers(frames)
    params, media_type = view.params, view.media_type
    inst = await gateway.retriever.instance(node, study, series, instance)
    images = [await rendering.rendered(inst, n, params, media_type) for n in numbers]
    if len(images) == 1:
        return _image(images[0], media_type)
    url = _instance_url(request, inst)
    return _multipart(
        [(img, f"{url}/frames/{n}/rendered") for img, n in zip(images, numbers, strict=True)],
        media_type,
    )


# -- thumbnails ----------------------------------------------------------------------------


@router.get(
    "/studies/{study}/thumbnail",
    summary="Thumbnail of a study",
    description=openapi.THUMBNAIL.format(
        choice="the middle instance (by Instance Number) of the study's first series "
        "that has an image"
    ),
    responses=openapi.RENDERED_RESPONSES,
)
async def study_thumbnail(
    study: str,
    gateway: GatewayDep,
    node: NodeDep,
    view: ThumbnailView,
) -> Response:
    _check(study=study)
    params, media_type = view.params, view.media_type
    body = await rendering.study_thumbnail(gateway, node, study, params, media_type)
    return _image(body, media_type)


@router.get(
    "/studies/{study}/series/{series}/thumbnail",
    summary="Thumbnail of a series",
    description=openapi.THUMBNAIL.format(choice="the series' middle instance by Instance Number"),
    responses=openapi.RENDERED_RESPONSES,
)
async def series_thumbnail(
    study: str,
    series: str,
    gateway: GatewayDep,
    node: NodeDep,
    view: ThumbnailView,
) -> Response:
    _check(study=study, series=series)
    params, media_type = view.params, view.media_type
    body = await rendering.series_thumbnail(gateway, node, study, series, params, media_type)
    return _image(body, media_type)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
    summary="Thumbnail of an instance",
    description=openapi.THUMBNAIL.format(choice="the instance's first frame"),
    responses=openapi.RENDERED_RESPONSES,
)
async def instance_thumbnail(
    study: str,
    series: str,
    instance: str,
    gateway: GatewayDep,
    node: NodeDep,
    view: ThumbnailView,
) -> Response:
    _check(study=study, series=series, instance=instance)
    return await _one_frame(gateway, node, (study, series, instance), 1, view)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/thumbnail",
    summary="Thumbnail of a frame",
    description=openapi.THUMBNAIL.format(choice="the first frame listed"),
    responses=openapi.RENDERED_RESPONSES,
)
async def frames_thumbnail(
    study: str,
    series: str,
    instance: str,
    frames: str,
    gateway: GatewayDep,
    node: NodeDep,
    view: ThumbnailView,
) -> Response:
    _check(study=study, series=series, instance=instance)
    number = frame_numbers(frames)[0]
    return await _one_frame(gateway, node, (study, series, instance), number, view)
