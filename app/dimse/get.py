"""C-GET: a retrieve whose instances come back on the requesting association.

PS3.4 C.4.3 and PS3.7 9.1.3.  Unlike C-MOVE, the PACS needs no route back to
the gateway: it sends every matching instance as a C-STORE sub-operation on the
association that carried the C-GET-RQ.  That makes the association itself
request-specific (PS3.7 D.3.3.4, PS3.4 C.4.3.3):

* it must propose a storage presentation context for each SOP class and
  transfer syntax the PACS will send, each with SCP/SCU Role Selection granting
  us the SCP role.  An instance of a SOP class without an accepted context is a
  failed sub-operation; one whose transfer syntax has none is transcoded by the
  PACS if it can (Orthanc can), else it fails too;
* presentation context IDs are odd numbers 1-255, so at most 128 contexts
  (PS3.8 9.3.2.2), one of which is the C-GET model itself;
* one accepted context carries one transfer syntax, so keeping instances as
  stored needs one context per syntax per class.

So before the C-GET the gateway asks the PACS which SOP classes it will get
(:func:`learn_sop_classes`: STUDY level SOP Classes in Study, then IMAGE level
SOP Class UID, else :data:`COMMON_STORAGE_CLASSES`), and :func:`storage_contexts`
spreads the 127 contexts over those classes, one syntax per context while room
allows.  The association (``app/dimse/requestor.py``, asking for the SCP role of
each storage class) is opened for this one C-GET and released afterwards; it
never goes back to the node's query pool.

Bound on associations: the C-GET runs in a lease of the node's
:class:`~app.dimse.pool.AssociationPool`, so C-GETs and queries together stay
within the node's ``max_associations`` and wait ``acquire_timeout`` for a slot
like any operation.  The leased query association is released before the C-GET
association opens (the PACS never sees more than ``max_associations`` from us);
the next query opens a new one (about 8 ms on loopback).

Arrivals go to an :class:`~app.dimse.storescp.InstanceSink`, exactly as those of
a C-MOVE do: each C-STORE becomes an :class:`~app.dimse.storescp.IncomingInstance`
whose ``move_originator_message_id`` is the C-GET's Message ID and whose
``calling_ae`` is the PACS's AE title, so a sink that routes C-MOVE arrivals by
Move Originator Message ID routes these unchanged.  The Part 10 file is written
from the received bytes (file meta from :func:`~app.dimse.storescp.part10_header`,
then the data set as sent, never decoded), and the sink's status is the
C-STORE-RSP status.

Throughput: the operation's thread reads the association and writes each data
set as it came; the sink runs before each C-STORE-RSP, so a PACS sends the next
instance only once the previous one is in the cache.  Before this receiver,
pynetdicom's took 1.4-1.6 s for a 158 MB CT series (C-MOVE: 0.85-0.9 s);
``bench/retrieve.py --node-option 'retrieve = "get"'`` measures it now.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from pydicom import uid
from pydicom.dataset import Dataset

from app.dimse import status as st
from app.dimse import ul
from app.dimse.find import QueryModel, c_find
from app.dimse.move import (
    MoveProgress,
    MoveResult,
    answer_of,
    failed_uid_list,
    fold_response,
    result_status,
)
from app.dimse.observed_sink import OPERATION as RECEIVED
from app.dimse.observed_sink import ObservedSink
from app.dimse.pool import AssociationPool, Lease, tls_failure_since
from app.dimse.requestor import (
    AcceptedContext,
    AssociateRejected,
    ConnectFailed,
    Lost,
    Message,
    NegotiationAborted,
    RequestorAssociation,
    Silent,
    decode_identifier,
    encode_identifier,
    request_command,
)
from app.dimse.storescp import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    IncomingInstance,
    InstanceSink,
    part10_header,
)
from app.errors import (
    AssociationAborted,
    AssociationRejected,
    DimseTimeout,
    PacsFailureStatus,
    PacsUnavailable,
)

log = logging.getLogger(__name__)


class GetModel(StrEnum):
    """Q/R GET SOP classes (PS3.4 C.6)."""

    PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.3"
    STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.3"


#: PS3.8 9.3.2.2: presentation context IDs are the odd numbers 1-255.
MAX_CONTEXTS: Final = 128

#: Transfer syntaxes a PACS may hold instances in, most likely first.  While room
#: allows each gets a context of its own, so the PACS can send every instance as
#: stored; when it does not, the tail shares one context and the PACS picks one.
STORED_SYNTAXES: Final[tuple[str, ...]] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.JPEGLosslessSV1,
    uid.JPEGBaseline8Bit,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.JPEGLSLossless,
    uid.RLELossless,
    uid.JPEGLSNearLossless,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,  # retired, but archives still hold it
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.MPEG2MPML,
    uid.MPEG4HP41,
)

#: Proposed when the PACS does not say which SOP classes it will send (dcmqrscp
#: and pynetdicom's qrscp return no SOP Class UID).  32 classes leave room for
#: three single-syntax contexts each (Explicit LE, Implicit LE, JPEG Lossless) and
#: a fourth carrying the other syntaxes.  Instances of other classes fail.
COMMON_STORAGE_CLASSES: Final[tuple[str, ...]] = (
    uid.CTImageStorage,
    uid.MRImageStorage,
    uid.ComputedRadiographyImageStorage,
    uid.DigitalXRayImageStorageForPresentation,
    uid.DigitalMammographyXRayImageStorageForPresentation,
    uid.UltrasoundImageStorage,
    uid.UltrasoundMultiFrameImageStorage,
    uid.SecondaryCaptureImageStorage,
    uid.EnhancedCTImageStorage,
    uid.EnhancedMRImageStorage,
    uid.NuclearMedicineImageStorage,
    uid.PositronEmissionTomographyImageStorage,
    uid.XRayAngiographicImageStorage,
    uid.XRayRadiofluoroscopicImageStorage,
    uid.DigitalXRayImageStorageForProcessing,
    uid.DigitalMammographyXRayImageStorageForProcessing,
    uid.BreastTomosynthesisImageStorage,
    uid.EnhancedPETImageStorage,
    uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
    uid.VLPhotographicImageStorage,
    uid.RTImageStorage,
    uid.RTDoseStorage,
    uid.RTStructureSetStorage,
    uid.RTPlanStorage,
    uid.GrayscaleSoftcopyPresentationStateStorage,
    uid.KeyObjectSelectionDocumentStorage,
    uid.BasicTextSRStorage,
    uid.EnhancedSRStorage,
    uid.ComprehensiveSRStorage,
    uid.EncapsulatedPDFStorage,
)

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


class GetUnsupported(PacsFailureStatus):
    """The PACS accepted the association but not the C-GET: no context for the
    GET model, or none of the storage contexts in the SCP role.  Reported as
    0122H "SOP class not supported" (PS3.7 C.5.3), which is what it amounts to."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(node, "C-GET", 0x0122, reason)


