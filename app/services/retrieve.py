"""WADO-RS retrieves carried out as C-MOVEs to the gateway's own storage SCP.

A ``Fetch`` is one C-MOVE in flight and what it has delivered so far.  Every
HTTP request that needs the same series shares it (single flight): a viewer
asking for 60 frames of one series at once causes one C-MOVE, not 60.  Arrivals
are routed by the Move Originator Message ID, which the gateway keeps unique
among its outstanding moves, and checked against the fetch's study and series
before they are kept, so concurrent retrieves never receive each other's
instances.  Completed series are remembered by the cache and served without a
move next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import io
import itertools
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from pydicom.dataset import Dataset

from app.cache import CachedInstance, InstanceCache, WrittenInstance
from app.config import PacsNode
from app.dicomweb.attributes import Level
from app.dimse import get as dimse_get
from app.dimse import status as st
from app.dimse.get import GetAssociationRejected, GetModel, GetUnsupported, c_get
from app.dimse.move import MoveModel, MoveProgress, MoveResult, c_move, raise_for_refusal
from app.dimse.pool import AssociationPool
from app.dimse.storeproc import Arrival, Expectation, StorageProcess, StorageProcessError
from app.dimse.storescp import IncomingInstance, route_by_originator
from app.dimse.uidscan import file_study_series
from app.errors import (
    AssociationAborted,
    GatewayError,
    NotFound,
    PacsError,
    PacsFailureStatus,
    RetrieveIncomplete,
)
from app.services.expected import expected_count, expected_instances, holds

log = logging.getLogger(__name__)

# An instance nobody asked for: "Refused: not authorized" (PS3.7 C.5.4) says the
# sender may not do this, where C000 would send an operator looking for a corrupt
# file.  One that contradicts its retrieve's study or series is a processing
# failure; a write that failed is out of resources (PS3.4 B.2.3).
STATUS_NOT_EXPECTED = 0x0124
STATUS_MISMATCH = 0xC002
STATUS_WRITE_FAILED = 0xA700


@dataclass(frozen=True)
class Target:
    """What a retrieve asks for: a study, a series or one instance."""

    node: str
    study: str
    series: str | None = None
    instance: str | None = None

    @property
    def level(self) -> Level:
        if self.instance:
            return Level.IMAGE
        return Level.SERIES if self.series else Level.STUDY

    def covers(self, study: str, series: str, sop: str) -> bool:
        return (
            study == self.study
            and (self.series is None or series == self.series)
            and (self.instance is None or sop == self.instance)
        )


@dataclass(eq=False)
class Fetch:
    """One C-MOVE and the instances it delivered, in arrival order."""

    target: Target
    msg_id: int
    calling_ae: str
    loop: asyncio.AbstractEventLoop
    arrived: list[CachedInstance] = field(default_factory=list)
    result: MoveResult | None = None
    error: GatewayError | None = None
    done: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    subscribers: int = 0
    # The latest sub-operation counts of a pending (or the final) response.
    progress: MoveProgress = field(default_factory=MoveProgress)
    # SOP Instance UIDs the PACS listed for the target (C-FIND IMAGE), if asked.
    expected: frozenset[str] | None = None

    def report(self, progress: MoveProgress) -> None:
        """``on_progress`` hook of C-MOVE/C-GET: called on a DIMSE thread."""
        snapshot = dataclasses.replace(progress)
        with contextlib.suppress(RuntimeError):  # the loop closed under a draining move
            self.loop.call_soon_threadsafe(self._progressed, snapshot)

    def _progressed(self, progress: MoveProgress) -> None:
        self.progress = progress
        self._notify()

    def arrive(self, instances: list[CachedInstance]) -> None:
        """Called on the loop thread with instances as they are stored."""
        self.arrived.extend(instances)
        self._notify()

    def finish(self, result: MoveResult | None, error: GatewayError | None) -> None:
        self.result, self.error, self.done = result, error, True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    async def instances(self) -> AsyncIterator[CachedInstance]:
        """Every arrival, as soon as it is stored, until the move has ended."""
        index = 0
        while True:
            while index < len(self.arrived):
                yield self.arrived[index]
                index += 1
            if self.done:
                return
            await self.changed()

    @property
    def missing(self) -> int:
        """Sub-operations that did not deliver, as far as the PACS reported."""
        if self.result is None:
            return 0
        p = self.result.progress
        # Announced deliveries that never came count too: some PACS answer
        # Success while skipping instances (CTN counts them as warnings).
        undelivered = max(0, p.completed + p.warning - len(self.arrived))
        by_counts = p.failed + (p.remaining or 0) + undelivered
        return max(by_counts, len(self.not_arrived))

    @property
    def not_arrived(self) -> frozenset[str]:
        """Listed by the PACS's C-FIND but not delivered."""
        if self.expected is None:
            return frozenset()
        return self.expected - {inst.sop_uid for inst in self.arrived}


