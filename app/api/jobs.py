"""Retrieve jobs over HTTP: start, poll, follow (Server-Sent Events), cancel, download.

``POST {base}/jobs`` is served under each DICOMweb base (it names the node);
the job itself is gateway-wide, at ``/jobs/{id}``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from app.api.audit import note
from app.api.auth import PrincipalDep
from app.api.deps import NodeDep
from app.api.errors import error_body
from app.auth import Principal
from app.dicomweb.query import check_uid
from app.errors import InvalidRequest, NotFound
from app.services.jobs import Job, JobEvent, JobManager, JobState

# POST under each DICOMweb base; the rest at the root.
create_router = APIRouter(tags=["Jobs"])
router = APIRouter(tags=["Jobs"])


def get_jobs(request: Request) -> JobManager:
    jobs: JobManager = request.app.state.jobs
    return jobs


JobsDep = Annotated[JobManager, Depends(get_jobs)]


def _visible(request: Request, principal: Principal, job: Job) -> bool:
    """A job is the caller's business when the caller may use its node."""
    node = request.app.state.settings.node(job.node)
    return principal.may_use_any() if node is None else principal.may_use(node)


def _job(request: Request, principal: Principal, jobs: JobManager, job_id: str) -> Job:
    job = jobs.get(job_id)
    if not _visible(request, principal, job):
        # The same answer as for an unknown id: other nodes' jobs are not listed either.
        raise NotFound(f"no job {job_id!r}")
    note(request, node=job.node)
    return job


class JobRequest(BaseModel):
    """What to retrieve: a study, or one series of it."""

    model_config = {"extra": "forbid"}

    study: str = Field(description="StudyInstanceUID")
    series: str | None = Field(
        default=None, description="SeriesInstanceUID; the whole study if absent"
    )
    nifti: bool = Field(
        default=False,
        description="convert the series to one NIfTI-1 volume, kept for GET /jobs/{id}/result",
    )
    compress: bool = Field(default=True, description="NIfTI as .nii.gz (true) or .nii")
    echo: int | None = Field(
        default=None, ge=1, description="NIfTI: EchoNumber of the volume (dcm2niix's _eN file)"
    )
    volume: int | None = Field(
        default=None, ge=1, description="NIfTI: number of the volume, as the 300 listing counts"
    )


