"""C-MOVE over the association pool (PS3.4 C.4.2, PS3.7 9.1.4).

The instances themselves arrive on other associations, opened by the PACS to
our storage SCP; this module only drives the request and reports the
sub-operation counts.  The caller chooses the Message ID: it must be unique among
the gateway's outstanding moves, because the PACS echoes it in each C-STORE as
Move Originator Message ID and that is how arrivals find their retrieve.
"""

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
    decode_identifier,
    encode_identifier,
    request_command,
)
from app.errors import AssociationAborted, DimseTimeout, PacsError, PacsFailureStatus

log = logging.getLogger(__name__)


class MoveModel(StrEnum):
    """Q/R MOVE SOP classes (PS3.4 C.6)."""

    PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.2"
    STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.2"


@dataclass
class MoveProgress:
    """Sub-operation counts (PS3.7 9.1.4.1.8-11); None where the PACS did not say."""

    remaining: int | None = None
    completed: int = 0
    failed: int = 0
    warning: int = 0


@dataclass
class MoveResult:
    status: int
    progress: MoveProgress
    failed_sop_uids: list[str] = field(default_factory=list)
    comment: str | None = None
    elapsed: float = 0.0

    @property
    def category(self) -> st.Category:
        return st.category(self.status)


class Unanswered(AssociationAborted):
    """The association failed before the PACS answered the request at all."""


def result_status(result: MoveResult) -> int:
    """The final status of a C-MOVE or C-GET, for the pool's observer."""
    return result.status


@dataclass(frozen=True, slots=True)
class RetrieveAnswer:
    """The facts of one C-MOVE-RSP or C-GET-RSP (PS3.7 9.3.3.2, 9.3.4.2), whoever
    decoded it: counts are None where the PACS left them out."""

    status: int
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    comment: str | None = None

    @classmethod
    def of_dataset(cls, rsp: Dataset) -> RetrieveAnswer:
        """From a response command set decoded by pynetdicom."""

        def count(keyword: str) -> int | None:
            value = rsp.get(keyword)
            return None if value is None else int(value)

        comment = rsp.get("ErrorComment")
        return cls(
            status=int(rsp.Status),
            remaining=count("NumberOfRemainingSuboperations"),
            completed=count("NumberOfCompletedSuboperations"),
            failed=count("NumberOfFailedSuboperations"),
            warning=count("NumberOfWarningSuboperations"),
            comment=str(comment) if comment else None,
        )


def fold_response(
    answer: RetrieveAnswer,
    progress: MoveProgress,
    on_progress: Callable[[MoveProgress], None] | None,
) -> bool:
    """Fold one response's counts into *progress*; True for a pending response
    (after reporting progress), False for the final one."""
    pending = answer.status in st.PENDING
    if not pending:
        # Counts are optional in the final response (PS3.7 9.1.4.1.8): a
        # "remaining" left over from the last pending one must not survive.
        progress.remaining = None
    if answer.remaining is not None:
        progress.remaining = answer.remaining
    if answer.completed is not None:
        progress.completed = answer.completed
    if answer.failed is not None:
        progress.failed = answer.failed
    if answer.warning is not None:
        progress.warning = answer.warning
    if pending and on_progress is not None:
        on_progress(progress)
    return pending


def failed_uid_list(ident: Dataset | None) -> list[str]:
    """The Failed SOP Instance UID List of a final response's identifier
    (PS3.4 C.4.2.1.4, C.4.3.1.4), possibly empty."""
    if ident is None or "FailedSOPInstanceUIDList" not in ident:
        return []
    value = ident.FailedSOPInstanceUIDList
    return [str(v) for v in (value if isinstance(value, list) else [value])]