class Retriever:
    """Fetches, the cache, and the storage SCP's view of both."""

    def __init__(
        self,
        *,
        ae_title: str,
        cache: InstanceCache,
        nodes: dict[str, PacsNode],
        pools: dict[str, AssociationPool],
    ) -> None:
        self.ae_title = ae_title
        self.cache = cache
        self.nodes = nodes
        self.pools = pools
        self._fetches: dict[Target, Fetch] = {}
        self._by_msg: dict[int, Fetch] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.moves_started = 0
        # Set by the runtime once the storage SCP process runs: C-MOVE arrivals
        # come through it; C-GET arrivals come through open()/close() below.
        self.storage: StorageProcess | None = None

    # -- what HTTP handlers call -------------------------------------------

    def active(self, target: Target) -> Fetch | None:
        return self._fetches.get(target)

    def fetch(self, node: PacsNode, target: Target) -> Fetch:
        """The running fetch for *target*, or a new one (single flight)."""
        existing = self._fetches.get(target)
        if existing is not None:
            return existing
        loop = asyncio.get_running_loop()
        fetch = Fetch(target, self._allocate_id(), node.ae_title, loop)
        self._fetches[target] = fetch
        with self._lock:
            self._by_msg[fetch.msg_id] = fetch
        self.moves_started += 1
        fetch.task = loop.create_task(self._run(node, fetch), name=f"move-{fetch.msg_id}")
        return fetch

    async def series_instances(
        self, node: PacsNode, study: str, series: str
    ) -> list[CachedInstance] | Fetch:
        """A complete cached series, or the fetch that brings it."""
        cached = await asyncio.to_thread(self.cache.series, series)
        if cached is not None:
            return cached
        return self.fetch(node, Target(node.name, study, series))

    async def instance(self, node: PacsNode, study: str, series: str, sop: str) -> CachedInstance:
        """One instance: from the cache, from a running fetch of its series or study,
        or by an IMAGE-level move of its own."""
        cached = await asyncio.to_thread(self.cache.get, sop)
        if cached is not None and cached.series_uid == series and cached.study_uid == study:
            return cached
        for target in (
            Target(node.name, study, series),
            Target(node.name, study),
            Target(node.name, study, series, sop),
        ):
            fetch = self._fetches.get(target)
            if fetch is not None:
                found = await self._wait_for(fetch, sop)
                if found is not None:
                    return found
        fetch = self.fetch(node, Target(node.name, study, series, sop))
        found = await self._wait_for(fetch, sop)
        if found is None:
            if fetch.error is not None:
                raise fetch.error
            raise NotFound(f"instance {sop} was not found in series {series} on {node.name!r}")
        return found

    async def _wait_for(self, fetch: Fetch, sop: str) -> CachedInstance | None:
        fetch.subscribers += 1
        try:
            async for inst in fetch.instances():
                if inst.sop_uid == sop:
                    return inst
            return None
        finally:
            fetch.subscribers -= 1
            self.abandon(fetch)

    def abandon(self, fetch: Fetch) -> None:
        """Stop a move nobody waits for any more (C-CANCEL).

        It leaves the single-flight table at once, so a request arriving while
        the PACS winds down starts a fresh move instead of joining a cancelled one.
        """
        if fetch.subscribers > 0 or fetch.done:
            return
        fetch.cancel.set()
        if self._fetches.get(fetch.target) is fetch:
            del self._fetches[fetch.target]

    # -- the move ----------------------------------------------------------

    def _allocate_id(self) -> int:
        with self._lock:
            while True:
                candidate = next(self._ids) % 0xFFFF + 1
                if candidate not in self._by_msg:
                    return candidate

    async def _run(self, node: PacsNode, fetch: Fetch) -> None:
        target = fetch.target
        ident = Dataset()
        ident.QueryRetrieveLevel = target.level.value
        ident.StudyInstanceUID = target.study
        if target.series:
            ident.SeriesInstanceUID = target.series
        if target.instance:
            ident.SOPInstanceUID = target.instance
        result: MoveResult | None = None
        error: GatewayError | None = None
        check = node.expected_instances == "find" and target.level is not Level.IMAGE
        try:
            if self._method_for(node) == "move":
                result = await self._move(node, fetch, ident)
                raise_for_refusal(node.name, result)
            else:
                result, operation = await self._get_or_move(node, fetch, ident)
                if operation == "C-GET":
                    dimse_get.raise_for_refusal(node.name, result)
                else:
                    raise_for_refusal(node.name, result)
            if check and not fetch.cancel.is_set():
                # After the move, on the association it just gave back: no second
                # association, and nothing competes with the instances arriving.
                fetch.expected = await self._expected(node, fetch)
                _log_not_arrived(node, fetch, result)
            # sqlite, behind the lock the storage threads take: off the loop.
            await asyncio.to_thread(self._remember_complete, fetch, result)
        except PacsFailureStatus as exc:
            error = exc if fetch.arrived else await self._unless_absent(node, fetch, exc)
        except GatewayError as exc:
            error = exc
        except asyncio.CancelledError:
            error = PacsError(node.name, "the retrieve was cancelled")
            raise
        finally:
            with self._lock:
                self._by_msg.pop(fetch.msg_id, None)
            if self._fetches.get(target) is fetch:
                del self._fetches[target]
            fetch.finish(result, error)

    async def _unless_absent(
        self, node: PacsNode, fetch: Fetch, failure: PacsFailureStatus
    ) -> GatewayError:
        """NotFound when the PACS does not hold what was asked for, else *failure*.

        Orthanc fails a move of UIDs it does not hold (0xC000) where dcmqrscp
        answers Success with nothing moved; to a client both are an absent
        resource (404), not a PACS failure (502).  Only "unable to process"
        (Cxxx) is asked about: a refusal (0122 SOP class not supported, A7xx,
        A801, A900) says nothing about the UIDs.
        """
        if not 0xC000 <= failure.status <= 0xCFFF:
            return failure
        target = fetch.target
        pool = self.pools[node.name]
        if await holds(pool, target.study, target.series, target.instance) is not False:
            return failure
        if target.instance:
            what = f"instance {target.instance} of series {target.series}"
        elif target.series:
            what = f"series {target.series} of study {target.study}"
        else:
            what = f"study {target.study}"
        return NotFound(f"{what} was not found on {node.name!r}")

    async def _expected(self, node: PacsNode, fetch: Fetch) -> frozenset[str] | None:
        """What the PACS says the retrieve should have brought (see services/expected.py)."""
        pool = self.pools[node.name]
        target = fetch.target
        arrived = frozenset(inst.sop_uid for inst in fetch.arrived)
        if node.profile.study_counts:
            count = await expected_count(pool, target.study, target.series)
            if count is not None and count <= len(arrived):
                return arrived
        return await expected_instances(pool, target.study, target.series)

    async def _move(self, node: PacsNode, fetch: Fetch, ident: Dataset) -> MoveResult:
        storage = self.storage
        if storage is None:
            raise PacsError(node.name, "the gateway's storage SCP is not running")
        target = fetch.target
        expectation = Expectation(
            fetch.msg_id, fetch.calling_ae, target.study, target.series, target.instance
        )
        try:
            # The PACS may connect as soon as it has the C-MOVE-RQ: the receiver
            # must know the retrieve first.
            await asyncio.wrap_future(storage.expect(expectation))
        except StorageProcessError as exc:
            raise PacsError(
                node.name, f"the gateway's storage SCP is not available: {exc}"
            ) from exc
        try:
            result = await c_move(
                self.pools[node.name],
                ident,
                MoveModel.STUDY_ROOT,
                destination=self.ae_title,
                msg_id=fetch.msg_id,
                on_progress=fetch.report,
                cancel=fetch.cancel,
            )
            await self._settle(fetch, result)
        finally:
            storage.forget(fetch.msg_id)
        return result

    @functools.cached_property
    def _learned_methods(self) -> dict[str, Literal["get", "move"]]:
        """Node name -> the retrieve method that worked for a ``retrieve = "auto"``
        node, kept for the process lifetime."""
        return {}

    def _method_for(self, node: PacsNode) -> Literal["get", "move"]:
        if node.retrieve == "auto":
            if not node.profile.c_get:
                return "move"
            return self._learned_methods.get(node.name, "get")
        return node.retrieve

    def _learn(self, node: PacsNode, method: Literal["get", "move"], why: str) -> None:
        if self._learned_methods.get(node.name) != method:
            log.info(
                "node %s: retrieving with C-%s from now on (%s)", node.name, method.upper(), why
            )
        self._learned_methods[node.name] = method

    async def _get_or_move(
        self, node: PacsNode, fetch: Fetch, ident: Dataset
    ) -> tuple[MoveResult, str]:
        """C-GET; for an ``auto`` node, C-MOVE instead when the PACS refuses the C-GET.

        A definite refusal (no C-GET context accepted, permanent association
        rejection) switches the node to C-MOVE at once.  An A-ABORT or a failure
        status with nothing delivered (Orthanc aborts a C-GET its configuration
        does not allow) falls back too, but switches the node only if the C-MOVE
        then delivers; once C-GET has worked on a node, such failures are
        reported rather than retried.  Returns the result and the operation
        that produced it.
        """
        auto = node.retrieve == "auto"
        worked_before = self._learned_methods.get(node.name) == "get"
        try:
            result = await c_get(
                self.pools[node.name],
                ident,
                GetModel.STUDY_ROOT,
                ae_title=self.ae_title,
                msg_id=fetch.msg_id,
                sink=self,
                on_progress=fetch.report,
                cancel=fetch.cancel,
            )
        except (GetUnsupported, GetAssociationRejected) as exc:
            if not auto or (isinstance(exc, GetAssociationRejected) and not exc.permanent):
                raise
            self._learn(node, "move", f"C-GET refused: {exc.message}")
            return await self._move(node, fetch, ident), "C-MOVE"
        except AssociationAborted as exc:
            if not auto or worked_before or fetch.arrived or fetch.cancel.is_set():
                raise
            return await self._fall_back(node, fetch, ident, exc.message), "C-MOVE"
        await self._settle(fetch, result)
        if auto and not worked_before and dimse_get.refused(result) and not fetch.arrived:
            why = f"C-GET failed with status 0x{result.status:04X}"
            return await self._fall_back(node, fetch, ident, why), "C-MOVE"
        if auto:
            self._learn(node, "get", "C-GET works")
        return result, "C-GET"

    async def _fall_back(
        self, node: PacsNode, fetch: Fetch, ident: Dataset, why: str
    ) -> MoveResult:
        log.info("node %s: C-GET delivered nothing (%s); trying C-MOVE", node.name, why)
        result = await self._move(node, fetch, ident)
        if fetch.arrived:
            self._learn(node, "move", f"{why}, C-MOVE works")
        return result

    async def _settle(self, fetch: Fetch, result: MoveResult) -> None:
        # The PACS sends the final response after the last C-STORE-RSP, and each
        # C-STORE is answered only after its file is written and reported: the
        # last arrivals are at most a few messages behind on their way to this
        # loop.  A short grace covers them and PACS that answer before their
        # last sub-operation is acknowledged.
        expected = result.progress.completed + result.progress.warning
        for _ in range(40):
            if len(fetch.arrived) >= expected:
                return
            await asyncio.sleep(0.05)
        log.warning(
            "C-MOVE %d reported %d delivered sub-operations but %d instances arrived",
            fetch.msg_id,
            expected,
            len(fetch.arrived),
        )

    def _remember_complete(self, fetch: Fetch, result: MoveResult) -> None:
        p = result.progress
        if result.status != st.SUCCESS or p.failed or (p.remaining or 0):
            return
        if len(fetch.arrived) < p.completed + p.warning or fetch.not_arrived:
            return
        if fetch.target.level is Level.IMAGE:
            return
        by_series: dict[str, int] = {}
        for inst in fetch.arrived:
            by_series[inst.series_uid] = by_series.get(inst.series_uid, 0) + 1
        for series, count in by_series.items():
            self.cache.mark_series_complete(fetch.target.study, series, count)

    async def shutdown(self) -> None:
        for fetch in list(self._fetches.values()):
            fetch.cancel.set()
            if fetch.task is not None:
                fetch.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await fetch.task

    # -- arrivals from the storage SCP process (its reader thread) -----------

    def on_arrivals(self, arrivals: list[Arrival]) -> None:
        """Index instances the storage process accepted for running C-MOVEs."""
        with self._lock:
            fetches = [self._by_msg.get(a.msg_id) for a in arrivals]
        kept: list[tuple[Arrival, Fetch]] = []
        for arrival, fetch in zip(arrivals, fetches, strict=True):
            if fetch is None:
                # The retrieve ended (cancelled, or the PACS overran its final
                # response): nobody will read the file.
                log.warning("dropped %s: retrieve %d has ended", arrival.sop_uid, arrival.msg_id)
                arrival.temp.unlink(missing_ok=True)
            else:
                kept.append((arrival, fetch))
        # A file that cannot be kept is missing from its fetch, so the
        # retrieve reports it incomplete.
        cached = self.cache.commit_many(
            [
                WrittenInstance(
                    a.temp,
                    a.study_uid,
                    a.series_uid,
                    a.sop_uid,
                    a.sop_class_uid,
                    a.transfer_syntax,
                )
                for a, _ in kept
            ]
        )
        delivered: dict[Fetch, list[CachedInstance]] = {}
        for (_, fetch), instance in zip(kept, cached, strict=True):
            if instance is not None:
                delivered.setdefault(fetch, []).append(instance)
        for fetch, instances in delivered.items():
            fetch.loop.call_soon_threadsafe(fetch.arrive, instances)

    # -- the C-GET receive path's sink (pynetdicom's threads) ---------------

    def open(self, incoming: IncomingInstance) -> BinaryIO | int:
        fetch = self._route(incoming)
        if fetch is None:
            log.warning(
                "refused C-STORE of %s from %s (%s): no retrieve is waiting for it "
                "(Move Originator Message ID %s)",
                incoming.sop_instance_uid,
                incoming.calling_ae,
                incoming.peer_address,
                incoming.move_originator_message_id,
            )
            return STATUS_NOT_EXPECTED
        if fetch.target.instance and incoming.sop_instance_uid != fetch.target.instance:
            return STATUS_MISMATCH
        temp = self.cache.temp_path()
        return _TempFile(temp, fetch)

    def close(self, incoming: IncomingInstance, file: BinaryIO, ok: bool) -> int:
        assert isinstance(file, _TempFile)
        file.close()
        temp, fetch = file.temp, file.fetch
        if not ok:
            temp.unlink(missing_ok=True)
            return STATUS_WRITE_FAILED
        try:
            study, series = file_study_series(temp, incoming.transfer_syntax_uid)
            if not fetch.target.covers(study, series, incoming.sop_instance_uid):
                log.warning(
                    "refused %s: it belongs to study %s series %s, not to what retrieve %d "
                    "asked for",
                    incoming.sop_instance_uid,
                    study,
                    series,
                    fetch.msg_id,
                )
                temp.unlink(missing_ok=True)
                return STATUS_MISMATCH
            cached = self.cache.commit(
                temp,
                study_uid=study,
                series_uid=series,
                sop_uid=incoming.sop_instance_uid,
                sop_class_uid=incoming.sop_class_uid,
                transfer_syntax=incoming.transfer_syntax_uid,
            )
        except (OSError, ValueError) as exc:
            log.error("could not keep %s: %s", incoming.sop_instance_uid, exc)
            temp.unlink(missing_ok=True)
            return STATUS_WRITE_FAILED
        fetch.loop.call_soon_threadsafe(fetch.arrive, [cached])
        return st.SUCCESS

    def _route(self, incoming: IncomingInstance) -> Fetch | None:
        with self._lock:
            return route_by_originator(incoming, self._by_msg, lambda f: f.calling_ae)