class GetAssociationRejected(AssociationRejected):
    """The PACS rejected the C-GET association; ``permanent`` is the A-ASSOCIATE-RJ
    result (PS3.8 Table 9-21): 1 permanent, 2 transient (e.g. too many associations)."""

    def __init__(self, node: str, message: str, *, permanent: bool) -> None:
        super().__init__(node, message, transient=not permanent)
        self.permanent = permanent


# ---------------------------------------------------------------------------- contexts


def storage_contexts(
    sop_classes: Iterable[str],
    *,
    syntaxes: Sequence[str] = STORED_SYNTAXES,
    budget: int = MAX_CONTEXTS - 1,
) -> list[tuple[str, list[str]]]:
    """Storage presentation contexts for a C-GET of these SOP classes.

    The *budget* (127: the C-GET model takes one of the 128 IDs) is shared out
    evenly, earlier classes getting the remainder.  A class with room for every
    syntax gets one context per syntax; with room for *k* < all, the first *k*-1
    syntaxes get a context each and the rest share the last (the PACS chooses
    among them, which may mean transcoding).  Classes beyond the budget are left
    out and logged: their instances will fail.
    """
    classes = list(dict.fromkeys(c for c in sop_classes if _UID.fullmatch(c) and len(c) <= 64))
    if len(classes) > budget:
        log.warning(
            "C-GET: %d SOP classes but room for %d presentation contexts; leaving out %s",
            len(classes),
            budget,
            ", ".join(classes[budget:]),
        )
        classes = classes[:budget]
    if not classes:
        return []
    per_class, extra = divmod(budget, len(classes))
    contexts: list[tuple[str, list[str]]] = []
    for index, sop_class in enumerate(classes):
        room = per_class + (1 if index < extra else 0)
        if room >= len(syntaxes):
            contexts.extend((sop_class, [ts]) for ts in syntaxes)
            continue
        contexts.extend((sop_class, [ts]) for ts in syntaxes[: room - 1])
        contexts.append((sop_class, list(syntaxes[room - 1 :])))
    return contexts


