"""WADO-RS resources (PS3.18 §10.4): instances, metadata, frames and bulk data."""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from app.api import parameters
from app.api.audit import add_count, note
from app.api.deps import GatewayDep, NodeDep, until_disconnected
from app.cache import CachedInstance
from app.config import PacsNode
from app.dicomweb import instances as dicom_files
from app.dicomweb import multipart
from app.dicomweb.accept import Negotiated, ResourceKind, negotiate
from app.dicomweb.query import check_uid
from app.errors import GatewayError, InvalidRequest, NotFound
from app.runtime import Gateway
from app.services.metadata import MetadataStore
from app.services.retrieve import Delivery
from app.services.studies import series_of_study

log = logging.getLogger(__name__)

router = APIRouter(
    tags=["WADO-RS retrieve"],
    dependencies=[Depends(parameters.ignore_unsupported(parameters.RETRIEVE))],
)

DICOM_JSON = "application/dicom+json"
SERVICE = "dimse-gateway"


def _negotiate(
    request: Request, kind: ResourceKind, *, single: bool = False, stored_syntax: str | None = None
) -> Negotiated:
    accept = request.headers.get("accept")
    return negotiate(
        kind,
        accept,
        request.query_params.getlist("accept"),
        single=single,
        stored_syntax=stored_syntax,
    )


def _base(request: Request) -> str:
    root = str(request.base_url).rstrip("/")
    node = request.path_params.get("node")
    return f"{root}/pacs/{node}/dicomweb" if node else f"{root}/dicomweb"


def _instance_url(base: str, inst: CachedInstance) -> str:
    return f"{base}/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"


async def _part_body(inst: CachedInstance, negotiated: Negotiated) -> tuple[bytes | str, str]:
    """The bytes of one part and the transfer syntax they are in.

    ``transfer-syntax=*`` and a request for the stored syntax send the file as
    it arrived; anything else is converted off the event loop.
    """
    ts = negotiated.transfer_syntax
    if ts is None or ts == "*" or ts == inst.transfer_syntax:
        return inst.file, inst.transfer_syntax
    body = await asyncio.to_thread(dicom_files.transcode, inst.path, ts)
    return (str(body) if isinstance(body, Path) else body), ts


def _read(path: str) -> bytes:
    # Page-cache reads of a few hundred KB cost less than a thread hop (PEERS.md).
    with open(path, "rb") as f:
        return f.read()


def _mapped(file: str | Path, size: int) -> memoryview | None:
    """The file's bytes without reading them: a read-only mapping of it.

    Handed to the server as one body message, the mapping is copied once, by
    the kernel, from the page cache into the socket; reading the file first
    (the other copy) was a fifth of a warm retrieve's time.  Cached files are
    never modified in place (written aside, renamed in, unlinked on eviction;
    a mapping outlives the unlink), and the size is checked on the open file,
    so a mapping never reaches past the end of its file.  None when the file is
    gone or does not have the expected size.  The mapping is unmapped when the
    last reference goes, i.e. once the server has sent it.
    """
    try:
        fd = os.open(file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if os.fstat(fd).st_size != size or size == 0:
            return None
        return memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))
    finally:
        os.close(fd)


# Above this a file is not mapped whole (its pages would all count in the
# gateway's memory until the server has sent it) but read in chunks off the loop.
_MAP_LIMIT = 64 * 1024 * 1024
# Body messages are at most this long: uvicorn copies each message of a chunked
# response once, so a multi-gigabyte multi-frame object must not be one message.
_CHUNK = 8 * 1024 * 1024