async def c_move(
    pool: AssociationPool,
    identifier: Dataset,
    model: MoveModel,
    *,
    destination: str,
    msg_id: int,
    on_progress: Callable[[MoveProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> MoveResult:
    """Ask the PACS to send the matching instances to *destination*.

    A failure status is returned, not raised: the caller compares what arrived
    with the counts.  Setting *cancel* (or cancelling the awaiting task) sends
    C-CANCEL; the result then carries FE00.
    """
    cancel = cancel or threading.Event()
    for attempt in range(2):
        async with pool.lease(fresh=attempt > 0) as lease:
            try:
                return await pool.run_observed(
                    lease,
                    functools.partial(
                        _move_blocking,
                        pool=pool,
                        identifier=identifier,
                        model=model,
                        destination=destination,
                        msg_id=msg_id,
                        on_progress=on_progress,
                        cancel=cancel,
                    ),
                    "C-MOVE",
                    result_status,
                )
            except Unanswered:
                # A pooled association that died while idle: the PACS never
                # answered, so asking again on a new one repeats nothing.
                if attempt == 0 and lease.reused:
                    log.info(
                        "C-MOVE on a reused association to %s failed; retrying", pool.node.name
                    )
                    continue
                raise
            except asyncio.CancelledError:
                cancel.set()
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _move_blocking(
    lease: Lease,
    *,
    pool: AssociationPool,
    identifier: Dataset,
    model: MoveModel,
    destination: str,
    msg_id: int,
    on_progress: Callable[[MoveProgress], None] | None,
    cancel: threading.Event,
) -> MoveResult:
    node = pool.node
    assoc = lease.assoc
    context = assoc.context_for(str(model))
    if context is None:
        raise PacsError(node.name, f"the PACS accepted no {model.name} C-MOVE context")
    progress = MoveProgress()
    started = time.monotonic()
    answered = False
    cancelled = False

    def send_cancel() -> None:
        nonlocal cancelled
        if not cancelled:
            cancelled = True
            assoc.send_cancel(context, msg_id)
            log.debug("C-CANCEL sent for message %d", msg_id)

    try:
        assoc.send(
            context,
            request_command(ul.C_MOVE_RQ, str(model), msg_id, destination=destination),
            encode_identifier(identifier, context),
        )
        while True:
            msg = assoc.receive(cancel=cancel, on_cancel=send_cancel)
            answered = True
            answer = answer_of(node.name, "C-MOVE", msg, ul.C_MOVE_RSP, msg_id)
            if fold_response(answer, progress, on_progress):
                if cancel.is_set():
                    send_cancel()
                continue
            break
        failed_uids = (
            failed_uid_list(decode_identifier(msg.data_set, context)) if msg.data_set else []
        )
    except Silent as exc:
        lease.reusable = False
        raise DimseTimeout(node.name, f"C-MOVE: {exc}") from None
    except Lost as exc:
        lease.reusable = False
        lost = AssociationAborted if answered else Unanswered
        raise lost(node.name, f"C-MOVE: {exc}") from None
    except BaseException:
        lease.reusable = False
        assoc.abort()
        raise
    result = MoveResult(
        status=answer.status,
        progress=progress,
        failed_sop_uids=failed_uids,
        comment=answer.comment,
        elapsed=time.monotonic() - started,
    )
    if on_progress is not None:
        on_progress(progress)
    log.info(
        "C-MOVE %s level=%s -> %s status=0x%04X completed=%d failed=%d warning=%d elapsed=%.0fms",
        node.name,
        identifier.get("QueryRetrieveLevel", "?"),
        destination,
        answer.status,
        progress.completed,
        progress.failed,
        progress.warning,
        result.elapsed * 1000,
    )
    return result


def answer_of(node: str, operation: str, msg: Message, field: int, msg_id: int) -> RetrieveAnswer:
    """A C-MOVE-RSP's or C-GET-RSP's facts; a message that is not the answer to
    *msg_id* breaks the protocol (one operation at a time on the association)."""
    status = msg.status
    if msg.us(ul.COMMAND_FIELD) != field or status is None:
        raise AssociationAborted(node, f"{operation}: the PACS sent an unexpected message")
    if msg.us(ul.MESSAGE_ID_BEING_RESPONDED_TO) != msg_id:
        raise AssociationAborted(node, f"{operation}: the PACS answered another request")
    return RetrieveAnswer(
        status=status,
        remaining=msg.us(ul.REMAINING),
        completed=msg.us(ul.COMPLETED),
        failed=msg.us(ul.FAILED),
        warning=msg.us(ul.WARNING),
        comment=msg.text(ul.ERROR_COMMENT),
    )


def raise_for_refusal(node: str, result: MoveResult) -> None:
    """Raise for a move that delivered nothing because the PACS refused it (or
    cancelled it: when the gateway cancelled, nobody waits for the answer)."""
    stopped = result.category in (st.Category.FAILURE, st.Category.CANCEL)
    if stopped and result.progress.completed == 0:
        raise PacsFailureStatus(node, "C-MOVE", result.status, result.comment)