async def learn_sop_classes(pool: AssociationPool, identifier: Dataset) -> list[str] | None:
    """The SOP classes a C-GET with *identifier* will return, as the PACS tells them.

    Asks, on a pooled query association: STUDY level SOP Classes in Study
    (0008,0062) for a study or series retrieve (one answer; a superset for a
    series), then IMAGE level SOP Class UID (0008,0016), most frequent first.
    Returns None when the PACS says neither (dcmqrscp, qrscp) or refuses the
    query; pool errors (PACS unreachable, pool exhausted) propagate.
    """
    node = pool.node.name
    level = str(identifier.get("QueryRetrieveLevel", ""))
    try:
        if level in ("STUDY", "SERIES"):
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = identifier.StudyInstanceUID
            query.SOPClassesInStudy = ""
            found = await c_find(pool, query, QueryModel.STUDY_ROOT)
            classes = [str(v) for m in found.matches for v in _values(m, "SOPClassesInStudy")]
            if classes:
                return list(dict.fromkeys(classes))
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = identifier.StudyInstanceUID
        query.SeriesInstanceUID = identifier.get("SeriesInstanceUID", "")
        query.SOPInstanceUID = identifier.get("SOPInstanceUID", "")
        query.SOPClassUID = ""
        found = await c_find(pool, query, QueryModel.STUDY_ROOT)
    except (PacsFailureStatus, AssociationAborted, DimseTimeout) as exc:
        log.info("C-GET %s: cannot learn the SOP classes (%s)", node, exc.message)
        return None
    counts = Counter(str(m.SOPClassUID) for m in found.matches if m.get("SOPClassUID"))
    if not counts:
        return None
    if len(found.matches) > sum(counts.values()):
        # Some answers without a SOP class: also propose the common ones.
        return [c for c, _ in counts.most_common()] + list(COMMON_STORAGE_CLASSES)
    return [c for c, _ in counts.most_common()]


