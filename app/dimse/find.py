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
from app.dimse import ul
from app.dimse.pool import AssociationPool, Lease
from app.dimse.requestor import (
    Lost,
    Message,
    Silent,
    command,
    decode_identifier,
    encode_identifier,
    request_command,
    us,
)
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
    assoc = lease.assoc
    result = FindResult()
    started = time.monotonic()
    context = assoc.context_for(model.value)
    if context is None:
        # Refused in negotiation (a PACS that only moves): nothing was sent, the
        # association stays good for what the PACS does accept.
        raise PacsError(node.name, f"the PACS accepted no {model.name} C-FIND context")
    msg_id = lease.next_message_id()
    cancel_sent = False
    failure: PacsFailureStatus | None = None

    def send_cancel() -> None:
        nonlocal cancel_sent
        if not cancel_sent:
            # Keep reading afterwards: the PACS ends with FE00 (or its final
            # status), and the association stays usable.
            assoc.send_cancel(context, msg_id)
            cancel_sent = True
            result.truncated = True

    try:
        assoc.send(
            context,
            request_command(ul.C_FIND_RQ, model.value, msg_id),
            encode_identifier(identifier, context),
        )
        while True:
            msg = assoc.receive(cancel=cancel, on_cancel=send_cancel)
            code = _answer_status(node.name, "C-FIND", msg, ul.C_FIND_RSP, msg_id)
            if code in st.PENDING:
                if not cancel_sent and msg.data_set is not None:
                    ident = decode_identifier(msg.data_set, context)
                    if accept is None or accept(ident):
                        result.matches.append(ident)
                stop = cancel.is_set() or (
                    max_matches is not None and len(result.matches) >= max_matches
                )
                if stop:
                    send_cancel()
                continue
            result.status = code
            # A Cancel the gateway did not ask for is the PACS giving up midway:
            # the matches so far are not the answer.
            if st.category(code) is st.Category.FAILURE or (code == st.CANCEL and not cancel_sent):
                failure = PacsFailureStatus(node.name, "C-FIND", code, msg.text(ul.ERROR_COMMENT))
            break
    except Silent as exc:
        lease.reusable = False
        raise DimseTimeout(node.name, f"C-FIND: {exc}") from None
    except Lost as exc:
        lease.reusable = False
        raise AssociationAborted(node.name, f"C-FIND: {exc}") from None
    except BaseException:
        # Answers may still be on their way: the next operation would read them as its own.
        lease.reusable = False
        assoc.abort()
        raise
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


def _answer_status(node: str, operation: str, msg: Message, field: int, msg_id: int) -> int:
    """The status of a response to *msg_id*; any other message breaks the protocol
    (one operation at a time on the association)."""
    status = msg.status
    if msg.us(ul.COMMAND_FIELD) != field or status is None:
        raise AssociationAborted(node, f"{operation}: the PACS answered with another message")
    if msg.us(ul.MESSAGE_ID_BEING_RESPONDED_TO) != msg_id:
        raise AssociationAborted(node, f"{operation}: the PACS answered another request")
    return status


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
    node = pool.node
    assoc = lease.assoc
    started = time.monotonic()
    context = assoc.context_for(VERIFICATION)
    if context is None:
        raise PacsError(node.name, "the PACS accepted no Verification context")
    msg_id = lease.next_message_id()
    try:
        assoc.send(
            context,
            command(
                [
                    (ul.AFFECTED_SOP_CLASS_UID, ul.pad_uid(VERIFICATION)),
                    (ul.COMMAND_FIELD, us(ul.C_ECHO_RQ)),
                    (ul.MESSAGE_ID, us(msg_id)),
                    (ul.COMMAND_DATA_SET_TYPE, us(ul.NO_DATA_SET)),
                ]
            ),
            None,
        )
        code = _answer_status(node.name, "C-ECHO", assoc.receive(), ul.C_ECHO_RSP, msg_id)
    except Silent as exc:
        lease.reusable = False
        raise DimseTimeout(node.name, f"C-ECHO: {exc}") from None
    except Lost as exc:
        lease.reusable = False
        raise AssociationAborted(node.name, f"C-ECHO: {exc}") from None
    except BaseException:
        lease.reusable = False
        assoc.abort()
        raise
    if code != st.SUCCESS:
        raise PacsFailureStatus(node.name, "C-ECHO", code, None)
    return time.monotonic() - started