def _when(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _path(request: Request, job: Job, *rest: str) -> str:
    root = request.scope.get("root_path", "").rstrip("/")
    return "/".join([f"{root}/jobs/{job.id}", *rest])


def job_json(request: Request, job: Job, event: JobEvent | None = None) -> dict[str, Any]:
    """The job as JSON; with *event*, as it was at that event."""
    state = event.state if event else job.state
    phase = event.phase if event else job.phase
    p = event.progress if event else job.progress
    body: dict[str, Any] = {
        "id": job.id,
        "state": state.value,
        "phase": phase.value,
        "node": job.node,
        "study": job.study,
        "series": job.series,
        "nifti": job.nifti,
        "progress": {
            "remaining": p.remaining,
            "completed": p.completed,
            "failed": p.failed,
            "warning": p.warning,
            "received": p.received,
        },
        "cached": job.cached,
        "created": _when(job.created),
        "started": _when(job.started) if state is not JobState.QUEUED else None,
        "finished": _when(job.finished) if state.finished else None,
        "links": {"self": _path(request, job), "events": _path(request, job, "events")},
    }
    if job.nifti:
        body["echo"], body["volume"] = job.echo, job.volume
        body["links"]["result"] = _path(request, job, "result")
        if job.resampled and state.finished:
            body["resampled"] = job.resampled
    if state.finished and job.error is not None:
        body["error"] = error_body(job.error)
    return body


def sse_message(data: str, *, event: str | None = None, event_id: int | None = None) -> bytes:
    """One Server-Sent Events message (HTML Living Standard §9.2.5): fields, then a blank line."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    # A data line ends at a line break; longer data is split over several lines.
    lines.extend(f"data: {line}" for line in data.splitlines() or [""])
    return ("\n".join(lines) + "\n\n").encode()


SSE_HEARTBEAT = b": heartbeat\n\n"


@create_router.post(
    "/jobs",
    status_code=202,
    summary="Start retrieving a study or series into the cache (or converting it to NIfTI)",
    responses={202: {"description": "Accepted; the job is at the Location header"}},
)
async def create_job(
    body: JobRequest, request: Request, node: NodeDep, jobs: JobsDep
) -> JSONResponse:
    """The retrieve runs in the background (shared with any WADO-RS request for the same
    series); follow it at `GET /jobs/{id}` or its `/events` stream."""
    check_uid("study", body.study)
    if body.series is not None:
        check_uid("series", body.series)
    note(request, uids={"study": body.study, **({"series": body.series} if body.series else {})})
    if body.nifti and body.series is None:
        raise InvalidRequest("nifti needs a series: a study is not one volume")
    if not body.nifti and (body.echo is not None or body.volume is not None):
        raise InvalidRequest("echo and volume choose a NIfTI volume: they need nifti")
    job = jobs.submit(
        node,
        body.study,
        body.series,
        nifti=body.nifti,
        compress=body.compress,
        echo=body.echo,
        volume=body.volume,
    )
    return JSONResponse(
        job_json(request, job), status_code=202, headers={"Location": _path(request, job)}
    )


@router.get("/jobs", summary="Every job the gateway holds, oldest first")
async def list_jobs(
    request: Request, principal: PrincipalDep, jobs: JobsDep
) -> list[dict[str, Any]]:
    """Queued, running and finished jobs (finished ones until `jobs_ttl` passes) on the nodes
    the caller may use."""
    return [job_json(request, job) for job in jobs.all() if _visible(request, principal, job)]


@router.get("/jobs/{job_id}", summary="A job's state and progress")
async def get_job(
    job_id: str, request: Request, principal: PrincipalDep, jobs: JobsDep
) -> dict[str, Any]:
    """State, phase, C-MOVE/C-GET sub-operation counts and instances received."""
    return job_json(request, _job(request, principal, jobs, job_id))


@router.get(
    "/jobs/{job_id}/events",
    summary="Server-Sent Events: one `progress` event per change, then one `end` event",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str,
    request: Request,
    principal: PrincipalDep,
    jobs: JobsDep,
    last_event_id: Annotated[int | None, Header()] = None,
) -> StreamingResponse:
    """Replays every change since the start (or since `Last-Event-ID`), then follows the
    job live, with heartbeat comments, until it ends."""
    job = _job(request, principal, jobs, job_id)
    heartbeat = jobs.heartbeat

    async def stream() -> AsyncIterator[bytes]:
        # Every change since the start (or since Last-Event-ID, on a reconnect).
        seen = last_event_id or 0
        while True:
            for event in job.events_after(seen):
                seen = event.seq
                name = "end" if event.state.finished else "progress"
                data = json.dumps(job_json(request, job, event), separators=(",", ":"))
                yield sse_message(data, event=name, event_id=event.seq)
                if event.state.finished:
                    return
            try:
                await asyncio.wait_for(job.changed(), timeout=heartbeat)
            except TimeoutError:
                yield SSE_HEARTBEAT

    # The response ends when the job ends; a client that leaves cancels the
    # generator (Starlette watches for the disconnect), not the job.
    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.delete(
    "/jobs/{job_id}",
    summary="Cancel an unfinished job (C-CANCEL), or forget a finished one",
    responses={204: {"description": "The finished job was forgotten"}},
)
async def delete_job(
    job_id: str, request: Request, principal: PrincipalDep, jobs: JobsDep
) -> Response:
    """A running job's retrieve is let go (C-CANCEL when nobody else reads it); the
    answer is the job once the PACS has ended it."""
    job = _job(request, principal, jobs, job_id)
    if job.state.finished:
        jobs.delete(job)
        return Response(status_code=204)
    await jobs.cancel(job)
    return JSONResponse(job_json(request, job))


@router.get(
    "/jobs/{job_id}/result",
    summary="The NIfTI file of a finished NIfTI job",
    response_class=FileResponse,
    responses={200: {"content": {"application/gzip": {}, "application/octet-stream": {}}}},
)
async def job_result(
    job_id: str, request: Request, principal: PrincipalDep, jobs: JobsDep
) -> FileResponse:
    """409 while the job runs; the `.nii.gz` or `.nii` once it is done."""
    path, name = jobs.result(_job(request, principal, jobs, job_id))
    media = "application/gzip" if name.endswith(".gz") else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=name)