def _values(ds: Dataset, keyword: str) -> list[Any]:
    """A multi-valued attribute's values (pydicom gives a str for one value)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)


# ---------------------------------------------------------------------------- the C-GET


async def c_get(
    pool: AssociationPool,
    identifier: Dataset,
    model: GetModel,
    *,
    ae_title: str,
    msg_id: int,
    sink: InstanceSink,
    sop_classes: Sequence[str] | None = None,
    on_progress: Callable[[MoveProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> MoveResult:
    """Retrieve the instances matching *identifier* over one C-GET association.

    *ae_title* is our calling AE title.  *sop_classes* are the storage classes to
    propose; None learns them first (:func:`learn_sop_classes`), falling back to
    :data:`COMMON_STORAGE_CLASSES`.  Every instance received goes to *sink* (see
    the module docstring).  The final status is returned, not raised, as for
    :func:`~app.dimse.move.c_move`; raises :class:`GetUnsupported` when the PACS
    does not accept the C-GET at all, :class:`GetAssociationRejected` on an
    A-ASSOCIATE-RJ, and the pool's errors otherwise.  Setting *cancel* (or
    cancelling the awaiting task) sends C-CANCEL-GET-RQ; the result then carries
    FE00.
    """
    cancel = cancel or threading.Event()
    if sop_classes is None:
        learned = await learn_sop_classes(pool, identifier)
        sop_classes = learned or COMMON_STORAGE_CLASSES
    if pool.observer is not None:
        sink = ObservedSink(sink, lambda _i, status, t: pool.observe(RECEIVED, status, t))
    async with pool.lease() as lease:
        try:
            return await pool.run_observed(
                lease,
                functools.partial(
                    _get_blocking,
                    pool=pool,
                    identifier=identifier,
                    model=model,
                    ae_title=ae_title,
                    msg_id=msg_id,
                    sink=sink,
                    sop_classes=sop_classes,
                    on_progress=on_progress,
                    cancel=cancel,
                ),
                "C-GET",
                result_status,
            )
        except asyncio.CancelledError:
            cancel.set()
            raise


def refused(result: MoveResult) -> bool:
    """Whether a final C-GET status means the PACS did not perform it at all:
    a failure (not "out of resources", which may pass) with nothing completed."""
    return (
        result.category is st.Category.FAILURE
        and result.progress.completed == 0
        and not st.is_out_of_resources(result.status)
    )


def raise_for_refusal(node: str, result: MoveResult) -> None:
    """Raise for a C-GET that delivered nothing because the PACS refused or cancelled it."""
    stopped = result.category in (st.Category.FAILURE, st.Category.CANCEL)
    if stopped and result.progress.completed == 0:
        raise PacsFailureStatus(node, "C-GET", result.status, result.comment)


@dataclass
class _Receiver:
    """The C-STORE performer of one C-GET association."""

    node_ae: str
    our_ae: str
    msg_id: int
    sink: InstanceSink
    stored: int = 0
    received_bytes: int = 0
    # When the last C-STORE-RQ arrived (monotonic): the PACS is alive while it sends.
    last_store: float = 0.0
    # Time spent in this handler (writing and the sink), for the log.
    busy: float = 0.0

    def __call__(self, request: Message, context: AcceptedContext, peer_address: str) -> int:
        self.last_store = time.monotonic()
        try:
            return self._store(request, context, peer_address)
        finally:
            self.busy += time.monotonic() - self.last_store

    def _store(self, request: Message, context: AcceptedContext, peer_address: str) -> int:
        sop_class = _uid_or_none(request.text(ul.AFFECTED_SOP_CLASS_UID))
        sop_instance = _uid_or_none(request.text(ul.AFFECTED_SOP_INSTANCE_UID))
        if sop_class is None or sop_instance is None or request.data_set is None:
            log.warning("C-GET: C-STORE-RQ from %s without valid UIDs or data", self.node_ae)
            return STATUS_CANNOT_UNDERSTAND
        incoming = IncomingInstance(
            calling_ae=self.node_ae,
            called_ae=self.our_ae,
            peer_address=peer_address,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax_uid=context.transfer_syntax,
            move_originator_ae=None,
            move_originator_message_id=self.msg_id,
        )
        try:
            opened = self.sink.open(incoming)
        except OSError as exc:
            log.error("C-GET: sink cannot store %s: %s", sop_instance, exc)
            return STATUS_OUT_OF_RESOURCES
        except Exception:
            log.exception("C-GET: sink.open failed for %s", sop_instance)
            return STATUS_PROCESSING_FAILURE
        if isinstance(opened, int):
            return opened if 0 <= opened <= 0xFFFF else STATUS_PROCESSING_FAILURE
        ok = True
        try:
            opened.write(
                part10_header(sop_class, sop_instance, incoming.transfer_syntax_uid, self.node_ae)
            )
            # The received bytes as they are: no decode.
            opened.write(request.data_set)
            size = len(request.data_set)
        except Exception as exc:  # the sink's file must be closed whatever happened
            log.error("C-GET: cannot write %s: %s", sop_instance, exc)
            ok, size = False, 0
        try:
            status = self.sink.close(incoming, opened, ok)
        except OSError as exc:
            log.error("C-GET: sink cannot complete %s: %s", sop_instance, exc)
            return STATUS_OUT_OF_RESOURCES
        except Exception:
            log.exception("C-GET: sink.close failed for %s", sop_instance)
            return STATUS_PROCESSING_FAILURE
        if not isinstance(status, int) or not 0 <= status <= 0xFFFF:
            return STATUS_PROCESSING_FAILURE
        if not ok and (status == st.SUCCESS or 0xB000 <= status <= 0xBFFF):
            return STATUS_OUT_OF_RESOURCES
        if status == st.SUCCESS:
            self.stored += 1
            self.received_bytes += size
        return status


def _uid_or_none(value: object) -> str | None:
    text = str(value or "").rstrip("\x00 ")
    return text if _UID.fullmatch(text) and len(text) <= 64 else None


def _get_blocking(
    lease: Lease,
    *,
    pool: AssociationPool,
    identifier: Dataset,
    model: GetModel,
    ae_title: str,
    msg_id: int,
    sink: InstanceSink,
    sop_classes: Sequence[str],
    on_progress: Callable[[MoveProgress], None] | None,
    cancel: threading.Event,
) -> MoveResult:
    node = pool.node
    started = time.monotonic()
    # The lease holds one of the node's association slots; its query association
    # makes room for the C-GET association (the pool drops it on return).
    lease.reusable = False
    lease.assoc.release()
    contexts = storage_contexts(sop_classes)
    receiver = _Receiver(node.ae_title, ae_title, msg_id, sink)
    try:
        assoc = pool.associate(
            ae_title,
            [(str(model), list(node.profile.transfer_syntaxes)), *contexts],
            scp_roles=[c for c, _ in contexts],
        )
    except AssociateRejected as exc:
        raise GetAssociationRejected(
            node.name,
            f"C-GET association rejected ({'transient' if exc.transient else 'permanent'}, "
            f"source {exc.source}, reason {exc.reason}); check that the PACS knows AE title "
            f"{ae_title!r} and allows it C-GET, and that its AE title is {node.ae_title!r}",
            permanent=not exc.transient,
        ) from None
    except NegotiationAborted:
        raise AssociationAborted(
            node.name, "C-GET association aborted during negotiation"
        ) from None
    except ConnectFailed as exc:
        tls_failure = tls_failure_since(pool.tls, node, started)
        if tls_failure is not None:
            raise tls_failure from None
        raise PacsUnavailable(
            node.name, f"cannot open a C-GET association to {node.host}:{node.port}: {exc}"
        ) from None
    setup = time.monotonic() - started
    ok = False
    try:
        context = _check_contexts(node.name, assoc, str(model))
        result = _exchange(
            assoc, context, node.name, identifier, msg_id, receiver, on_progress, cancel
        )
        ok = True
    finally:
        if ok:
            assoc.release()
        else:
            assoc.abort()
    result.elapsed = time.monotonic() - started
    log.info(
        "C-GET %s level=%s status=0x%04X completed=%d failed=%d warning=%d stored=%d "
        "(%.1f MB) contexts=%d setup=%.0fms storing=%.0fms elapsed=%.0fms",
        node.name,
        identifier.get("QueryRetrieveLevel", "?"),
        result.status,
        result.progress.completed,
        result.progress.failed,
        result.progress.warning,
        receiver.stored,
        receiver.received_bytes / 1e6,
        len(contexts) + 1,
        setup * 1000,
        receiver.busy * 1000,
        result.elapsed * 1000,
    )
    return result


def _check_contexts(node: str, assoc: RequestorAssociation, model: str) -> AcceptedContext:
    """The C-GET context, once the PACS is seen to accept the C-GET and to be able
    to send us something."""
    context = assoc.context_for(model)
    if context is None:
        if not assoc.accepted_contexts:
            raise GetUnsupported(node, "the PACS accepted none of the C-GET and storage contexts")
        raise GetUnsupported(node, "the PACS accepted no C-GET presentation context")
    if not any(cx.abstract_syntax != model and cx.scp_role for cx in assoc.accepted_contexts):
        raise GetUnsupported(
            node, "the PACS accepted no storage context with the gateway in the SCP role"
        )
    return context


def _exchange(
    assoc: RequestorAssociation,
    context: AcceptedContext,
    node: str,
    identifier: Dataset,
    msg_id: int,
    receiver: _Receiver,
    on_progress: Callable[[MoveProgress], None] | None,
    cancel: threading.Event,
) -> MoveResult:
    """Send the C-GET-RQ, perform the C-STOREs as they come, fold the C-GET-RSPs."""
    progress = MoveProgress()
    cancelled = False
    answered = False

    def send_cancel() -> None:
        nonlocal cancelled
        if not cancelled:
            cancelled = True
            assoc.send_cancel(context, msg_id)

    peer = assoc.peer_address
    try:
        assoc.send(
            context,
            request_command(ul.C_GET_RQ, context.abstract_syntax, msg_id),
            encode_identifier(identifier, context),
        )
        while True:
            msg = assoc.receive(cancel=cancel, on_cancel=send_cancel)
            answered = True
            field = msg.us(ul.COMMAND_FIELD)
            if field == ul.C_STORE_RQ:
                store_context = assoc.context_by_id(msg.context_id)
                stored = receiver(msg, store_context, peer)
                store_id = msg.us(ul.MESSAGE_ID)
                assoc.send(
                    store_context,
                    ul.response(
                        ul.C_STORE_RSP,
                        store_id if store_id is not None else 0,
                        stored,
                        msg.text(ul.AFFECTED_SOP_CLASS_UID),
                        msg.text(ul.AFFECTED_SOP_INSTANCE_UID),
                    ),
                    None,
                )
                continue
            answer = answer_of(node, "C-GET", msg, ul.C_GET_RSP, msg_id)
            if fold_response(answer, progress, on_progress):
                if cancel.is_set():
                    send_cancel()
                continue
            break
        failed_uids = (
            failed_uid_list(decode_identifier(msg.data_set, context)) if msg.data_set else []
        )
    except Silent as exc:
        raise DimseTimeout(node, f"C-GET: {exc}") from None
    except Lost as exc:
        # A closed connection is an A-P-ABORT for the upper layer (PS3.8 §7.4).
        when = "" if answered else " before any answer"
        raise AssociationAborted(node, f"C-GET: association aborted{when}: {exc}") from None
    if on_progress is not None:
        on_progress(progress)
    return MoveResult(
        status=answer.status,
        progress=progress,
        failed_sop_uids=failed_uids,
        comment=answer.comment,
    )


__all__ = [
    "COMMON_STORAGE_CLASSES",
    "MAX_CONTEXTS",
    "STORED_SYNTAXES",
    "GetAssociationRejected",
    "GetModel",
    "GetUnsupported",
    "c_get",
    "learn_sop_classes",
    "raise_for_refusal",
    "refused",
    "storage_contexts",
]
