"""QIDO-RS resources (PS3.18 §10.6), served for every node and for the default node."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from fastapi import APIRouter, Request, Response

from app.api.audit import note
from app.api.deps import ClientGone, GatewayDep, NodeDep, until_disconnected
from app.config import PacsNode
from app.dicomweb.accept import ResourceKind, negotiate
from app.dicomweb.attributes import Level
from app.dicomweb.json import dataset_to_json, dumps
from app.dicomweb.query import apply_limits, check_patient_id, check_uid, parse_qido
from app.runtime import Gateway
from app.services.search import SearchResult, run_search

DICOM_JSON = "application/dicom+json"
SERVICE = "dimse-gateway"

_STUDY = 0x0020000D
_SERIES = 0x0020000E
_INSTANCE = 0x00080018

router = APIRouter(tags=["QIDO-RS search"])


def _check_accept(request: Request) -> None:
    """406 (or 400 for a malformed Accept) before any C-FIND is sent."""
    accept = request.headers.get("accept")
    negotiate(ResourceKind.SEARCH, accept, request.query_params.getlist("accept"))


def _base_url(request: Request) -> str:
    root = str(request.base_url).rstrip("/")
    node = request.path_params.get("node")
    return f"{root}/pacs/{node}/dicomweb" if node else f"{root}/dicomweb"


def _retrieve_url(base: str, level: Level, obj: dict[int, str]) -> str | None:
    study, series, instance = obj.get(_STUDY), obj.get(_SERIES), obj.get(_INSTANCE)
    if level is Level.STUDY and study:
        return f"{base}/studies/{study}"
    if level is Level.SERIES and study and series:
        return f"{base}/studies/{study}/series/{series}"
    if level is Level.IMAGE and study and series and instance:
        return f"{base}/studies/{study}/series/{series}/instances/{instance}"
    return None


async def run_qido(
    gateway: Gateway,
    node: PacsNode,
    level: Level,
    params: Iterable[tuple[str, str]],
    *,
    path_uids: dict[int, str] | None = None,
    context: Iterable[Level] = (),
) -> SearchResult:
    """Parse QIDO parameters and run the search (also used by the NIfTI one-call path)."""
    query = parse_qido(
        level,
        params,
        path_uids=path_uids,
        context_levels=context,
        study_root=node.query_model == "study" and level is not Level.PATIENT,
    )
    apply_limits(query, max_limit=node.max_limit, refuse_unfiltered=node.refuse_unfiltered_searches)
    result = await run_search(gateway, node, query)
    if query.limit_note:
        result.warnings.insert(0, query.limit_note)
    return result


async def _answer(
    request: Request,
    gateway: GatewayDep,
    node: NodeDep,
    level: Level,
    *,
    path_uids: dict[int, str] | None = None,
    context: Iterable[Level] = (),
    path_matches: Iterable[tuple[str, str]] = (),
) -> Response:
    _check_accept(request)
    params = [*path_matches, *request.query_params.multi_items()]
    try:
        result = await until_disconnected(
            request, run_qido(gateway, node, level, params, path_uids=path_uids, context=context)
        )
    except ClientGone:
        return Response(status_code=499)
    note(request, count=len(result.matches))
    base = _base_url(request)

    def encode() -> bytes:
        objects = []
        for ds in result.matches:
            obj = dataset_to_json(ds)
            uids = {tag: str(ds[tag].value) for tag in (_STUDY, _SERIES, _INSTANCE) if tag in ds}
            url = _retrieve_url(base, level, uids)
            if url is not None:
                obj["00081190"] = {"vr": "UR", "Value": [url]}
                obj = dict(sorted(obj.items()))
            objects.append(obj)
        return dumps(objects)

    # Large answers take tens of milliseconds to encode: keep the loop free.
    body = await asyncio.to_thread(encode) if result.matches else b"[]"
    headers = [("Warning", f"299 {SERVICE}: {text}") for text in result.warnings]
    if not result.matches and node.no_match_status == 204:
        response = Response(status_code=204)
    else:
        response = Response(body, media_type=DICOM_JSON)
    for name, value in headers:
        response.headers.append(name, value)
    return response


@router.get("/patients", summary="Search for patients (Patient Root C-FIND, PATIENT level)")
async def search_patients(request: Request, gateway: GatewayDep, node: NodeDep) -> Response:
    """Patients matching the query keys (PatientName, PatientID, PatientBirthDate, ...), one
    C-FIND with the Patient Root model at PATIENT level. Many PACS refuse Patient Root: the
    answer is then 502 with the DIMSE status."""
    return await _answer(request, gateway, node, Level.PATIENT)


@router.get("/patients/{patient_id}/studies", summary="Search for the studies of one patient")
async def search_patient_studies(
    patient_id: str, request: Request, gateway: GatewayDep, node: NodeDep
) -> Response:
    """Studies of one patient: a STUDY level C-FIND with the Patient ID of the path added to the
    query keys."""
    check_patient_id(patient_id)
    return await _answer(
        request, gateway, node, Level.STUDY, path_matches=[("PatientID", patient_id)]
    )


@router.get("/studies", summary="Search for studies")
async def search_studies(request: Request, gateway: GatewayDep, node: NodeDep) -> Response:
    """Studies matching the query keys (QIDO-RS Search for Studies, PS3.18 §10.6): one STUDY
    level C-FIND, plus SERIES level ones when series keys or series attributes
    (ModalitiesInStudy, counts) are asked for and the PACS does not give them."""
    return await _answer(request, gateway, node, Level.STUDY)


@router.get("/series", summary="Search for series in all studies")
async def search_series(request: Request, gateway: GatewayDep, node: NodeDep) -> Response:
    """Series of all studies matching the keys (relational query): studies first, then a SERIES
    level C-FIND per matching study. Study attributes come back with each series."""
    return await _answer(request, gateway, node, Level.SERIES, context=[Level.STUDY])


@router.get("/instances", summary="Search for instances in all studies")
async def search_instances(request: Request, gateway: GatewayDep, node: NodeDep) -> Response:
    """Instances of all studies matching the keys (relational query): STUDY, SERIES, then IMAGE
    level C-FINDs. Prefer a narrower resource when a study or series is known."""
    return await _answer(request, gateway, node, Level.IMAGE, context=[Level.STUDY, Level.SERIES])


@router.get("/studies/{study}/series", summary="Search for the series of a study")
async def search_study_series(
    study: str, request: Request, gateway: GatewayDep, node: NodeDep
) -> Response:
    """Series of one study: one SERIES level C-FIND."""
    check_uid("study", study)
    return await _answer(request, gateway, node, Level.SERIES, path_uids={_STUDY: study})


@router.get("/studies/{study}/instances", summary="Search for the instances of a study")
async def search_study_instances(
    study: str, request: Request, gateway: GatewayDep, node: NodeDep
) -> Response:
    """Instances of one study: a SERIES level C-FIND, then one IMAGE level C-FIND per series."""
    check_uid("study", study)
    return await _answer(
        request, gateway, node, Level.IMAGE, path_uids={_STUDY: study}, context=[Level.SERIES]
    )


@router.get(
    "/studies/{study}/series/{series}/instances", summary="Search for the instances of a series"
)
async def search_series_instances(
    study: str, series: str, request: Request, gateway: GatewayDep, node: NodeDep
) -> Response:
    """Instances of one series: one IMAGE level C-FIND."""
    check_uid("study", study)
    check_uid("series", series)
    return await _answer(
        request, gateway, node, Level.IMAGE, path_uids={_STUDY: study, _SERIES: series}
    )