async def _file_chunks(file: str | Path, size: int) -> AsyncIterator[memoryview | bytes]:
    """The bytes of a cached file as body messages; OSError if it is not the
    file that was indexed (gone, or another size)."""
    if size <= _MAP_LIMIT:
        view = _mapped(file, size)
        if view is None:
            raise OSError(f"{file} changed since it was indexed")
        for start in range(0, size, _CHUNK):
            yield view[start : start + _CHUNK]
        return
    fd = await asyncio.to_thread(os.open, file, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size != size:
            raise OSError(f"{file} changed since it was indexed")
        for start in range(0, size, _CHUNK):
            chunk = await asyncio.to_thread(os.pread, fd, min(_CHUNK, size - start), start)
            if len(chunk) != min(_CHUNK, size - start):
                raise OSError(f"{file} was truncated while being sent")
            yield chunk
    finally:
        os.close(fd)


async def _multipart_instances(
    request: Request,
    gateway: Gateway,
    node: PacsNode,
    delivery: Delivery,
    negotiated: Negotiated,
) -> Response:
    boundary = multipart.new_boundary()
    base = _base(request)
    cached = await delivery.all_cached()
    if cached is not None and all(_as_stored(inst, negotiated) for inst in cached):
        return _cached_multipart(request, cached, boundary, base)
    warning = await until_disconnected(request, delivery.prepare())

    draining: threading.Event = request.app.state.draining

    async def body() -> AsyncIterator[bytes | memoryview]:
        sent = 0
        async for inst in delivery:
            if draining.is_set():
                # The server is shutting down: end at a part boundary, without
                # the closing delimiter, so the client knows the body is cut.
                log.warning(
                    "retrieve of study %s cut after %d instances: the gateway is shutting down",
                    delivery.study,
                    sent,
                )
                return
            try:
                data, ts = await _part_body(inst, negotiated)
                size = inst.size if isinstance(data, str) else len(data)
                yield multipart.part_header(
                    boundary,
                    f"application/dicom; transfer-syntax={ts}",
                    _instance_url(base, inst),
                    size,
                )
                if isinstance(data, str):
                    async for chunk in _file_chunks(data, size):
                        yield chunk
                else:
                    yield data
            except (OSError, GatewayError) as exc:
                # Headers are gone: the only honest signal left is an
                # unterminated body (no closing delimiter).
                log.error("retrieve of %s stopped at %s: %s", delivery.study, inst.sop_uid, exc)
                return
            yield multipart.part_trailer()
            sent += 1
            add_count(request)
            # A warm stream would otherwise never yield the loop (PEERS.md).
            await asyncio.sleep(0)
        if delivery.complete:
            yield multipart.closing(boundary)
        else:
            # No closing delimiter: a client can tell the body is not complete.
            log.error(
                "retrieve of study %s from %s ended incomplete after %d instances: %s",
                delivery.study,
                node.name,
                sent,
                "; ".join(delivery.problems),
            )

    headers = {}
    if warning:
        headers["Warning"] = f"299 {SERVICE}: {warning}"
    return StreamingResponse(
        body(),
        # A warning status of a move that delivered everything is news, not a gap.
        status_code=206 if delivery.partial else 200,
        media_type=multipart.content_type(boundary, "application/dicom"),
        headers=headers,
    )


def _as_stored(inst: CachedInstance, negotiated: Negotiated) -> bool:
    ts = negotiated.transfer_syntax
    return ts is None or ts == "*" or ts == inst.transfer_syntax


def _cached_multipart(
    request: Request, cached: list[CachedInstance], boundary: str, base: str
) -> Response:
    """A complete cached retrieve sent as stored, with a Content-Length.

    Knowing the length up front lets uvicorn send each part as it is instead of
    copying it into a chunked frame, and lets the client see the size.
    """
    headers = [
        multipart.part_header(
            boundary,
            f"application/dicom; transfer-syntax={inst.transfer_syntax}",
            _instance_url(base, inst),
            inst.size,
        )
        for inst in cached
    ]
    trailer = multipart.part_trailer()
    closing = multipart.closing(boundary)
    length = sum(len(h) + inst.size + len(trailer) for h, inst in zip(headers, cached, strict=True))
    length += len(closing)
    # Two messages per part: the previous part's trailer with this part's
    # headers, then the mapped file, so the file bytes are never copied here.
    leads = [headers[0], *(trailer + h for h in headers[1:])]

    async def body() -> AsyncIterator[bytes | memoryview]:
        for lead, inst in zip(leads, cached, strict=True):
            yield lead
            try:
                async for chunk in _file_chunks(inst.file, inst.size):
                    yield chunk
            except OSError as exc:
                # Evicted or replaced since it was listed: end short (the client
                # sees fewer bytes than Content-Length) rather than lie.
                log.error("cached instance %s could not be sent: %s", inst.sop_uid, exc)
                return
            add_count(request)
            # A warm stream would otherwise never yield the loop (PEERS.md).
            await asyncio.sleep(0)
        yield trailer + closing

    return StreamingResponse(
        body(),
        media_type=multipart.content_type(boundary, "application/dicom"),
        headers={"Content-Length": str(length)},
    )


@router.get("/studies/{study}", summary="Retrieve a study's instances")
async def retrieve_study(
    study: str, request: Request, gateway: GatewayDep, node: NodeDep
) -> Response:
    """Every instance of the study, series by series, as `multipart/related;
    type="application/dicom"`, streamed as the PACS delivers them (C-MOVE to the gateway, or
    C-GET). Explicit VR Little Endian unless `transfer-syntax=*` asks for the stored syntax. A
    study complete in the cache is answered without asking the PACS. 206 with a `Warning` when
    only part of it arrived."""
    check_uid("study", study)
    negotiated = _negotiate(request, ResourceKind.INSTANCES)
    series = await series_of_study(gateway, node, study)
    if not series:
        raise NotFound(f"study {study} was not found on {node.name!r}")
    delivery = Delivery(gateway.retriever, node, study, series)
    return await _multipart_instances(request, gateway, node, delivery, negotiated)


@router.get("/studies/{study}/series/{series}", summary="Retrieve a series' instances")
async def retrieve_series(
    study: str, series: str, request: Request, gateway: GatewayDep, node: NodeDep
) -> Response:
    """Every instance of the series as `multipart/related; type="application/dicom"`, streamed
    as they arrive (see the study resource for transfer syntaxes, caching and partial results)."""
    check_uid("study", study)
    check_uid("series", series)
    negotiated = _negotiate(request, ResourceKind.INSTANCES)
    delivery = Delivery(gateway.retriever, node, study, [series])
    return await _multipart_instances(request, gateway, node, delivery, negotiated)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}", summary="Retrieve one instance"
)
async def retrieve_instance(
    study: str, series: str, instance: str, request: Request, gateway: GatewayDep, node: NodeDep
) -> Response:
    """One instance: from the cache, from a running retrieve of its series, or by an IMAGE level
    C-MOVE. Multipart by default; single-part `application/dicom` when asked for."""
    for name, uid in (("study", study), ("series", series), ("instance", instance)):
        check_uid(name, uid)
    negotiated = _negotiate(request, ResourceKind.INSTANCES, single=True)
    inst = await gateway.retriever.instance(node, study, series, instance)
    data, ts = await _part_body(inst, negotiated)
    payload = _read(data) if isinstance(data, str) else data
    note(request, count=1)
    if not negotiated.multipart:
        return Response(payload, media_type=f"application/dicom; transfer-syntax={ts}")
    boundary = multipart.new_boundary()
    body = b"".join(
        [
            multipart.part_header(
                boundary,
                f"application/dicom; transfer-syntax={ts}",
                _instance_url(_base(request), inst),
                len(payload),
            ),
            payload,
            multipart.part_trailer(),
            multipart.closing(boundary),
        ]
    )
    return Response(body, media_type=multipart.content_type(boundary, "application/dicom"))


