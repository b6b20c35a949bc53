"""C-FIND and C-ECHO over the association pool (PS3.4 C.4.1, PS3.7 9.1.2/9.1.5)."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from pydicom.dataset import Dataset

from app.dimse import status as st
from app.dimse.pool import AssociationPool, Lease, quiesce_reactor
from app.errors import AssociationAborted, DimseTimeout, PacsError, PacsFailureStatus

log = logging.getLogger(__name__)


VERIFICATION = "1.2.840.10008.1.1"


class QueryModel(StrEnum):
    """Q/R information models, as their FIND SOP Class UIDs (PS3.4 C.6)."""

    PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.1"
    STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"


@dataclass
class FindResult:
    """What one C-FIND produced."""

    matches: list[Dataset] = field(default_factory=list)
    status: int = st.SUCCESS
    # True when the gateway stopped the PACS with C-CANCEL (enough matches, or
    # the caller went away): more matches may exist.
    truncated: bool = False
    elapsed: float = 0.0


async def c_find(
    pool: AssociationPool,
    identifier: Dataset,
    model: QueryModel,
    *,
    max_matches: int | None = None,
    accept: Callable[[Dataset], bool] | None = None,
) -> FindResult:
    """Run one C-FIND and collect its matches.

    *accept*, if given, runs on each answer in the worker thread; answers it
    refuses are dropped and do not count towards *max_matches*.
    Stops the PACS with C-CANCEL once *max_matches* arrived, or when the awaiting
    task is cancelled (the HTTP client went away), instead of draining it.  A
    reused association found dead is replaced once, transparently: C-FIND is
    idempotent.
    """
    for attempt in range(2):
        cancel = threading.Event()
        async with pool.lease(fresh=attempt > 0) as lease:
            try:
                return await pool.run_observed(
                    lease,
                    functools.partial(
                        _find_blocking,
                        pool=pool,
                        identifier=identifier,
                        model=model,
                        max_matches=max_matches,
                        accept=accept,
                        cancel=cancel,
                    ),
                    "C-FIND",
                    _find_status,
                )
            except AssociationAborted:
                if attempt == 0 and lease.reused:
                    log.info(
                        "C-FIND on a reused association to %s failed; retrying on a new one",
                        pool.node.name,
                    )
                    continue
                raise
            except asyncio.CancelledError:
                cancel.set()
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _find_status(result: FindResult) -> int:
    return result.status


def _echo_status(_rtt: float) -> int:
    return st.SUCCESS  # a failure status is raised


def _find_blocking(
    lease: Lease,
    pool: AssociationPool,
    identifier: Dataset,
    model: QueryModel,
    max_matches: int | None,
    accept: Callable[[Dataset], bool] | None,
    cancel: threading.Event,
) -> FindResult:
    node = pool.node
    result = FindResult()
    started = last = time.monotonic()
    msg_id = lease.next_message_id()
    cancel_sent = False
    failure: PacsFailureStatus | None = None
    if not any(str(cx.abstract_syntax) == model.value for cx in lease.assoc.accepted_contexts):
        # Refused in negotiation (a PACS that only moves): nothing was sent, the
        # association stays good for what the PACS does accept.
        raise PacsError(node.name, f"the PACS accepted no {model.name} C-FIND context")
    if not quiesce_reactor(lease.assoc):
        lease.reusable = False
        raise AssociationAborted(node.name, "association not responsive")
    try:
        responses = lease.assoc.send_c_find(identifier, str(model), msg_id=msg_id)
        for status, ident in responses:
            now = time.monotonic()
            if not status or "Status" not in status:
                lease.reusable = False
                _raise_lost(pool, "C-FIND", now - last)
            last = now
            code = int(status.Status)
            if code in st.PENDING:
                if not cancel_sent and ident is not None and (accept is None or accept(ident)):
                    result.matches.append(ident)
                stop = cancel.is_set() or (
                    max_matches is not None and len(result.matches) >= max_matches
                )
                if stop and not cancel_sent:
                    # Keep iterating afterwards: the PACS ends with FE00 (or its
                    # final status), and the association stays usable.
                    lease.assoc.send_c_cancel(msg_id, query_model=str(model))
                    cancel_sent = True
                    result.truncated = True
                continue
            result.status = code
            # A Cancel the gateway did not ask for is the PACS giving up midway:
            # the matches so far are not the answer.
            if st.category(code) is st.Category.FAILURE or (code == st.CANCEL and not cancel_sent):
                comment = status.get("ErrorComment")
                failure = PacsFailureStatus(
                    node.name, "C-FIND", code, str(comment) if comment else None
                )
            break
    except RuntimeError as exc:
        # pynetdicom raises RuntimeError when the association died before the request.
        lease.reusable = False
        raise AssociationAborted(node.name, f"association lost: {exc}") from exc
    except BaseException:
        # Responses may still be queued: the next operation would read them as its own.
        lease.reusable = False
        raise
    if not lease.assoc.is_established:
        lease.reusable = False
    if failure is not None:
        # Raised only now: a final response, even a failure, leaves the
        # association clean for the next operation.
        raise failure
    result.elapsed = time.monotonic() - started
    log.info(
        "C-FIND %s level=%s status=0x%04X matches=%d%s elapsed=%.1fms",
        node.name,
        identifier.get("QueryRetrieveLevel", "?"),
        result.status,
        len(result.matches),
        " (cancelled)" if cancel_sent else "",
        result.elapsed * 1000,
    )
    return result


def _raise_lost(pool: AssociationPool, operation: str, silent_for: float) -> None:
    node = pool.node
    if silent_for >= node.dimse_timeout * 0.9:
        raise DimseTimeout(node.name, f"{operation}: no answer within {node.dimse_timeout:g} s")
    raise AssociationAborted(node.name, f"{operation}: association aborted by the PACS or lost")


async def c_echo(pool: AssociationPool) -> float:
    """C-ECHO through the pool; returns the round-trip time in seconds."""
    for attempt in range(2):
        async with pool.lease(fresh=attempt > 0) as lease:
            try:
                return await pool.run_observed(
                    lease, lambda lz: _echo_blocking(lz, pool), "C-ECHO", _echo_status
                )
            except AssociationAborted:
                if attempt == 0 and lease.reused:
                    continue
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _echo_blocking(lease: Lease, pool: AssociationPool) -> float:
    started = time.monotonic()
    if not quiesce_reactor(lease.assoc):
        lease.reusable = False
        raise AssociationAborted(pool.node.name, "association not responsive")
    try:
        status = lease.assoc.send_c_echo(msg_id=lease.next_message_id())
    except RuntimeError as exc:
        lease.reusable = False
        raise AssociationAborted(pool.node.name, f"association lost: {exc}") from exc
    elapsed = time.monotonic() - started
    if not status or "Status" not in status:
        lease.reusable = False
        _raise_lost(pool, "C-ECHO", elapsed)
    code = int(status.Status)
    if code != st.SUCCESS:
        raise PacsFailureStatus(pool.node.name, "C-ECHO", code, None)
    return elapsed
