"""Find out what a PACS really supports: ``dimse-gateway probe NODE``.

Only harmless operations: association negotiation (PS3.8 9.3.2), C-ECHO, and
C-FINDs that are cancelled after a few answers (PS3.4 C.4.1.2.3).  The result
is a :class:`~app.config.DimseProfile` plus what was seen on the way, printed
as TOML to paste into the configuration.

What is measured, and how:

* transfer syntaxes: each Q/R SOP class is proposed once per syntax, so the
  acceptance of each is visible; then a C-FIND is sent with an Explicit VR
  identifier, because a PACS may accept Explicit VR and then misparse it (CTN
  aborts the association);
* Patient Root: the FIND context is accepted and a PATIENT level C-FIND
  answers without failure;
* C-GET: one instance found on the PACS is fetched with C-GET and must arrive
  (CTN accepts the context and answers Success without sending anything);
* relational queries: extended negotiation byte 1 of the FIND contexts (PS3.4
  C.5.1, Table C.5-2) accepted as 1;
* native counts: a study found on the PACS is queried for ModalitiesInStudy and
  NumberOfStudyRelatedSeries/Instances, compared with what the SERIES and IMAGE
  levels show;
* name matching: that study's PatientName, with the case of its ASCII letters
  swapped, as a match key together with the study's UID.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

from app.config import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    DimseProfile,
    PacsNode,
)
from app.dimse import status as st
from app.dimse.find import VERIFICATION, QueryModel
from app.dimse.get import COMMON_STORAGE_CLASSES, storage_contexts
from app.dimse.pynetdicom_fixes import quiesce_reactor, set_tcp_nodelay

log = logging.getLogger(__name__)

STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PATIENT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
PATIENT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
_SYNTAXES = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)
_QR_CLASSES = (
    QueryModel.STUDY_ROOT.value,
    STUDY_MOVE,
    STUDY_GET,
    QueryModel.PATIENT_ROOT.value,
    PATIENT_MOVE,
    PATIENT_GET,
)


_PLAIN_NAME = re.compile(r"^[A-Za-z^ ]+$")


class ProbeFailed(Exception):
    """The node could not be probed at all (no association, no C-ECHO)."""


@dataclass
class ProbeReport:
    """A profile and the observations behind it."""

    profile: DimseProfile
    echo_ms: float
    peer_max_pdu: int
    # SOP class UID -> transfer syntaxes the PACS accepted for it.
    accepted: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Study, series, SOP instance and SOP class UIDs of one instance on the PACS.
    sample: tuple[str, str, str, str] | None = None


def _ae(calling_ae: str, node: PacsNode) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    ae.connection_timeout = node.connect_timeout
    ae.maximum_pdu_size = node.max_pdu
    return ae


def _associate(
    node: PacsNode, calling_ae: str, contexts: list[Any], ext_neg: list[Any] | None = None
) -> Association:
    ae = _ae(calling_ae, node)
    ae.requested_contexts = contexts
    return ae.associate(
        node.host,
        node.port,
        ae_title=node.ae_title,
        ext_neg=ext_neg,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
    )


def _find(
    assoc: Association, model: str, ident: Dataset, limit: int = 0
) -> tuple[list[Dataset], int | None]:
    """Answers and final status of one C-FIND (None: aborted or no answer).

    With *limit*, the PACS is stopped with C-CANCEL after that many answers.
    """
    if not quiesce_reactor(assoc):
        return [], None
    answers: list[Dataset] = []
    cancelled = False
    try:
        for status, answer in assoc.send_c_find(ident, model):
            if not status or "Status" not in status:
                return answers, None
            code = int(status.Status)
            if code in st.PENDING:
                if answer is not None and not cancelled:
                    answers.append(answer)
                if limit and len(answers) >= limit and not cancelled:
                    assoc.send_c_cancel(1, query_model=model)
                    cancelled = True
                continue
            return answers, code
    except (RuntimeError, ValueError, AttributeError) as exc:
        log.debug("C-FIND failed: %s", exc)
    return answers, None


def _query(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _has_letters(text: str) -> bool:
    return any(c.isascii() and c.isalpha() for c in text)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v).strip("\x00 ") for v in value)
    return str(value).strip("\x00 ")


def _negotiate(node: PacsNode, calling_ae: str, report: ProbeReport) -> None:
    contexts = [build_context(VERIFICATION, list(_SYNTAXES))]
    for sop_class in _QR_CLASSES:
        contexts += [build_context(sop_class, syntax) for syntax in _SYNTAXES]
    ext_neg = []
    for model in (QueryModel.STUDY_ROOT.value, QueryModel.PATIENT_ROOT.value):
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = model
        item.service_class_application_information = b"\x01"
        ext_neg.append(item)
    started = time.monotonic()
    assoc = _associate(node, calling_ae, contexts, ext_neg)
    if not assoc.is_established:
        raise ProbeFailed(
            f"no association with {node.ae_title}@{node.host}:{node.port} "
            f"(calling AE {calling_ae!r}): refused, rejected or unreachable"
        )
    try:
        for cx in assoc.accepted_contexts:
            syntaxes = report.accepted.setdefault(str(cx.abstract_syntax), [])
            syntaxes.extend(str(ts) for ts in cx.transfer_syntax if str(ts) not in syntaxes)
        report.peer_max_pdu = int(assoc.acceptor.maximum_length or 0)
        extended = assoc.acceptor.sop_class_extended or {}
        info = extended.get(UID(QueryModel.STUDY_ROOT.value)) or b""
        report.profile.relational_queries = bool(info[:1] == b"\x01")
        if not quiesce_reactor(assoc):
            raise ProbeFailed("the association stopped responding before C-ECHO")
        started = time.monotonic()
        echo = assoc.send_c_echo()
        report.echo_ms = (time.monotonic() - started) * 1000
        if not echo or int(echo.get("Status", -1)) != st.SUCCESS:
            raise ProbeFailed("C-ECHO did not answer Success")
    finally:
        if assoc.is_established:
            assoc.release()


def _explicit_identifiers_work(node: PacsNode, calling_ae: str) -> bool:
    """A STUDY C-FIND with an Explicit VR identifier, answered without abort."""
    model = QueryModel.STUDY_ROOT.value
    assoc = _associate(node, calling_ae, [build_context(model, EXPLICIT_VR_LITTLE_ENDIAN)])
    if not assoc.is_established:
        return False
    try:
        _, code = _find(assoc, model, _query("STUDY", StudyInstanceUID=""), limit=1)
        return code is not None and st.category(code) is not st.Category.FAILURE
    finally:
        if assoc.is_established:
            assoc.release()
        elif not assoc.is_aborted:
            assoc.abort()


def _probe_data(node: PacsNode, calling_ae: str, report: ProbeReport) -> None:
    profile = report.profile
    study_model = QueryModel.STUDY_ROOT.value
    models = [study_model] + ([QueryModel.PATIENT_ROOT.value] if profile.patient_root else [])
    contexts = [build_context(m, list(profile.transfer_syntaxes)) for m in models]
    assoc = _associate(node, calling_ae, contexts)
    if not assoc.is_established:
        raise ProbeFailed("no association for the C-FIND probes")
    try:
        if profile.patient_root:
            _, code = _find(
                assoc, QueryModel.PATIENT_ROOT.value, _query("PATIENT", PatientID=""), limit=1
            )
            if code is None or st.category(code) is st.Category.FAILURE:
                profile.patient_root = False
                report.notes.append(
                    "Patient Root accepted in negotiation but a PATIENT query failed"
                )
        studies, code = _find(
            assoc, study_model, _query("STUDY", StudyInstanceUID="", PatientName=""), limit=20
        )
        if code is None:
            raise ProbeFailed("the PACS aborted a STUDY C-FIND")
        if not studies:
            report.notes.append("the PACS holds no study: name matching and counts not probed")
            return
        # Plain names first: some PACS treat "_" or "%" in a key as SQL wildcards.
        named = sorted(
            (s for s in studies if _has_letters(_text(s, "PatientName"))),
            key=lambda s: not _PLAIN_NAME.match(_text(s, "PatientName")),
        )
        study = (named or studies)[0]
        _probe_counts(assoc, _text(study, "StudyInstanceUID"), report)
        for candidate in named[:3]:
            uid, name = _text(candidate, "StudyInstanceUID"), _text(candidate, "PatientName")
            verdict = _probe_names(assoc, uid, name)
            if verdict is not None:
                report.profile.case_sensitive_names = verdict
                break
            report.notes.append(f"the PACS does not match PatientName on its own value {name!r}")
        else:
            report.notes.append("name matching not probed: no usable patient name")
    finally:
        if assoc.is_established:
            assoc.release()


def _probe_counts(assoc: Association, study_uid: str, report: ProbeReport) -> None:
    model = QueryModel.STUDY_ROOT.value
    answers, _ = _find(
        assoc,
        model,
        _query(
            "STUDY",
            StudyInstanceUID=study_uid,
            ModalitiesInStudy="",
            NumberOfStudyRelatedSeries="",
            NumberOfStudyRelatedInstances="",
        ),
    )
    series, _ = _find(
        assoc,
        model,
        _query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="", Modality=""),
    )
    by_uid = {_text(s, "SeriesInstanceUID"): s for s in series}
    instances: set[str] = set()
    for uid in by_uid:
        images, _ = _find(
            assoc,
            model,
            _query(
                "IMAGE",
                StudyInstanceUID=study_uid,
                SeriesInstanceUID=uid,
                SOPInstanceUID="",
                SOPClassUID="",
            ),
        )
        instances |= {_text(i, "SOPInstanceUID") for i in images}
        for image in images:
            if report.sample is None and _text(image, "SOPInstanceUID"):
                report.sample = (
                    study_uid,
                    uid,
                    _text(image, "SOPInstanceUID"),
                    _text(image, "SOPClassUID"),
                )
    modalities = sorted({_text(s, "Modality") for s in by_uid.values()} - {""})
    if not answers:
        report.profile.study_counts = False
        report.notes.append("the study found first did not answer a query by its UID")
        return
    got = answers[0]
    native = {
        "ModalitiesInStudy": sorted(v for v in _text(got, "ModalitiesInStudy").split("\\") if v),
        "NumberOfStudyRelatedSeries": _text(got, "NumberOfStudyRelatedSeries"),
        "NumberOfStudyRelatedInstances": _text(got, "NumberOfStudyRelatedInstances"),
    }
    truth = {
        "ModalitiesInStudy": modalities,
        "NumberOfStudyRelatedSeries": str(len(by_uid)),
        "NumberOfStudyRelatedInstances": str(len(instances)),
    }
    wrong = [k for k in truth if native[k] != truth[k]]
    report.profile.study_counts = not wrong
    if wrong:
        report.notes.append(
            "counts not returned or wrong: "
            + ", ".join(f"{k} {native[k] or '(none)'} (lower levels: {truth[k]})" for k in wrong)
        )


def _probe_names(assoc: Association, study_uid: str, name: str) -> bool | None:
    """True if the name with its ASCII letters' case swapped no longer matches;
    None if the name does not even match itself."""
    model = QueryModel.STUDY_ROOT.value
    swapped = "".join(c.swapcase() if c.isascii() else c for c in name)
    same, _ = _find(assoc, model, _query("STUDY", StudyInstanceUID=study_uid, PatientName=name))
    if not same:
        return None
    other, _ = _find(assoc, model, _query("STUDY", StudyInstanceUID=study_uid, PatientName=swapped))
    return not other


def _c_get_works(node: PacsNode, calling_ae: str, report: ProbeReport) -> bool:
    """A C-GET of one instance the PACS holds, which must really arrive.

    Acceptance in negotiation proves little, and neither does a status: CTN
    accepts the context and answers Success to a C-GET it does not serve.
    """
    if report.sample is None:
        report.notes.append("C-GET not tried: no instance found on the PACS")
        return False
    study, series, sop, sop_class = report.sample
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(getattr(event.request, "AffectedSOPInstanceUID", "")))
        return st.SUCCESS

    # Not every PACS returns SOPClassUID at IMAGE level (dcmqrscp, qrscp do not).
    classes = [sop_class] if sop_class else list(COMMON_STORAGE_CLASSES)
    stores = storage_contexts(classes)
    contexts = [build_context(STUDY_GET, list(report.profile.transfer_syntaxes))]
    contexts += [build_context(c, syntaxes) for c, syntaxes in stores]
    ae = _ae(calling_ae, node)
    ae.requested_contexts = contexts
    assoc = ae.associate(
        node.host,
        node.port,
        ae_title=node.ae_title,
        ext_neg=[build_role(c, scp_role=True) for c in dict.fromkeys(c for c, _ in stores)],
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay), (evt.EVT_C_STORE, on_store)],
    )
    if not assoc.is_established:
        return False
    ident = _query("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop)
    final: int | None = None
    try:
        if quiesce_reactor(assoc):
            for status, _ in assoc.send_c_get(ident, STUDY_GET):
                if not status or "Status" not in status:
                    break
                final = int(status.Status)
                if final not in st.PENDING:
                    break
    except (RuntimeError, ValueError) as exc:
        log.debug("C-GET probe failed: %s", exc)
    finally:
        if assoc.is_established:
            assoc.release()
        elif not assoc.is_aborted:
            assoc.abort()
    if sop not in received:
        report.notes.append(
            "C-GET of one instance delivered nothing ("
            + ("aborted or no answer" if final is None else f"status 0x{final:04X}")
            + ")"
        )
        return False
    return True


def probe_node(node: PacsNode, calling_ae: str) -> ProbeReport:
    """Probe *node* as *calling_ae* (blocking; a few seconds at most on a live PACS)."""
    report = ProbeReport(profile=DimseProfile(), echo_ms=0.0, peer_max_pdu=0)
    _negotiate(node, calling_ae, report)
    profile = report.profile
    study_find = report.accepted.get(QueryModel.STUDY_ROOT.value, [])
    if not study_find:
        raise ProbeFailed("the PACS accepted no Study Root C-FIND context")
    syntaxes = [ts for ts in _SYNTAXES if ts in study_find]
    if EXPLICIT_VR_LITTLE_ENDIAN in syntaxes and not _explicit_identifiers_work(node, calling_ae):
        syntaxes.remove(EXPLICIT_VR_LITTLE_ENDIAN)
        report.notes.append(
            "Explicit VR accepted in negotiation, but a C-FIND with an Explicit VR "
            "identifier failed or aborted: Implicit VR only"
        )
    if not syntaxes:
        raise ProbeFailed("no transfer syntax works for C-FIND")
    profile.transfer_syntaxes = syntaxes
    profile.patient_root = QueryModel.PATIENT_ROOT.value in report.accepted
    if STUDY_MOVE not in report.accepted:
        report.notes.append("Study Root C-MOVE not accepted")
    _probe_data(node, calling_ae, report)
    profile.c_get = STUDY_GET in report.accepted and _c_get_works(node, calling_ae, report)
    return report


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def profile_toml(node: PacsNode, report: ProbeReport) -> str:
    """The node with its probed profile, as a ``[[nodes]]`` entry to paste."""
    lines = [
        f"# dimse-gateway probe {node.name}: {node.ae_title}@{node.host}:{node.port}",
        f"# C-ECHO {report.echo_ms:.1f} ms; the PACS receives PDUs up to "
        + (f"{report.peer_max_pdu} bytes" if report.peer_max_pdu else "any size"),
    ]
    for sop_class, syntaxes in sorted(report.accepted.items()):
        lines.append(f"# accepted {sop_class}: {', '.join(syntaxes)}")
    lines += [f"# note: {n}" for n in report.notes]
    retrieve = node.retrieve
    if retrieve == "get" and not report.profile.c_get:
        retrieve = "move"
    lines += [
        "[[nodes]]",
        f"name = {_toml_value(node.name)}",
        f"ae_title = {_toml_value(node.ae_title)}",
        f"host = {_toml_value(node.host)}",
        f"port = {node.port}",
        f"retrieve = {_toml_value(retrieve)}",
        "",
        "[nodes.profile]",
    ]
    for name, value in report.profile.model_dump().items():
        lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
