"""A series as NIfTI-1, its BIDS sidecar, and the one-call "find me that series" path.

A series dcm2niix would write as several files (several echoes, magnitude and
phase...) is several volumes here too: without ``echo=N`` or ``volume=N`` the
answer is 300 Multiple Choices listing them, each with the URLs that fetch it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from app.api.audit import note
from app.api.deps import GatewayDep, NodeDep, until_disconnected
from app.api.search import DICOM_JSON, SERVICE, run_qido
from app.config import PacsNode
from app.convert.nifti import SeriesPart, Volume, build_part, nifti_size, to_nifti
from app.convert.sidecar import sidecar
from app.dicomweb.attributes import Level
from app.dicomweb.json import dataset_to_json, dumps
from app.dicomweb.query import check_uid
from app.errors import InvalidRequest, NotFound
from app.runtime import Gateway
from app.services.nifti import receive_series

router = APIRouter(tags=["NIfTI"])

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
RESAMPLED_HEADER = "X-Gateway-Resampled"


EchoParam = Annotated[
    int | None, Query(ge=1, description="EchoNumber of the volume (dcm2niix's _eN file)")
]
VolumeParam = Annotated[
    int | None, Query(ge=1, description="number of the volume in the 300 listing")
]


def _describe(part: SeriesPart) -> str:
    what = []
    if part.echo_number is not None:
        what.append(f"echo {part.echo_number}")
    if part.echo_time is not None:
        what.append(f"TE {part.echo_time:g} ms")
    if part.image_type:
        what.append("\\".join(part.image_type))
    return f"volume {part.number} ({', '.join(what) or 'no echo'})"


def _series_url(request: Request, study: str, series: str, selector: dict[str, int]) -> str:
    """URL of the series' ``/nifti`` on the same base, for the one-call path too."""
    path = request.url.path.removesuffix("/sidecar").removesuffix("/nifti")
    own = f"/studies/{study}/series/{series}"
    if not path.endswith(own):
        path += own
    return str(request.url.replace(path=path + "/nifti", query=urlencode(selector)))


def _selector(part: SeriesPart, parts: list[SeriesPart]) -> dict[str, int]:
    # echo=N where it names one volume (dcm2niix's _eN), else the volume number.
    number = part.echo_number
    if number is not None and sum(p.echo_number == number for p in parts) == 1:
        return {"echo": number}
    return {"volume": part.number}


def _choices(
    request: Request, study: str, series: str, parts: list[SeriesPart], chosen: list[SeriesPart]
) -> JSONResponse:
    """300 Multiple Choices: the volumes of the series and how to ask for each."""
    listing = []
    for part in chosen:
        selector = _selector(part, parts)
        nifti_url = _series_url(request, study, series, selector)
        entry: dict[str, Any] = {"volume": part.number}
        if part.echo_number is not None:
            entry["EchoNumber"] = part.echo_number
        if part.echo_time is not None:
            entry["EchoTime"] = round(part.echo_time / 1000.0, 9)  # s, as in the sidecar
        entry["ImageType"] = list(part.image_type)
        entry["images"] = part.images
        entry["suffix"] = part.suffix
        entry["nifti"] = nifti_url
        entry["sidecar"] = nifti_url.replace("/nifti?", "/nifti/sidecar?", 1)
        listing.append(entry)
    keys = sorted({key for part in chosen for key in _selector(part, parts)})
    suffixes = ", ".join(p.suffix or "(none)" for p in parts)
    message = (
        f"the series makes {len(parts)} volumes, as dcm2niix would write {len(parts)} "
        f"files ({suffixes}): ask for one with {' or '.join(f'{k}=N' for k in keys)}"
    )
    return JSONResponse({"message": message, "volumes": listing}, status_code=300)


async def _volume(
    request: Request,
    gateway: Gateway,
    node: PacsNode,
    study: str,
    series: str,
    echo: int | None,
    volume: int | None,
) -> tuple[SeriesPart, Volume] | JSONResponse:
    """The one volume asked for, or the 300 listing when the choice is not made."""
    # A client that gives up while the series arrives cancels its move.
    intake = await until_disconnected(
        request, receive_series(gateway.retriever, node, study, series)
    )
    parts = await asyncio.to_thread(intake.parts)
    chosen = [
        p
        for p in parts
        if (volume is None or p.number == volume) and (echo is None or p.echo_number == echo)
    ]
    if not chosen:
        asked = " and ".join(
            f"{k}={v}" for k, v in (("echo", echo), ("volume", volume)) if v is not None
        )
        held = "; ".join(_describe(p) for p in parts)
        raise NotFound(f"no volume of this series matches {asked}: it holds {held}")
    if len(chosen) > 1:
        note(request, count=len(chosen))
        return _choices(request, study, series, parts, chosen)
    (part,) = chosen
    built = await asyncio.to_thread(build_part, part)
    note(request, count=len(built.headers))
    return part, built