class _TempFile(io.FileIO):
    """The file an arrival is written to, remembering where it belongs."""

    def __init__(self, temp: Path, fetch: Fetch) -> None:
        super().__init__(temp, "wb")
        self.temp = temp
        self.fetch = fetch


def incomplete_message(fetch: Fetch) -> str:
    result = fetch.result
    if result is None:
        return "the retrieve did not finish"
    p = result.progress
    listed = (
        f", {len(fetch.not_arrived)} of the {len(fetch.expected)} instances the PACS lists "
        "never arrived"
        if fetch.expected is not None and fetch.not_arrived
        else ""
    )
    return (
        f"the retrieve ended with status 0x{result.status:04X}: {len(fetch.arrived)} instances "
        f"arrived, {p.failed} failed, {p.warning} with warnings"
        + (f", {p.remaining} not attempted" if p.remaining else "")
        + listed
    )


def _log_not_arrived(node: PacsNode, fetch: Fetch, result: MoveResult) -> None:
    missing = fetch.not_arrived
    if missing:
        log.warning(
            "retrieve %d from %s: %d instances listed by C-FIND never arrived (status 0x%04X): %s",
            fetch.msg_id,
            node.name,
            len(missing),
            result.status,
            " ".join(sorted(missing)),
        )


def warning_note(fetch: Fetch) -> str | None:
    """A note for a retrieve that delivered everything but ended with a warning status."""
    result = fetch.result
    if result is None or result.category is not st.Category.WARNING:
        return None
    return (
        f"the PACS ended the retrieve with warning status 0x{result.status:04X} "
        f"({st.meaning(result.status)}); all {len(fetch.arrived)} instances it announced arrived"
    )


