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
from app.dimse.cancel import CancelWatcher
from app.dimse.pool import AssociationPool, Lease, quiesce_reactor
from app.errors import AssociationAborted, DimseTimeout, PacsFailureStatus

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


def read_counts(rsp: Dataset, into: MoveProgress) -> None:
    """Sub-operation counts of a C-MOVE-RSP or C-GET-RSP (PS3.7 9.1.3.1.7-10,
    9.1.4.1.8-11), where present."""
    for keyword, attr in (
        ("NumberOfRemainingSuboperations", "remaining"),
        ("NumberOfCompletedSuboperations", "completed"),
        ("NumberOfFailedSuboperations", "failed"),
        ("NumberOfWarningSuboperations", "warning"),
    ):
        value = rsp.get(keyword)
        if value is not None:
            setattr(into, attr, int(value))


def fold_response(
    rsp: Dataset,
    ident: Dataset | None,
    progress: MoveProgress,
    on_progress: Callable[[MoveProgress], None] | None,
    cancel: threading.Event,
    watcher: CancelWatcher,
) -> list[str] | None:
    """Fold one C-MOVE-RSP or C-GET-RSP (with a status) into *progress*.

    None for a pending response (after reporting progress, and sending C-CANCEL
    if the retrieve was abandoned); for the final one, the Failed SOP Instance
    UID List of its identifier (PS3.4 C.4.2.1.4, C.4.3.1.4), possibly empty.
    """
    code = int(rsp.Status)
    if code not in st.PENDING:
        # Counts are optional in the final response (PS3.7 9.1.4.1.8): a
        # "remaining" left over from the last pending one must not survive.
        progress.remaining = None
    read_counts(rsp, progress)
    if code in st.PENDING:
        if on_progress is not None:
            on_progress(progress)
        if cancel.is_set():
            watcher.send()
        return None
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
    progress = MoveProgress()
    started = last = time.monotonic()
    final: Dataset | None = None
    failed_uids: list[str] = []
    answered = False
    if not quiesce_reactor(lease.assoc):
        lease.reusable = False
        raise Unanswered(node.name, "association not responsive")
    try:
        with CancelWatcher(lease.assoc, msg_id, str(model), cancel) as watcher:
            for rsp, ident in lease.assoc.send_c_move(
                identifier, destination, str(model), msg_id=msg_id
            ):
                now = time.monotonic()
                if not rsp or "Status" not in rsp:
                    lease.reusable = False
                    if now - last >= node.dimse_timeout * 0.9:
                        raise DimseTimeout(
                            node.name, f"C-MOVE: no answer within {node.dimse_timeout:g} s"
                        )
                    lost = Unanswered if not answered else AssociationAborted
                    raise lost(node.name, "C-MOVE: association aborted or lost")
                answered = True
                last = now
                failed = fold_response(rsp, ident, progress, on_progress, cancel, watcher)
                if failed is None:
                    continue
                final, failed_uids = rsp, failed
                break
    except RuntimeError as exc:
        # pynetdicom raises this when the association died before the request.
        lease.reusable = False
        raise Unanswered(node.name, f"association lost: {exc}") from exc
    except BaseException:
        lease.reusable = False
        raise
    if final is None:
        lease.reusable = False
        raise AssociationAborted(node.name, "C-MOVE ended without a final response")
    code = int(final.Status)
    comment = final.get("ErrorComment")
    result = MoveResult(
        status=code,
        progress=progress,
        failed_sop_uids=failed_uids,
        comment=str(comment) if comment else None,
        elapsed=time.monotonic() - started,
    )
    if on_progress is not None:
        on_progress(progress)
    log.info(
        "C-MOVE %s level=%s -> %s status=0x%04X completed=%d failed=%d warning=%d elapsed=%.0fms",
        node.name,
        identifier.get("QueryRetrieveLevel", "?"),
        destination,
        code,
        progress.completed,
        progress.failed,
        progress.warning,
        result.elapsed * 1000,
    )
    return result


def raise_for_refusal(node: str, result: MoveResult) -> None:
    """Raise for a move that delivered nothing because the PACS refused it (or
    cancelled it: when the gateway cancelled, nobody waits for the answer)."""
    stopped = result.category in (st.Category.FAILURE, st.Category.CANCEL)
    if stopped and result.progress.completed == 0:
        raise PacsFailureStatus(node, "C-MOVE", result.status, result.comment)
