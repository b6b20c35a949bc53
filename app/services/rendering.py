"""Rendered and thumbnail images of cached instances (PS3.18 §10.4.1.1.3-4).

Instances come through the retrieve service (``Retriever.instance`` and
``Delivery``), so a rendered image costs what a WADO-RS retrieve of the same
instance costs, cache hits included.  Rendering itself runs off the event loop.

A thumbnail is one representative image of its resource (PS3.18 §10.4.1.1.4:
the origin server chooses it): the middle instance of a series by Instance
Number, found with one IMAGE level C-FIND so that only that instance is
moved; for a study, the first of its series that renders.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from pydicom.dataset import Dataset

from app.cache import CachedInstance
from app.config import PacsNode
from app.dimse.find import QueryModel, c_find
from app.errors import NotFound
from app.render.encode import RenderedType, encode
from app.render.params import RenderParams
from app.render.pipeline import render
from app.runtime import Gateway
from app.services.studies import series_of_study

log = logging.getLogger(__name__)

# Series of a study tried for its thumbnail: the first ones may be reports or
# presentation states without pixels.
_THUMBNAIL_SERIES_TRIES = 4


def _render_encode(path: Path, frame: int, params: RenderParams, media_type: RenderedType) -> bytes:
    return encode(render(path, frame, params), media_type, params.quality)


async def rendered(
    inst: CachedInstance, frame: int, params: RenderParams, media_type: RenderedType
) -> bytes:
    """Frame *frame* (1-based) of a cached instance as an encoded image."""
    return await asyncio.to_thread(_render_encode, inst.path, frame, params, media_type)


async def instances_of_series(
    gateway: Gateway, node: PacsNode, study: str, series: str
) -> list[str]:
    """SOPInstanceUIDs of a series ordered by Instance Number (those without one last)."""
    ident = Dataset()
    ident.QueryRetrieveLevel = "IMAGE"
    ident.StudyInstanceUID = study
    ident.SeriesInstanceUID = series
    ident.SOPInstanceUID = None
    ident.InstanceNumber = None
    found = await c_find(gateway.pool(node), ident, QueryModel.STUDY_ROOT)
    numbered: dict[str, float] = {}
    for ds in found.matches:
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        if not uid or uid in numbered:
            continue
        try:
            numbered[uid] = float(ds.get("InstanceNumber", "") or "inf")
        except (TypeError, ValueError):
            numbered[uid] = float("inf")
    return sorted(numbered, key=lambda uid: numbered[uid])


async def series_thumbnail(
    gateway: Gateway,
    node: PacsNode,
    study: str,
    series: str,
    params: RenderParams,
    media_type: RenderedType,
) -> bytes:
    """The middle instance of the series, rendered."""
    uids = await instances_of_series(gateway, node, study, series)
    if not uids:
        raise NotFound(f"series {series} of study {study} was not found on {node.name!r}")
    middle = uids[(len(uids) - 1) // 2]
    inst = await gateway.retriever.instance(node, study, series, middle)
    return await rendered(inst, 1, params, media_type)


async def study_thumbnail(
    gateway: Gateway, node: PacsNode, study: str, params: RenderParams, media_type: RenderedType
) -> bytes:
    """The thumbnail of the study's first series that has an image."""
    all_series = await series_of_study(gateway, node, study)
    if not all_series:
        raise NotFound(f"study {study} was not found on {node.name!r}")
    last: NotFound | None = None
    for series in all_series[:_THUMBNAIL_SERIES_TRIES]:
        try:
            return await series_thumbnail(gateway, node, study, series, params, media_type)
        except NotFound as exc:
            log.debug("no thumbnail from series %s: %s", series, exc.message)
            last = exc
    raise NotFound(
        f"no series of study {study} has an image to show ({last.message if last else ''})"
    )
