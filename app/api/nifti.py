"""A series as NIfTI-1, its BIDS sidecar, and the one-call "find me that series" path."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from app.api.deps import GatewayDep, NodeDep
from app.api.search import DICOM_JSON, SERVICE, run_qido
from app.cache import CachedInstance
from app.config import PacsNode
from app.convert.nifti import Volume, build_volume, nifti_size, to_nifti
from app.convert.sidecar import sidecar
from app.dicomweb.attributes import Level
from app.dicomweb.json import dataset_to_json, dumps
from app.dicomweb.query import check_uid
from app.errors import InvalidRequest, NotFound, RetrieveIncomplete
from app.runtime import Gateway
from app.services.retrieve import Delivery

router = APIRouter(tags=["NIfTI"])

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


async def _volume(gateway: Gateway, node: PacsNode, study: str, series: str) -> Volume:
    """Fetch the series (cache or move) and stack it; only a complete series converts."""
    delivery = Delivery(gateway.retriever, node, study, [series])
    warning = await delivery.prepare()
    instances: list[CachedInstance] = [inst async for inst in delivery]
    if warning or not delivery.complete:
        raise RetrieveIncomplete(
            "; ".join(delivery.problems) or warning or "the series did not arrive whole",
            node=node.name,
        )
    paths = [inst.path for inst in instances]
    return await asyncio.to_thread(build_volume, paths)


def _file_name(volume: Volume, series: str, compress: bool) -> str:
    first = volume.headers[0]
    number = str(first.get("SeriesNumber", "") or "").strip()
    description = str(first.get("SeriesDescription", "") or "").strip()
    stem = "_".join(p for p in (number, description) if p) or series
    stem = _UNSAFE.sub("_", stem).strip("._") or "series"
    return f"{stem[:100]}.nii" + (".gz" if compress else "")


def _stream(volume: Volume, series: str, compress: bool) -> StreamingResponse:
    name = _file_name(volume, series, compress)
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    if not compress:
        headers["Content-Length"] = str(nifti_size(volume))

    async def body() -> AsyncIterator[bytes | memoryview]:
        # Compression is CPU work: run the generator off the event loop.
        async for chunk in iterate_in_threadpool(to_nifti(volume, compress=compress)):
            yield chunk

    return StreamingResponse(
        body(),
        media_type="application/gzip" if compress else "application/octet-stream",
        headers=headers,
    )


@router.get(
    "/studies/{study}/series/{series}/nifti",
    summary="A series as a NIfTI-1 volume (.nii.gz, or .nii with compress=false)",
)
async def series_nifti(
    study: str,
    series: str,
    gateway: GatewayDep,
    node: NodeDep,
    compress: bool = True,
) -> Response:
    check_uid("study", study)
    check_uid("series", series)
    volume = await _volume(gateway, node, study, series)
    return _stream(volume, series, compress)


@router.get(
    "/studies/{study}/series/{series}/nifti/sidecar",
    summary="BIDS-style JSON sidecar of the series, as dcm2niix writes it",
)
async def series_sidecar(
    study: str,
    series: str,
    gateway: GatewayDep,
    node: NodeDep,
    phi: bool = False,
) -> dict[str, Any]:
    check_uid("study", study)
    check_uid("series", series)
    if phi and not gateway.settings.allow_phi_in_sidecars:
        raise InvalidRequest(
            "phi=true is not allowed by this gateway's configuration (allow_phi_in_sidecars)"
        )
    volume = await _volume(gateway, node, study, series)
    return await asyncio.to_thread(sidecar, volume.headers, phi=phi)


@router.get(
    "/nifti",
    summary="Find one series by any series-level QIDO keys and return it as NIfTI",
)
async def find_nifti(
    request: Request, gateway: GatewayDep, node: NodeDep, compress: bool = True
) -> Response:
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "compress"]
    if not any(k.lower() not in ("limit", "offset", "includefield") for k, _ in params):
        raise InvalidRequest("give at least one search key, e.g. PatientID and SeriesDescription")
    result = await run_qido(gateway, node, Level.SERIES, params, context=[Level.STUDY])
    matches = result.matches
    if not matches:
        raise NotFound("no series matches those keys")
    if len(matches) > 1:
        # 300 Multiple Choices: the candidates, as QIDO would list them.
        body = dumps([dataset_to_json(ds) for ds in matches])
        response = Response(body, status_code=300, media_type=DICOM_JSON)
        for text in result.warnings:
            # e.g. the PACS could not match SeriesDescription: say why there are several.
            response.headers.append("Warning", f"299 {SERVICE}: {text}")
        return response
    only = matches[0]
    study, series = str(only.StudyInstanceUID), str(only.SeriesInstanceUID)
    volume = await _volume(gateway, node, study, series)
    return _stream(volume, series, compress)
