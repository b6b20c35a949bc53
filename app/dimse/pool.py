"""A bounded pool of reusable associations to one PACS.

Associations (``app/dimse/requestor.py``) are blocking and carry one DIMSE
operation at a time, so the pool *leases* an association to exactly one
operation and runs the blocking work on a thread pool.
All bookkeeping happens on the event loop thread; worker threads only touch the
association they were handed.

Life of an association: opened on demand up to ``max_associations``; returned
to the idle list after an operation that left it established; released when it
has been idle for ``idle_timeout`` (before the PACS drops it under us), or
as soon as the PACS closed it; aborted and discarded after any failure, timeout or
cancellation that might leave it in an unknown state.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from app.config import PacsNode
from app.dimse.requestor import AssociateRejected, ConnectFailed, RequestorAssociation, associate
from app.dimse.status import CANCEL
from app.dimse.tls import ClientContext, client_context
from app.errors import (
    AssociationRejected,
    PacsFailureStatus,
    PacsUnavailable,
    PoolExhausted,
    TlsHandshakeFailed,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# PS3.8 Table 9-21: A-ASSOCIATE-RJ result/source/reason, so that a rejection
# names the real cause ("called AE title not recognized") rather than a code.
_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


class DimseObserver(Protocol):
    """Told about every DIMSE operation a pool carries (metrics).

    *status* is the final DIMSE status, or None when there was none (abort,
    timeout, lost association).  Called on the event loop thread.
    """

    def __call__(self, node: str, operation: str, status: int | None, seconds: float) -> None: ...


@dataclass(eq=False)
class Lease:
    """One association lent to one operation."""

    assoc: RequestorAssociation
    created: float
    last_used: float
    reused: bool = False
    # When the current operation took it (for the hold-time estimate behind Retry-After).
    leased_at: float = 0.0
    # The operation clears this when it cannot vouch for the association's state.
    reusable: bool = True
    # The thread-pool future of the operation running on it, if any.
    busy: asyncio.Future[Any] | None = None
    _msg_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def next_message_id(self) -> int:
        """Message IDs unique on this association (PS3.7 9.3.1.1), wrapping at 16 bits."""
        return next(self._msg_ids) % 0xFFFF + 1


@dataclass(frozen=True)
class PoolState:
    """A snapshot for the ``/pacs`` endpoint and the tests."""

    max_associations: int
    in_use: int
    idle: int
    waiting: int
    opened_total: int
    failed_opens: int
    discarded_total: int
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class AssociationPool:
    """Associations to one PACS node, leased one operation at a time."""

    def __init__(
        self,
        node: PacsNode,
        *,
        calling_ae_title: str,
        contexts: Sequence[tuple[str, Sequence[str]]],
        executor: Executor,
    ) -> None:
        self.node = node
        self._executor = executor
        self.calling_ae_title = calling_ae_title
        self._contexts = tuple((a, tuple(ts)) for a, ts in contexts)
        self.tls = node_tls(node)
        self._slots = asyncio.Semaphore(node.max_associations)
        self._idle: deque[Lease] = deque()
        self._in_use: set[Lease] = set()
        self._waiting = 0
        self._opened = 0
        self._failed_opens = 0
        self._discarded = 0
        self._last_error: str | None = None
        self._closed = False
        self._reaper: asyncio.Task[None] | None = None
        self.observer: DimseObserver | None = None
        # Moving average of how long an operation keeps an association.
        self._hold_avg: float | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the idle reaper; call from the running event loop."""
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(
                self._reap_idle(), name=f"pool-reaper-{self.node.name}"
            )

    async def close(self) -> None:
        """Release idle associations; those in use are released when returned."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        idle, self._idle = list(self._idle), deque()
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._executor, _release, lease.assoc) for lease in idle),
            return_exceptions=True,
        )

    @property
    def tls_args(self) -> tuple[ClientContext, str] | None:
        """pynetdicom's ``tls_args`` for an association to this node (C-GET), or None."""
        return (self.tls, self.node.host) if self.tls is not None else None

    def state(self) -> PoolState:
        return PoolState(
            max_associations=self.node.max_associations,
            in_use=len(self._in_use),
            idle=len(self._idle),
            waiting=self._waiting,
            opened_total=self._opened,
            failed_opens=self._failed_opens,
            discarded_total=self._discarded,
            last_error=self._last_error,
        )

    def observe(self, operation: str, status: int | None, elapsed: float) -> None:
        """Report one finished operation to the observer, if any."""
        if self.observer is not None:
            self.observer(self.node.name, operation, status, elapsed)

    # -- leasing -----------------------------------------------------------

    def _retry_after(self) -> int:
        """Seconds a refused client should wait (Retry-After): the requests waiting now,
        this one included, share ``max_associations`` slots, each held about as long as
        operations have lately held one.  Before any came back, the oldest lease's age
        is the best guess.  Whole seconds, 1 to 60 (RFC 9110 §10.2.3)."""
        hold = self._hold_avg
        if hold is None:
            now = time.monotonic()
            hold = max((now - lease.leased_at for lease in self._in_use), default=1.0)
        estimate = hold * max(self._waiting, 1) / self.node.max_associations
        return max(1, min(60, math.ceil(estimate)))

    async def acquire(self, *, fresh: bool = False) -> Lease:
        """Lease an association, opening one if none is idle.

        Waits at most ``acquire_timeout`` for a free slot (then PoolExhausted).
        With *fresh*, idle associations are not reused: the caller has just seen
        one die and wants a new connection.
        """
        if self._closed:
            raise PacsUnavailable(self.node.name, "the gateway is shutting down")
        self._waiting += 1
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._slots.acquire(), self.node.acquire_timeout)
        except TimeoutError:
            raise PoolExhausted(
                self.node.name, time.monotonic() - started, retry_after=self._retry_after()
            ) from None
        finally:
            self._waiting -= 1
        try:
            lease = self._take_idle() if not fresh else None
            if lease is None:
                lease = await self._open()
        except BaseException:
            self._slots.release()
            raise
        self._in_use.add(lease)
        lease.leased_at = time.monotonic()
        return lease

    @contextlib.asynccontextmanager
    async def lease(self, *, fresh: bool = False) -> AsyncIterator[Lease]:
        """``async with pool.lease() as lease:`` acquire, then always give back."""
        lease = await self.acquire(fresh=fresh)
        try:
            yield lease
        finally:
            self.release(lease)

    def release(self, lease: Lease) -> None:
        """Return a lease; safe to call while its operation still runs on a thread.

        Call on the event loop thread.  A lease whose thread has not finished (the
        awaiting task was cancelled) goes back only when the thread is done.
        """
        if lease not in self._in_use:
            return
        if lease.busy is not None and not lease.busy.done():
            lease.busy.add_done_callback(lambda _f: self.release(lease))
            return
        self._in_use.discard(lease)
        self._slots.release()
        held = time.monotonic() - lease.leased_at
        self._hold_avg = held if self._hold_avg is None else 0.8 * self._hold_avg + 0.2 * held
        keep = lease.reusable and self.node.reuse_associations and not self._closed
        if keep and lease.assoc.is_established:
            lease.last_used = time.monotonic()
            lease.reused = True
            self._idle.append(lease)
        else:
            self._discard(lease, abort=not lease.reusable)

    async def run(self, lease: Lease, fn: Callable[[Lease], T]) -> T:
        """Run blocking *fn* with the lease on the thread pool.

        If the awaiting task is cancelled, the thread keeps running (it cannot be
        interrupted) and the lease goes back to the pool only when it finishes,
        so an association never carries two operations.
        """
        loop = asyncio.get_running_loop()
        # The worker logs with the caller's context (its request id), which
        # run_in_executor would not carry over by itself.
        context = contextvars.copy_context()
        future = loop.run_in_executor(self._executor, context.run, fn, lease)
        lease.busy = future
        return await asyncio.shield(future)

    async def run_observed(
        self,
        lease: Lease,
        fn: Callable[[Lease], T],
        operation: str,
        status_of: Callable[[T], int],
    ) -> T:
        """:meth:`run`, reporting the operation's final status and time to the observer.

        A failure status raised as ``PacsFailureStatus`` is reported as that
        status; a cancelled wait as Cancel (FE00: the worker sends C-CANCEL);
        any other error (abort, timeout, lost association) without a status.
        """
        started = time.monotonic()
        try:
            result = await self.run(lease, fn)
        except PacsFailureStatus as exc:
            self.observe(operation, exc.status, time.monotonic() - started)
            raise
        except asyncio.CancelledError:
            self.observe(operation, CANCEL, time.monotonic() - started)
            raise
        except Exception:
            self.observe(operation, None, time.monotonic() - started)
            raise
        self.observe(operation, status_of(result), time.monotonic() - started)
        return result

    # -- internals ---------------------------------------------------------

    def _take_idle(self) -> Lease | None:
        now = time.monotonic()
        while self._idle:
            lease = self._idle.pop()  # most recently used first: likeliest alive
            if lease.assoc.is_established and now - lease.last_used < self.node.idle_timeout:
                return lease
            self._discard(lease, abort=False)
        return None

    async def _open(self) -> Lease:
        loop = asyncio.get_running_loop()
        node = self.node
        started = time.monotonic()
        opening = loop.run_in_executor(
            self._executor,
            functools.partial(self.associate, self.calling_ae_title, self._contexts),
        )
        try:
            assoc = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The caller left (client gone) while the thread still negotiates:
            # whatever it opens must not linger on the PACS until its timeout.
            opening.add_done_callback(self._release_orphan)
            raise
        except AssociateRejected as exc:
            self._failed_opens += 1
            text = _REJECT_REASONS.get(
                (exc.source, exc.reason), f"source {exc.source}, reason {exc.reason}"
            )
            if exc.transient:
                message = f"association rejected for now ({text}); try again later"
            else:
                message = (
                    f"association rejected ({text}); check that the PACS knows AE title "
                    f"{self.calling_ae_title!r} and that its AE title is {node.ae_title!r}"
                )
            self._last_error = message
            raise AssociationRejected(node.name, message, transient=exc.transient) from None
        except ConnectFailed as exc:
            self._failed_opens += 1
            # The context saw the TLS failure pynetdicom or the socket reported.
            tls_failure = tls_failure_since(self.tls, node, started)
            if tls_failure is not None:
                self._last_error = tls_failure.message
                raise tls_failure from None
            self._last_error = f"cannot open an association to {node.host}:{node.port}: {exc}"
            raise PacsUnavailable(node.name, self._last_error) from None
        self._opened += 1
        now = time.monotonic()
        log.debug("association to %s opened in %.1f ms", node.name, (now - started) * 1000)
        return Lease(assoc=assoc, created=now, last_used=now)

    def associate(
        self,
        calling_ae: str,
        contexts: Sequence[tuple[str, Sequence[str]]],
        scp_roles: Sequence[str] = (),
    ) -> RequestorAssociation:
        """Open an association to the node with its limits and TLS (blocking):
        the pool's own, or a C-GET's with its storage contexts."""
        node = self.node
        return associate(
            node.host,
            node.port,
            calling_ae=calling_ae,
            called_ae=node.ae_title,
            contexts=contexts,
            max_pdu=node.max_pdu,
            connect_timeout=node.connect_timeout,
            acse_timeout=node.acse_timeout,
            dimse_timeout=node.dimse_timeout,
            tls=self.tls,
            server_hostname=node.host,
            scp_roles=scp_roles,
        )

    def _release_orphan(self, opening: asyncio.Future[RequestorAssociation]) -> None:
        if opening.cancelled() or opening.exception() is not None:
            return
        self._close_assoc(opening.result(), abort=False)

    def _discard(self, lease: Lease, *, abort: bool) -> None:
        self._discarded += 1
        self._close_assoc(lease.assoc, abort=abort)

    def _close_assoc(self, assoc: RequestorAssociation, *, abort: bool) -> None:
        fn = _abort if abort else _release
        try:
            self._executor.submit(fn, assoc)
        except RuntimeError:
            # The executor is shut down: an operation outlived the gateway's
            # shutdown (it was waiting on a silent PACS).  Still close it.
            threading.Thread(target=fn, args=(assoc,), daemon=True).start()

    async def _reap_idle(self) -> None:
        interval = max(0.5, min(5.0, self.node.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            keep: deque[Lease] = deque()
            for lease in self._idle:
                if lease.assoc.is_established and now - lease.last_used < self.node.idle_timeout:
                    keep.append(lease)
                else:
                    self._discard(lease, abort=False)
            self._idle = keep


def node_tls(node: PacsNode) -> ClientContext | None:
    """The node's SSL context (built once: it holds the loaded certificates)."""
    if not node.tls:
        return None
    return client_context(
        ca_file=node.tls_ca_file,
        cert_file=node.tls_cert_file,
        key_file=node.tls_key_file,
        verify_hostname=node.tls_verify_hostname,
    )


def tls_failure_since(
    tls: ClientContext | None, node: PacsNode, started: float
) -> TlsHandshakeFailed | None:
    """The error to raise for an association that failed in its TLS set-up, if it did.

    pynetdicom catches and logs TLS errors and reports only a failed
    association; the context recorded what went wrong.
    """
    if tls is None:
        return None
    failure = tls.failure_since(started)
    if failure is None:
        return None
    return TlsHandshakeFailed(node.name, f"DICOM TLS to {node.host}:{node.port}: {failure}")


def _release(assoc: RequestorAssociation) -> None:
    try:
        if assoc.is_established:
            assoc.release()
    except Exception:  # a dying peer must not take the reaper with it
        log.debug("release failed; aborting", exc_info=True)
        _abort(assoc)


def _abort(assoc: RequestorAssociation) -> None:
    with contextlib.suppress(Exception):
        assoc.abort()