Source = list[CachedInstance] | Fetch


class Delivery:
    """The instances of a study or series retrieve, series by series.

    ``prepare()`` waits for the first instance (or the end of the first move) so
    that the HTTP status is decided before any byte is sent (PS3.18 Table
    10.4.3-1: 200, 206 partial, 404 nothing matched).  Iterating yields
    instances as they are stored; the next series' move starts while the
    current one streams.  After iteration, ``complete`` tells whether every
    instance the PACS announced arrived.
    """

    def __init__(self, retriever: Retriever, node: PacsNode, study: str, series: list[str]):
        self.retriever = retriever
        self.node = node
        self.study = study
        self.series = series
        self.problems: list[str] = []
        self.errors: list[GatewayError] = []
        self.complete = True
        # Set by prepare(): instances are known to be missing (HTTP 206).
        self.partial = False
        # Warning statuses of moves that delivered everything (a Warning header, 200).
        self.notes: list[str] = []
        self._sources: dict[int, Source] = {}

    async def _source(self, index: int) -> Source:
        if index not in self._sources:
            self._sources[index] = await self.retriever.series_instances(
                self.node, self.study, self.series[index]
            )
        return self._sources[index]

    async def all_cached(self) -> list[CachedInstance] | None:
        """Every instance, if every series is complete in the cache; starts no move."""
        out: list[CachedInstance] = []
        for series in self.series:
            cached = await asyncio.to_thread(self.retriever.cache.series, series)
            if cached is None:
                return None
            out.extend(cached)
        return out

    async def prepare(self) -> str | None:
        """Raise if nothing can be delivered; return a Warning text for a partial result.

        Cancelling it (the client left before the first byte) stops the moves
        this delivery started that nobody else waits for.
        """
        try:
            source = await self._source(0)
        except asyncio.CancelledError:
            self.abandon()
            raise
        if isinstance(source, list):
            return None
        fetch = source
        # Counted while waiting: a client that leaves the stream meanwhile must
        # not cancel a move this request is about to read.
        fetch.subscribers += 1
        try:
            while not fetch.arrived and not fetch.done:
                await fetch.changed()
        except asyncio.CancelledError:
            fetch.subscribers -= 1
            self.abandon()
            raise
        else:
            fetch.subscribers -= 1
        if fetch.arrived:
            if fetch.done and (fetch.error is not None or fetch.missing):
                self.partial = True
                return incomplete_message(fetch)
            return warning_note(fetch) if fetch.done else None
        if fetch.error is not None:
            raise fetch.error
        if fetch.missing:
            # The PACS matched instances but delivered none of them: its
            # failure, not an absence (404 would send the client away).
            raise RetrieveIncomplete(
                f"series {self.series[0]} of study {self.study}: {incomplete_message(fetch)}",
                self.node.name,
            )
        raise NotFound(
            f"series {self.series[0]} of study {self.study} delivered no instances "
            f"({incomplete_message(fetch)})"
        )

    def abandon(self) -> None:
        """Stop the moves of this delivery that no request waits for (C-CANCEL)."""
        for source in self._sources.values():
            if isinstance(source, Fetch):
                self.retriever.abandon(source)

    async def __aiter__(self) -> AsyncIterator[CachedInstance]:
        fetch: Fetch | None = None
        try:
            for index, series in enumerate(self.series):
                source = await self._source(index)
                if index + 1 < len(self.series):
                    await self._source(index + 1)  # start the next move now
                if isinstance(source, list):
                    for inst in source:
                        yield inst
                    continue
                fetch = source
                fetch.subscribers += 1
                async for inst in fetch.instances():
                    yield inst
                fetch.subscribers -= 1
                note = warning_note(fetch)
                if note and fetch.error is None and not fetch.missing:
                    self.notes.append(f"series {series}: {note}")
                if fetch.error is not None or fetch.missing:
                    self.complete = False
                    self.problems.append(f"series {series}: {incomplete_message(fetch)}")
                    if fetch.error is not None:
                        self.errors.append(fetch.error)
                fetch = None
        finally:
            if fetch is not None:
                fetch.subscribers -= 1
                self.retriever.abandon(fetch)
