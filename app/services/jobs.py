"""Retrieve jobs: a study or series fetched into the cache, or made a NIfTI file, in the background.

A job rides on the retriever's single-flight fetches: a job and a WADO-RS
request for the same series share one C-MOVE (or C-GET), and the job's progress
is that retrieve's sub-operation counts (PS3.7 9.1.4.1.8-11) plus the instances
stored so far.  Cancelling a job lets go of its fetch, which sends C-CANCEL
when nobody else waits for it.  A finished prefetch leaves the series marked
complete in the cache, so later WADO-RS requests start no move.

Every change of a job's state or counts is kept as a numbered event, so an
event stream can start late (or resume after ``Last-Event-ID``) and still see
every change in order.  Jobs live in one ``JobManager`` made in the app
lifespan: at most ``jobs_max`` at once, ``jobs_concurrency`` running (the rest
queued), and a finished job is forgotten, its NIfTI file deleted,
``jobs_ttl`` seconds after it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from app.cache import CachedInstance
from app.config import PacsNode
from app.convert.intake import SeriesIntake
from app.convert.nifti import SeriesPart, Volume, build_part, to_nifti
from app.errors import (
    GatewayError,
    InvalidRequest,
    JobNotReady,
    NotFound,
    RetrieveIncomplete,
    TooManyJobs,
)
from app.runtime import Gateway
from app.services.feeder import BatchFeeder
from app.services.retrieve import Fetch, Target, incomplete_message
from app.services.studies import series_of_study

log = logging.getLogger(__name__)

# How long a cancelled job waits for the PACS to confirm C-CANCEL (its final
# response carries the counts at the time it stopped).
_CANCEL_GRACE = 10.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class JobPhase(StrEnum):
    RETRIEVE = "retrieve"
    CONVERT = "convert"


@dataclass(frozen=True)
class Progress:
    """Sub-operation counts of the retrieve (None where the PACS has not said) and
    the instances the gateway has stored."""

    remaining: int | None = None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    received: int = 0


@dataclass(frozen=True)
class JobEvent:
    """One observed change; ``seq`` counts from 1 in the job."""

    seq: int
    state: JobState
    phase: JobPhase
    progress: Progress


@dataclass(eq=False)
class Job:
    id: str
    node: str
    study: str
    series: str | None
    nifti: bool
    compress: bool
    # Which volume of a series dcm2niix would split (echoes, magnitude/phase).
    echo: int | None = None
    volume: int | None = None
    created: float = field(default_factory=time.time)
    state: JobState = JobState.QUEUED
    phase: JobPhase = JobPhase.RETRIEVE
    progress: Progress = field(default_factory=Progress)
    # True when everything came from the cache and no retrieve was needed.
    cached: bool = False
    error: GatewayError | None = None
    started: float | None = None
    finished: float | None = None
    result_path: Path | None = None
    result_name: str | None = None
    # Set when the voxels were interpolated (gantry tilt), as the NIfTI resource says it.
    resampled: str | None = None
    events: list[JobEvent] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _ended_at: float | None = None  # monotonic, for expiry

    def record(self) -> None:
        """Keep the current state as an event, if it differs from the last one."""
        last = self.events[-1] if self.events else None
        if last is not None and (last.state, last.phase, last.progress) == (
            self.state,
            self.phase,
            self.progress,
        ):
            return
        self.events.append(JobEvent(len(self.events) + 1, self.state, self.phase, self.progress))
        self._changed.set()
        self._changed = asyncio.Event()

    def events_after(self, seq: int) -> list[JobEvent]:
        return self.events[max(seq, 0) :]

    async def changed(self) -> None:
        await self._changed.wait()


class JobManager:
    """The jobs of one gateway, from app start to shutdown."""

    def __init__(self, gateway: Gateway) -> None:
        settings = gateway.settings
        self.gateway = gateway
        self.max_jobs = settings.jobs_max
        self.ttl = settings.jobs_ttl
        self.heartbeat = settings.jobs_heartbeat
        self.results = settings.work_dir / "jobs"
        self._jobs: dict[str, Job] = {}
        self._slots = asyncio.Semaphore(settings.jobs_concurrency)
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        # Results of an earlier process belong to jobs nobody can name any more.
        self.results.mkdir(parents=True, exist_ok=True)
        for stale in self.results.iterdir():
            with contextlib.suppress(OSError):
                stale.unlink()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="job-sweeper")

    async def close(self) -> None:
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- what the HTTP layer calls -----------------------------------------

    def submit(
        self,
        node: PacsNode,
        study: str,
        series: str | None = None,
        *,
        nifti: bool = False,
        compress: bool = True,
        echo: int | None = None,
        volume: int | None = None,
    ) -> Job:
        self._expire()
        if len(self._jobs) >= self.max_jobs:
            finished = [j for j in self._jobs.values() if j.state.finished]
            if not finished:
                raise TooManyJobs(self.max_jobs)
            self._forget(min(finished, key=lambda j: j.finished or 0.0))
        job = Job(uuid.uuid4().hex, node.name, study, series, nifti, compress, echo, volume)
        job.record()
        self._jobs[job.id] = job
        loop = asyncio.get_running_loop()
        job.task = loop.create_task(self._run(job, node), name=f"job-{job.id}")
        log.info(
            "job %s: %s study %s series %s from %s",
            job.id,
            "NIfTI of" if nifti else "retrieve of",
            study,
            series or "(all)",
            node.name,
        )
        return job

    def get(self, job_id: str) -> Job:
        self._expire()
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (finished jobs are kept for {self.ttl:g} s)")
        return job

    def all(self) -> list[Job]:
        self._expire()
        return sorted(self._jobs.values(), key=lambda j: j.created)

    async def cancel(self, job: Job) -> None:
        """Stop an unfinished job and wait until it has let go of its retrieve."""
        if job.state.finished or job.task is None:
            return
        job.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(job.task)

    def delete(self, job: Job) -> None:
        """Forget a finished job and delete its result."""
        if not job.state.finished:
            raise JobNotReady(f"job {job.id} is {job.state}: cancel it first")
        self._forget(job)

    def result(self, job: Job) -> tuple[Path, str]:
        if not job.nifti:
            raise JobNotReady(f"job {job.id} retrieves into the cache; it has no file to download")
        if job.state is not JobState.DONE or job.result_path is None:
            raise JobNotReady(f"job {job.id} is {job.state}: its NIfTI file is not ready")
        return job.result_path, job.result_name or job.result_path.name

    # -- expiry --------------------------------------------------------------

    def _expire(self) -> None:
        now = time.monotonic()
        for job in list(self._jobs.values()):
            if job._ended_at is not None and now - job._ended_at >= self.ttl:
                self._forget(job)

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        if job.result_path is not None:
            job.result_path.unlink(missing_ok=True)
            job.result_path = None

    async def _sweep(self) -> None:
        # Results are deleted on time even when nobody asks about jobs.
        while True:
            await asyncio.sleep(min(self.ttl / 2, 30.0))
            self._expire()

    # -- running a job -------------------------------------------------------

    async def _run(self, job: Job, node: PacsNode) -> None:
        try:
            async with self._slots:
                job.state, job.started = JobState.RUNNING, time.time()
                job.record()
                # A NIfTI job reads each file as it arrives (app/services/nifti.py).
                intake = SeriesIntake()
                feeder: BatchFeeder[Path] | None = BatchFeeder(intake.add) if job.nifti else None
                try:
                    await self._retrieve(job, node, feeder)
                    if feeder is not None:
                        await feeder.finish()
                except BaseException:
                    if feeder is not None:
                        feeder.cancel()
                    raise
                if feeder is not None:
                    job.phase = JobPhase.CONVERT
                    job.record()
                    await self._convert(job, intake)
                job.state = JobState.DONE
        except asyncio.CancelledError:
            job.state = JobState.CANCELLED
        except GatewayError as exc:
            job.state, job.error = JobState.FAILED, exc
        except Exception:
            log.exception("job %s failed unexpectedly", job.id)
            job.state = JobState.FAILED
            job.error = GatewayError("the job hit an unexpected error; see the gateway's log")
        finally:
            job.finished, job._ended_at = time.time(), time.monotonic()
            job.record()
            p = job.progress
            log.info(
                "job %s: %s (completed=%d failed=%d warning=%d received=%d)%s",
                job.id,
                job.state,
                p.completed,
                p.failed,
                p.warning,
                p.received,
                f": {job.error.message}" if job.error else "",
            )

    async def _retrieve(
        self, job: Job, node: PacsNode, feeder: BatchFeeder[Path] | None
    ) -> list[CachedInstance]:
        retriever = self.gateway.retriever
        source: list[CachedInstance] | Fetch
        if job.series is not None:
            source = await retriever.series_instances(node, job.study, job.series)
        else:
            source = await self._study_source(job, node)
        if isinstance(source, list):
            job.cached = True
            n = len(source)
            job.progress = Progress(remaining=0, completed=n, received=n)
            job.record()
            if feeder is not None:
                for inst in source:
                    feeder.push(inst.path)
            return source
        return await self._follow(job, node, source, feeder)

    async def _study_source(self, job: Job, node: PacsNode) -> list[CachedInstance] | Fetch:
        """The whole study from the cache, or one study-level retrieve: its counts
        cover the study, and it marks each series complete in the cache."""
        series = await series_of_study(self.gateway, node, job.study)
        if not series:
            raise NotFound(f"study {job.study} has no series on PACS node {node.name!r}")
        cached: list[CachedInstance] = []
        for uid in series:
            found = await asyncio.to_thread(self.gateway.cache.series, uid)
            if found is None:
                return self.gateway.retriever.fetch(node, Target(node.name, job.study))
            cached.extend(found)
        return cached

    async def _follow(
        self, job: Job, node: PacsNode, fetch: Fetch, feeder: BatchFeeder[Path] | None
    ) -> list[CachedInstance]:
        retriever = self.gateway.retriever
        fetch.subscribers += 1
        fed = 0
        try:
            while True:
                job.progress = _progress_of(fetch)
                job.record()
                if feeder is not None:
                    for inst in fetch.arrived[fed:]:
                        feeder.push(inst.path)
                    fed = len(fetch.arrived)
                if fetch.done:
                    break
                await fetch.changed()
        except asyncio.CancelledError:
            fetch.subscribers -= 1
            retriever.abandon(fetch)
            if fetch.cancel.is_set() and fetch.task is not None:
                # Wait for the PACS's answer to C-CANCEL: the job then reports
                # the counts at which the retrieve really stopped.
                await asyncio.wait({fetch.task}, timeout=_CANCEL_GRACE)
                job.progress = _progress_of(fetch)
            raise
        fetch.subscribers -= 1
        if fetch.error is not None:
            raise fetch.error
        if fetch.missing:
            raise RetrieveIncomplete(incomplete_message(fetch), node=node.name)
        if not fetch.arrived:
            what = f"series {job.series}" if job.series else f"study {job.study}"
            raise NotFound(f"{what} delivered no instances ({incomplete_message(fetch)})")
        return list(fetch.arrived)

    async def _convert(self, job: Job, intake: SeriesIntake) -> None:
        parts = await asyncio.to_thread(intake.parts)
        chosen = _choose(job, parts)
        volume = await asyncio.to_thread(build_part, chosen)
        job.resampled = volume.resampled or None
        suffix = ".nii.gz" if job.compress else ".nii"
        partial = self.results / f"{job.id}.part"
        stop = threading.Event()
        writing = asyncio.ensure_future(
            asyncio.to_thread(_write_nifti, volume, partial, job.compress, stop)
        )
        try:
            await asyncio.shield(writing)
        except asyncio.CancelledError:
            # The writer thread stops at its next chunk; the partial file goes.
            stop.set()
            with contextlib.suppress(Exception):
                await writing
            partial.unlink(missing_ok=True)
            raise
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        final = self.results / f"{job.id}{suffix}"
        partial.rename(final)
        job.result_path = final
        job.result_name = _file_name(volume, job.series or job.study) + chosen.suffix + suffix


def _choose(job: Job, parts: list[SeriesPart]) -> SeriesPart:
    """The one volume the job asked for, as the NIfTI resource chooses it."""
    chosen = [
        p
        for p in parts
        if (job.volume is None or p.number == job.volume)
        and (job.echo is None or p.echo_number == job.echo)
    ]
    held = "; ".join(
        f"volume {p.number}" + (f" (echo {p.echo_number})" if p.echo_number is not None else "")
        for p in parts
    )
    if not chosen:
        asked = " and ".join(
            f"{k}={v}" for k, v in (("echo", job.echo), ("volume", job.volume)) if v is not None
        )
        raise NotFound(f"no volume of this series matches {asked}: it holds {held}")
    if len(chosen) > 1:
        suffixes = ", ".join(p.suffix or "(none)" for p in parts)
        raise InvalidRequest(
            f"the series makes {len(parts)} volumes, as dcm2niix would write {len(parts)} "
            f"files ({suffixes}): start the job with echo or volume to choose one ({held})"
        )
    return chosen[0]


def _progress_of(fetch: Fetch) -> Progress:
    p = fetch.result.progress if fetch.result is not None else fetch.progress
    remaining = p.remaining
    if fetch.done and remaining is None and fetch.result is not None:
        # The final response may leave the count out (PS3.7 9.1.4.1.8): the
        # retrieve has ended, so nothing remains to be attempted.
        remaining = 0
    return Progress(remaining, p.completed, p.failed, p.warning, len(fetch.arrived))


def _write_nifti(volume: Volume, path: Path, compress: bool, stop: threading.Event) -> None:
    with open(path, "wb") as fh:
        for chunk in to_nifti(volume, compress=compress):
            if stop.is_set():
                return
            fh.write(chunk)


def _file_name(volume: Volume, fallback: str) -> str:
    """``<SeriesNumber>_<SeriesDescription>``, made safe for a file system."""
    first = volume.headers[0]
    number = str(first.get("SeriesNumber", "") or "").strip()
    description = str(first.get("SeriesDescription", "") or "").strip()
    stem = "_".join(p for p in (number, description) if p) or fallback
    return (_UNSAFE.sub("_", stem).strip("._") or "series")[:100]