def _file_name(volume: Volume, series: str, compress: bool, suffix: str = "") -> str:
    first = volume.headers[0]
    number = str(first.get("SeriesNumber", "") or "").strip()
    description = str(first.get("SeriesDescription", "") or "").strip()
    stem = "_".join(p for p in (number, description) if p) or series
    stem = _UNSAFE.sub("_", stem).strip("._") or "series"
    return f"{stem[:100]}{suffix}.nii" + (".gz" if compress else "")


def _stream(part: SeriesPart, volume: Volume, series: str, compress: bool) -> StreamingResponse:
    name = _file_name(volume, series, compress, part.suffix)
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    if volume.resampled:
        # The voxels are interpolated, not the scanner's: say so where every client sees it.
        headers[RESAMPLED_HEADER] = volume.resampled
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
    request: Request,
    study: str,
    series: str,
    gateway: GatewayDep,
    node: NodeDep,
    compress: bool = True,
    echo: EchoParam = None,
    volume: VolumeParam = None,
) -> Response:
    """The series as one NIfTI-1 volume (RAS orientation, geometry as dcm2niix computes it),
    streamed as `.nii.gz` (`compress=false`: `.nii`). A series that is not one honest volume
    (mixed orientations or sizes, missing slices, gantry tilt, non-image objects) is 422 with
    the reason."""
    check_uid("study", study)
    check_uid("series", series)
    found = await _volume(request, gateway, node, study, series, echo, volume)
    if isinstance(found, Response):
        return found
    return _stream(*found, series, compress)


@router.get(
    "/studies/{study}/series/{series}/nifti/sidecar",
    summary="BIDS-style JSON sidecar of the series, as dcm2niix writes it",
)
async def series_sidecar(
    request: Request,
    study: str,
    series: str,
    gateway: GatewayDep,
    node: NodeDep,
    phi: bool = False,
    echo: EchoParam = None,
    volume: VolumeParam = None,
) -> Any:
    """The BIDS JSON sidecar dcm2niix would write for the series. Patient identity is left out
    unless `phi=true` and the gateway allows it (`allow_phi_in_sidecars`)."""
    check_uid("study", study)
    check_uid("series", series)
    if phi and not gateway.settings.allow_phi_in_sidecars:
        raise InvalidRequest(
            "phi=true is not allowed by this gateway's configuration (allow_phi_in_sidecars)"
        )
    found = await _volume(request, gateway, node, study, series, echo, volume)
    if isinstance(found, Response):
        return found
    part, built = found
    several_echoes = part.suffix.startswith("_e")
    return await asyncio.to_thread(
        sidecar,
        built.headers,
        phi=phi,
        echo_number=part.echo_number if several_echoes else None,
        echo_time=part.echo_time,
        resampled=built.resampled,
    )


@router.get(
    "/nifti",
    summary="Find one series by any series-level QIDO keys and return it as NIfTI",
)
async def find_nifti(
    request: Request,
    gateway: GatewayDep,
    node: NodeDep,
    compress: bool = True,
    echo: EchoParam = None,
    volume: VolumeParam = None,
) -> Response:
    """Finds a series by any QIDO series-level keys (e.g. `PatientID`, `StudyDate`, `Modality`,
    `SeriesDescription`) and streams it as NIfTI: one match is the volume, several are 300 with
    the candidates as DICOM JSON, none 404."""
    own = {"compress", "echo", "volume"}
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in own]
    if not any(k.lower() not in ("limit", "offset", "includefield") for k, _ in params):
        raise InvalidRequest("give at least one search key, e.g. PatientID and SeriesDescription")
    result = await run_qido(gateway, node, Level.SERIES, params, context=[Level.STUDY])
    matches = result.matches
    if not matches:
        raise NotFound("no series matches those keys")
    # One match is only "the" series if nothing was left unseen: a limit (the
    # client's or the node's max_limit) may have cut the candidates to one.
    if len(matches) > 1 or result.remaining != 0:
        note(request, count=len(matches))
        # 300 Multiple Choices: the candidates, as QIDO would list them.
        body = dumps([dataset_to_json(ds) for ds in matches])
        response = Response(body, status_code=300, media_type=DICOM_JSON)
        for text in result.warnings:
            # e.g. the PACS could not match SeriesDescription: say why there are several.
            response.headers.append("Warning", f"299 {SERVICE}: {text}")
        return response
    only = matches[0]
    study, series = str(only.StudyInstanceUID), str(only.SeriesInstanceUID)
    note(request, uids={"study": study, "series": series})
    found = await _volume(request, gateway, node, study, series, echo, volume)
    if isinstance(found, Response):
        return found
    return _stream(*found, series, compress)