# -- metadata ----------------------------------------------------------------


def _metadata(
    request: Request,
    parts: list[bytes],
    store: MetadataStore,
    warning: str | None = None,
    *,
    partial: bool = False,
) -> Response:
    body = store.document(parts, _base(request))
    note(request, count=len(parts))
    if warning:
        # Some instances are missing (PS3.18 Table 10.4.3-1: 206 Partial Content),
        # or all arrived but the PACS ended with a warning status (200).
        return Response(
            body,
            status_code=206 if partial else 200,
            media_type=DICOM_JSON,
            headers={"Warning": f"299 {SERVICE}: {warning}"},
        )
    return Response(body, media_type=DICOM_JSON)


@router.get("/studies/{study}/metadata", summary="Metadata of a study's instances")
async def study_metadata(
    study: str, request: Request, gateway: GatewayDep, node: NodeDep
) -> Response:
    """DICOM JSON (PS3.18 Annex F) of every instance of the study, without pixel data: bulk data
    values are `BulkDataURI`s pointing at the bulkdata resource. The instances are retrieved
    (and cached) first."""
    check_uid("study", study)
    _negotiate(request, ResourceKind.METADATA)
    series = await series_of_study(gateway, node, study)
    if not series:
        raise NotFound(f"study {study} was not found on {node.name!r}")
    delivery = Delivery(gateway.retriever, node, study, series)
    parts, warning, partial = await until_disconnected(
        request, gateway.metadata.of_delivery(delivery)
    )
    return _metadata(request, parts, gateway.metadata, warning, partial=partial)


@router.get("/studies/{study}/series/{series}/metadata", summary="Metadata of a series")
async def series_metadata(
    study: str, series: str, request: Request, gateway: GatewayDep, node: NodeDep
) -> Response:
    """DICOM JSON of every instance of the series, bulk data as `BulkDataURI`s (see the study
    metadata)."""
    check_uid("study", study)
    check_uid("series", series)
    _negotiate(request, ResourceKind.METADATA)
    delivery = Delivery(gateway.retriever, node, study, [series])
    parts, warning, partial = await until_disconnected(
        request, gateway.metadata.of_delivery(delivery)
    )
    return _metadata(request, parts, gateway.metadata, warning, partial=partial)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    summary="Metadata of one instance",
)
async def instance_metadata(
    study: str, series: str, instance: str, request: Request, gateway: GatewayDep, node: NodeDep
) -> Response:
    """DICOM JSON of one instance, bulk data as `BulkDataURI`s."""
    for name, uid in (("study", study), ("series", series), ("instance", instance)):
        check_uid(name, uid)
    _negotiate(request, ResourceKind.METADATA)
    inst = await gateway.retriever.instance(node, study, series, instance)
    parts = await asyncio.to_thread(gateway.metadata.encoded_all, [inst])
    return _metadata(request, parts, gateway.metadata)


# -- frames and bulk data -----------------------------------------------------


def frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidRequest(
            f"frames must be a comma-separated list of numbers, got {text[:40]!r}"
        ) from None
    if not numbers or any(n < 1 for n in numbers):
        raise InvalidRequest("frame numbers start at 1")
    if len(numbers) > 10000:
        raise InvalidRequest("too many frames in one request")
    repeated = sorted(n for n, count in Counter(numbers).items() if count > 1)
    if repeated:
        # Each repetition would be one more copy of the frame in an answer
        # built in memory: a short URL must not buy an unbounded body.
        raise InvalidRequest(
            f"a frame list names a frame more than once: {', '.join(map(str, repeated[:5]))}"
        )
    return numbers


def _octet_response(
    parts: list[bytes], locations: list[str], ts: str | None, negotiated: Negotiated
) -> Response:
    bare = negotiated.part_type
    part_type = bare
    if ts:
        part_type += f"; transfer-syntax={ts}"
    if not negotiated.multipart and len(parts) == 1:
        return Response(parts[0], media_type=part_type)
    boundary = multipart.new_boundary()
    chunks: list[bytes] = []
    for data, location in zip(parts, locations, strict=True):
        chunks += [
            multipart.part_header(boundary, part_type, location, len(data)),
            data,
            multipart.part_trailer(),
        ]
    chunks.append(multipart.closing(boundary))
    return Response(b"".join(chunks), media_type=multipart.content_type(boundary, bare))


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    summary="Retrieve frames of an instance",
)
async def retrieve_frames(
    study: str,
    series: str,
    instance: str,
    frames: str,
    request: Request,
    gateway: GatewayDep,
    node: NodeDep,
) -> Response:
    """Pixel data of the listed frames (1-based, comma-separated) as `multipart/related;
    type="application/octet-stream"`: uncompressed little-endian bytes by default, the stored
    codestream with `transfer-syntax=*`. `type="image/jpeg"` (jls, jp2, jpx, jphc, dicom-rle)
    sends the stored codestream of an instance stored in that compression (406 otherwise). One
    frame may be asked for single-part. A frame beyond NumberOfFrames is 404."""
    for name, uid in (("study", study), ("series", series), ("instance", instance)):
        check_uid(name, uid)
    numbers = frame_numbers(frames)
    single = len(numbers) == 1
    # Checked before any retrieve, then chosen for the instance as stored.
    _negotiate(request, ResourceKind.FRAMES, single=single)
    inst = await gateway.retriever.instance(node, study, series, instance)
    negotiated = _negotiate(
        request, ResourceKind.FRAMES, single=single, stored_syntax=inst.transfer_syntax
    )

    def cut() -> tuple[list[bytes], str]:
        info = dicom_files.pixel_data_info(inst.path)
        data = dicom_files.frames(inst.path, numbers, negotiated.transfer_syntax)
        # Never "*" in a part header: cornerstone reads the syntax from it.
        return data, info.delivered_syntax(negotiated.transfer_syntax)

    data, ts = await asyncio.to_thread(cut)
    note(request, count=len(data))
    url = _instance_url(_base(request), inst)
    return _octet_response(data, [f"{url}/frames/{n}" for n in numbers], ts, negotiated)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag_path:path}",
    summary="Retrieve a bulk data value of an instance",
)
async def retrieve_bulkdata(
    study: str,
    series: str,
    instance: str,
    tag_path: str,
    request: Request,
    gateway: GatewayDep,
    node: NodeDep,
) -> Response:
    """One bulk data value of an instance, at the path its metadata's `BulkDataURI` names; pixel
    data (7FE00010) uncompressed."""
    for name, uid in (("study", study), ("series", series), ("instance", instance)):
        check_uid(name, uid)
    path = _parse_tag_path(tag_path)
    negotiated = _negotiate(request, ResourceKind.BULKDATA, single=True)
    inst = await gateway.retriever.instance(node, study, series, instance)
    data = await asyncio.to_thread(dicom_files.bulkdata, inst.path, path)
    note(request, count=1)
    # Pixel data comes back uncompressed (Explicit VR Little Endian) from bulkdata.
    ts = "1.2.840.10008.1.2.1" if path == (0x7FE00010,) else None
    return _octet_response([data], [str(request.url)], ts, negotiated)


def _parse_tag_path(text: str) -> tuple[int, ...]:
    parts = [p for p in text.split("/") if p]
    out: list[int] = []
    try:
        for i, part in enumerate(parts):
            if i % 2 == 0:
                if len(part) != 8:
                    raise ValueError(part)
                out.append(int(part, 16))
            else:
                out.append(int(part))
    except ValueError:
        raise InvalidRequest(f"{text[:80]!r} is not a bulk data path") from None
    if not out or len(out) % 2 == 0:
        raise InvalidRequest(f"{text[:80]!r} is not a bulk data path")
    return tuple(out)
