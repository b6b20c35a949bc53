"""The gateway's own storage SCP (``app.dimse.storescp``) against real senders.

Senders: DCMTK ``storescu``/``echoscu`` (with ``TCP_NODELAY=1``), pynetdicom's
SCU, and, for what no real sender does on demand (an A-ABORT or a lost
connection in the middle of a data set, garbage, silence), a scripted TCP peer
whose PDUs are encoded by pynetdicom's PDU classes and pydicom, not by the code
under test.  Each test starts its own SCP on a free loopback port.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
)
from pynetdicom import AE, _config, build_role
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from app.dimse.storescp import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    STATUS_NOT_AUTHORIZED,
    STATUS_OUT_OF_RESOURCES,
    DirectorySink,
    IncomingInstance,
    StorageSCP,
    is_storage_sop_class,
)
from tests.peers.common import LOOPBACK, dcmtk_available, dcmtk_env, dcmtk_tool, store_files

AE_TITLE = "GWSTORE"
TESTDATA_ENV = "DIMSE_GATEWAY_TESTDATA"
needs_dcmtk = pytest.mark.skipif(
    not dcmtk_available("storescu", "echoscu"),
    reason="DCMTK storescu/echoscu not installed (apt: dcmtk)",
)


# --------------------------------------------------------------------------- test data


def _testdata_files() -> list[Path]:
    root = Path(
        os.environ.get(TESTDATA_ENV) or Path(__file__).resolve().parents[3] / "shared" / "testdata"
    )
    files = sorted((root / "dcm_qa_ts" / "In").glob("*.dcm"))
    if not files:
        message = f"test data not found under {root} (set {TESTDATA_ENV})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return files


@pytest.fixture(scope="module")
def ts_files() -> list[Path]:
    """One MR image in nine transfer syntaxes (explicit/implicit LE, big endian, RLE,
    JPEG lossless, JPEG-LS, JPEG 2000), each a Part 10 file."""
    return _testdata_files()


def _data_set_offset(raw: bytes) -> int:
    """Where the data set starts in a Part 10 file: after the group 0002 whose length
    (0002,0000) is the first element after ``DICM``."""
    assert raw[128:132] == b"DICM"
    assert raw[132:138] == b"\x02\x00\x00\x00UL"
    (group_length,) = struct.unpack_from("<I", raw, 140)
    return 144 + group_length


def _assert_same_instance(original: Path, received: Path, calling_ae: str) -> None:
    """Same data set bytes after the file meta; file meta of ours describing them."""
    raw_in, raw_out = original.read_bytes(), received.read_bytes()
    assert raw_out[: _data_set_offset(raw_out)].startswith(b"\x00" * 128 + b"DICM")
    assert raw_out[_data_set_offset(raw_out) :] == raw_in[_data_set_offset(raw_in) :]
    ds_in, ds_out = pydicom.dcmread(original), pydicom.dcmread(received)
    meta = ds_out.file_meta
    assert meta.MediaStorageSOPClassUID == ds_in.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == ds_in.SOPInstanceUID
    assert meta.TransferSyntaxUID == ds_in.file_meta.TransferSyntaxUID
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert meta.SourceApplicationEntityTitle == calling_ae
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert ds_out == ds_in


# --------------------------------------------------------------------------- the SCP under test


class RecordingSink(DirectorySink):
    """A DirectorySink that records every call and can refuse or break on demand."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.opened: list[IncomingInstance] = []
        self.closed: list[tuple[IncomingInstance, bool]] = []
        self.refuse_with: int | None = None
        self.file_factory: Callable[[IncomingInstance], BinaryIO] | None = None
        self.changed = threading.Condition()

    def open(self, incoming: IncomingInstance) -> BinaryIO | int:
        result: BinaryIO | int
        if self.refuse_with is not None:
            result = self.refuse_with
        elif self.file_factory is not None:
            result = self.file_factory(incoming)
        else:
            result = super().open(incoming)
        with self.changed:
            self.opened.append(incoming)
            self.changed.notify_all()
        return result

    def close(self, incoming: IncomingInstance, file: BinaryIO, ok: bool) -> int:
        if self.file_factory is not None:
            file.close()
            status = 0 if ok else STATUS_OUT_OF_RESOURCES
        else:
            status = super().close(incoming, file, ok)
        with self.changed:
            self.closed.append((incoming, ok))
            self.changed.notify_all()
        return status

    def wait_closed(self, count: int, timeout: float = 10.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.closed) >= count, timeout), (
                f"{len(self.closed)} of {count} instances closed"
            )

    def files(self) -> list[Path]:
        return sorted(self.directory.iterdir())


@pytest.fixture
def sink(tmp_path: Path) -> RecordingSink:
    directory = tmp_path / "received"
    directory.mkdir()
    return RecordingSink(directory)


@pytest.fixture
def start_scp(sink: RecordingSink) -> Iterator[Callable[..., StorageSCP]]:
    started: list[StorageSCP] = []

    def start(**options: Any) -> StorageSCP:
        options.setdefault("allow", lambda _ae, _address: True)
        scp = StorageSCP(AE_TITLE, host=LOOPBACK, port=0, sink=sink, **options)
        scp.start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()
        assert scp.active_associations == 0


@pytest.fixture
def scp(start_scp: Callable[..., StorageSCP]) -> StorageSCP:
    return start_scp()


def _pynetdicom_ae(calling_ae: str = "PYSCU") -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


# --------------------------------------------------------------------------- real senders


@needs_dcmtk
def test_storescu_sends_every_transfer_syntax_byte_identical(
    scp: StorageSCP, sink: RecordingSink, ts_files: list[Path], tmp_path: Path
) -> None:
    report = store_files(
        ts_files, LOOPBACK, scp.port, AE_TITLE, "STORESCU", log_path=tmp_path / "storescu.log"
    )
    assert report.failed == {}, (tmp_path / "storescu.log").read_text()
    assert len(report.succeeded) == len(ts_files)
    for path in ts_files:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        _assert_same_instance(path, sink.directory / f"{uid}.dcm", "STORESCU")
    assert [ok for _, ok in sink.closed] == [True] * len(ts_files)
    assert {i.calling_ae for i in sink.opened} == {"STORESCU"}
    assert {i.called_ae for i in sink.opened} == {AE_TITLE}
    assert {i.peer_address for i in sink.opened} == {LOOPBACK}
    assert {i.move_originator_ae for i in sink.opened} == {None}
    assert not list(sink.directory.glob("*.part"))


def test_pynetdicom_sends_every_transfer_syntax_and_echoes(
    scp: StorageSCP,
    sink: RecordingSink,
    ts_files: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Send the files' own data set bytes, without decoding and re-encoding them.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = _pynetdicom_ae()
    syntaxes = sorted(
        {
            str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            for p in ts_files
        }
    )
    for syntax in syntaxes:
        ae.add_requested_context(MRImageStorage, syntax)
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, scp.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        assert len(assoc.accepted_contexts) == len(syntaxes) + 1
        echo = assoc.send_c_echo(msg_id=11)
        assert echo.Status == 0x0000
        for number, path in enumerate(ts_files, 1):
            status = assoc.send_c_store(
                path, msg_id=100 + number, originator_aet="MOVER", originator_id=4242
            )
            assert status.Status == 0x0000, path
    finally:
        assoc.release()
    assert assoc.is_released
    for path in ts_files:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        _assert_same_instance(path, sink.directory / f"{uid}.dcm", "PYSCU")
    assert {i.move_originator_ae for i in sink.opened} == {"MOVER"}
    assert {i.move_originator_message_id for i in sink.opened} == {4242}


def test_pynetdicom_role_selection_and_context_negotiation(scp: StorageSCP) -> None:
    ae = _pynetdicom_ae()
    # Our preference is the proposer's first registered syntax: JPEG-LS here.
    ae.add_requested_context(MRImageStorage, [JPEGLSLossless, ExplicitVRLittleEndian])
    # An unregistered (private) syntax first: skipped for the next one.
    ae.add_requested_context(CTImageStorage, ["1.2.3.4.5.6.99", ImplicitVRLittleEndian])
    # Not a storage SOP class: rejected with "abstract syntax not supported".
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    roles = [build_role(CTImageStorage, scu_role=True, scp_role=True)]
    assoc = ae.associate(LOOPBACK, scp.port, ae_title=AE_TITLE, ext_neg=roles)
    assert assoc.is_established
    try:
        accepted = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        assert accepted == {MRImageStorage: JPEGLSLossless, CTImageStorage: ImplicitVRLittleEndian}
        ct = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)
        # The requestor may send (SCU); we never send C-STOREs, so it is not SCP.
        assert (ct.as_scu, ct.as_scp) == (True, False)
        assert [cx.result for cx in assoc.rejected_contexts] == [0x03]
        assert assoc.acceptor.maximum_length == 1048576
        assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    finally:
        assoc.release()


def test_transfer_syntax_preference_list(start_scp: Callable[..., StorageSCP]) -> None:
    scp = start_scp(transfer_syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae = _pynetdicom_ae()
    ae.add_requested_context(MRImageStorage, [JPEGLSLossless, ImplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [JPEGLSLossless])
    assoc = ae.associate(LOOPBACK, scp.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        assert [(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts] == [
            (MRImageStorage, ImplicitVRLittleEndian)
        ]
        # "transfer syntaxes not supported"
        assert [cx.result for cx in assoc.rejected_contexts] == [0x04]
    finally:
        assoc.release()


def _echoscu(port: int, calling: str, called: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk_tool("echoscu"), "-v", "-aet", calling, "-aec", called, LOOPBACK, str(port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@needs_dcmtk
def test_refused_calling_ae_gets_an_association_rejection(
    start_scp: Callable[..., StorageSCP], caplog: pytest.LogCaptureFixture
) -> None:
    asked: list[tuple[str, str]] = []

    def allow(calling_ae: str, address: str) -> bool:
        asked.append((calling_ae, address))
        return calling_ae == "FRIEND"

    scp = start_scp(allow=allow)
    with caplog.at_level(logging.WARNING, logger="app.dimse.storescp"):
        refused = _echoscu(scp.port, "STRANGER", AE_TITLE)
        wrong_called = _echoscu(scp.port, "FRIEND", "SOMEONEELSE")
        accepted = _echoscu(scp.port, "FRIEND", AE_TITLE)
    assert refused.returncode != 0
    assert "Rejected Permanent, Source: Service User" in refused.stderr
    assert "Calling AE Title Not Recognized" in refused.stderr
    assert "Called AE Title Not Recognized" in wrong_called.stderr
    assert accepted.returncode == 0, accepted.stderr
    assert ("STRANGER", LOOPBACK) in asked
    assert "'STRANGER' (127.0.0.1)" in caplog.text
    assert "calling AE title not recognized" in caplog.text

    # pynetdicom sees the same rejection as values.
    ae = _pynetdicom_ae("STRANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, scp.port, ae_title=AE_TITLE)
    assert assoc.is_rejected


@needs_dcmtk
@pytest.mark.parametrize(
    ("status", "storescu_says"),
    # DCMTK names the storage codes of PS3.4 B.2.3 but not the general 0124H of PS3.7.
    [(STATUS_NOT_AUTHORIZED, "Unknown Status: 0x124"), (STATUS_OUT_OF_RESOURCES, "OutOfResources")],
)
def test_a_sink_refusing_an_instance_fails_the_store(
    scp: StorageSCP, sink: RecordingSink, ts_files: list[Path], status: int, storescu_says: str
) -> None:
    sink.refuse_with = status
    report = store_files(ts_files[:2], LOOPBACK, scp.port, AE_TITLE)
    assert report.succeeded == []
    assert set(report.failed) == set(ts_files[:2])
    assert all(storescu_says in why for why in report.failed.values()), report.failed
    assert len(sink.opened) == 2
    assert sink.closed == []  # nothing was opened, so nothing to close
    assert sink.files() == []


class _FullDisk(io.RawIOBase):
    """A file that accepts ``room`` bytes, then fails like a full disk."""

    def __init__(self, room: int) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        size = len(memoryview(data))
        if size > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= size
        return size


@needs_dcmtk
def test_a_failed_write_is_a_failed_sub_operation_not_a_success(
    scp: StorageSCP, sink: RecordingSink, ts_files: list[Path]
) -> None:
    sink.file_factory = lambda _incoming: cast(BinaryIO, _FullDisk(room=10_000))
    report = store_files(ts_files[:1], LOOPBACK, scp.port, AE_TITLE)
    assert set(report.failed) == {ts_files[0]}
    assert "Refused: OutOfResources" in report.failed[ts_files[0]]
    assert [ok for _, ok in sink.closed] == [False]


# --------------------------------------------------------------------------- a scripted peer


class RawPeer:
    """A TCP peer that sends exactly the PDUs a test scripts."""

    def __init__(self, port: int, *, calling_ae: str = "RAWSCU", max_pdu: int = 16384) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.calling_ae = calling_ae
        self.max_pdu = max_pdu

    def associate(self, *contexts: tuple[str, str], called_ae: str = AE_TITLE) -> bytes:
        primitive = A_ASSOCIATE()
        primitive.application_context_name = "1.2.840.10008.3.1.1.1"
        primitive.calling_ae_title = self.calling_ae
        primitive.called_ae_title = called_ae
        proposed = []
        for number, (abstract, syntax) in enumerate(contexts):
            context = build_context(abstract, syntax)
            context.context_id = 2 * number + 1
            proposed.append(context)
        primitive.presentation_context_definition_list = proposed
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.max_pdu
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.0"
        primitive.user_information = [max_length, implementation]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(primitive)
        self.sock.sendall(pdu.encode())
        return self.read_pdu()

    def read_pdu(self) -> bytes:
        header = self._read(6)
        (length,) = struct.unpack(">I", header[2:6])
        return header + self._read(length)

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def send_pdvs(self, *pdvs: tuple[int, int, bytes]) -> None:
        """One P-DATA-TF holding (context ID, message control header, payload) PDVs."""
        items = b"".join(
            struct.pack(">IBB", len(payload) + 2, context_id, header) + payload
            for context_id, header, payload in pdvs
        )
        self.sock.sendall(struct.pack(">BBI", 0x04, 0, len(items)) + items)

    def read_command(self) -> Dataset:
        """Reassemble a command set from P-DATA-TF PDUs, checking the PDU size limit."""
        command = b""
        while True:
            pdu = self.read_pdu()
            assert pdu[0] == 0x04, pdu[:10]
            assert len(pdu) - 6 <= self.max_pdu
            pos = 6
            while pos < len(pdu):
                (length,) = struct.unpack_from(">I", pdu, pos)
                header = pdu[pos + 5]
                assert header & 0x01
                command += pdu[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if header & 0x02:
                    return decode(io.BytesIO(command), True, True)

    def close(self) -> None:
        self.sock.close()


def _command(**elements: Any) -> bytes:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = encode(ds, True, True)
    assert body is not None
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _store_rq(sop_instance_uid: str, message_id: int = 7) -> bytes:
    return _command(
        AffectedSOPClassUID=MRImageStorage,
        CommandField=0x0001,
        MessageID=message_id,
        Priority=0,
        CommandDataSetType=0x0000,
        AffectedSOPInstanceUID=sop_instance_uid,
    )


def _data_set_of(path: Path) -> tuple[str, bytes]:
    raw = path.read_bytes()
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID), raw[
        _data_set_offset(raw) :
    ]


def test_fragmented_command_and_data_set_across_pdvs_and_pdus(
    scp: StorageSCP, sink: RecordingSink, ts_files: list[Path]
) -> None:
    path = ts_files[0]  # Explicit VR Little Endian
    uid, data = _data_set_of(path)
    peer = RawPeer(scp.port, max_pdu=64)  # responses must come in 58-byte fragments
    try:
        assert peer.associate((MRImageStorage, ExplicitVRLittleEndian))[0] == 0x02
        command = _store_rq(uid)
        peer.send_pdvs((1, 0x01, command[:10]))
        peer.send_pdvs((1, 0x01, command[10:31]), (1, 0x03, command[31:]))
        pieces = [data[i : i + 997] for i in range(0, len(data), 997)]
        for start in range(0, len(pieces), 3):
            group = pieces[start : start + 3]
            last_group = start + 3 >= len(pieces)
            peer.send_pdvs(
                *(
                    (1, 0x02 if last_group and n == len(group) - 1 else 0x00, piece)
                    for n, piece in enumerate(group)
                )
            )
        response = peer.read_command()
        assert response.CommandField == 0x8001
        assert response.MessageIDBeingRespondedTo == 7
        assert response.Status == 0x0000
        assert response.AffectedSOPInstanceUID == uid
        assert response.AffectedSOPClassUID == MRImageStorage
        assert response.CommandDataSetType == 0x0101
        peer.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
        assert peer.read_pdu()[0] == 0x06
    finally:
        peer.close()
    _assert_same_instance(path, sink.directory / f"{uid}.dcm", "RAWSCU")


@pytest.mark.parametrize("ending", ["a-abort", "connection-lost"])
def test_abort_mid_data_set_closes_the_instance_as_failed(
    scp: StorageSCP, sink: RecordingSink, ts_files: list[Path], ending: str
) -> None:
    uid, data = _data_set_of(ts_files[0])
    peer = RawPeer(scp.port)
    try:
        assert peer.associate((MRImageStorage, ExplicitVRLittleEndian))[0] == 0x02
        peer.send_pdvs((1, 0x03, _store_rq(uid)))
        peer.send_pdvs((1, 0x00, data[:5000]))
        with sink.changed:
            assert sink.changed.wait_for(lambda: sink.opened, 10)
        assert list(sink.directory.glob("*.part")), "the partial file should exist by now"
        if ending == "a-abort":
            peer.sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    finally:
        peer.close()
    sink.wait_closed(1)
    assert sink.closed == [(sink.opened[0], False)]
    assert sink.files() == []


def _expect_abort(peer: RawPeer) -> bytes:
    pdu = peer.read_pdu()
    assert pdu[0] == 0x07, pdu
    return pdu


def _scp_still_serves(port: int) -> None:
    ae = _pynetdicom_ae()
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, port, ae_title=AE_TITLE)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x99\x00\x00\x00\x00\x04abcd",  # unknown PDU type
        b"\x04\x00\x00\x00\x00\x08" + b"\x00" * 8,  # P-DATA-TF before association
        b"\x01\x00\x7f\xff\xff\xff",  # A-ASSOCIATE-RQ of 2 GB
        b"\x01\x00\x00\x00\x00\x10" + b"\x00" * 16,  # truncated A-ASSOCIATE-RQ
    ],
    ids=["unknown-type", "data-before-association", "huge-rq", "short-rq"],
)
def test_garbage_before_association_is_aborted(scp: StorageSCP, garbage: bytes) -> None:
    peer = RawPeer(scp.port)
    try:
        peer.sock.sendall(garbage)
        _expect_abort(peer)
    finally:
        peer.close()
    _scp_still_serves(scp.port)


def test_garbage_during_association_is_aborted(
    scp: StorageSCP, sink: RecordingSink, ts_files: list[Path]
) -> None:
    uid, data = _data_set_of(ts_files[0])
    cases: list[bytes] = [
        struct.pack(">BBI", 0x04, 0, 1 << 30),  # P-DATA-TF far above our maximum
        struct.pack(">BBIIBB", 0x04, 0, 6, 2, 3, 0x03),  # PDV on a context never proposed
        struct.pack(">BBIIBB", 0x04, 0, 6, 9, 1, 0x03),  # PDV longer than its PDU
        struct.pack(">BBIIBB", 0x04, 0, 6, 2, 1, 0x02) + b"",  # data set without a command
        b"\x01\x00\x00\x00\x00\x04abcd",  # a second A-ASSOCIATE-RQ
    ]
    for case in cases:
        peer = RawPeer(scp.port)
        try:
            assert peer.associate((MRImageStorage, ExplicitVRLittleEndian))[0] == 0x02
            peer.sock.sendall(case)
            _expect_abort(peer)
        finally:
            peer.close()
    # A command set in the middle of an instance's data set: the open file is failed.
    peer = RawPeer(scp.port)
    try:
        assert peer.associate((MRImageStorage, ExplicitVRLittleEndian))[0] == 0x02
        peer.send_pdvs((1, 0x03, _store_rq(uid)))
        peer.send_pdvs((1, 0x00, data[:100]))
        peer.send_pdvs((1, 0x03, b"\x00\x00\x00\x01\xff\xff\xff\xff"))
        _expect_abort(peer)
    finally:
        peer.close()
    sink.wait_closed(1)
    assert [ok for _, ok in sink.closed] == [False]
    assert sink.files() == []
    _scp_still_serves(scp.port)


def test_store_request_with_a_path_for_a_uid_is_not_understood(
    scp: StorageSCP, sink: RecordingSink, ts_files: list[Path]
) -> None:
    _uid, data = _data_set_of(ts_files[0])
    command = _store_rq("1.2.3.44", message_id=9).replace(b"1.2.3.44", b"../../ev")
    peer = RawPeer(scp.port)
    try:
        assert peer.associate((MRImageStorage, ExplicitVRLittleEndian))[0] == 0x02
        peer.send_pdvs((1, 0x03, command))
        peer.send_pdvs((1, 0x00, data[:1000]), (1, 0x02, data[1000:2000]))
        response = peer.read_command()
        assert (response.CommandField, response.Status) == (0x8001, 0xC000)
        assert response.MessageIDBeingRespondedTo == 9
        assert "AffectedSOPInstanceUID" not in response
        # The association goes on.
        peer.send_pdvs((1, 0x03, _store_rq("1.2.3.45", message_id=10)), (1, 0x02, data))
        assert peer.read_command().Status == 0x0000
    finally:
        peer.close()
    assert [i.sop_instance_uid for i in sink.opened] == ["1.2.3.45"]
    assert [p.name for p in sink.files()] == ["1.2.3.45.dcm"]


def test_unsupported_request_gets_unrecognized_operation(scp: StorageSCP) -> None:
    peer = RawPeer(scp.port)
    try:
        assert peer.associate((CTImageStorage, ExplicitVRLittleEndian))[0] == 0x02
        find = _command(
            AffectedSOPClassUID=CTImageStorage,
            CommandField=0x0020,
            MessageID=3,
            Priority=0,
            CommandDataSetType=0x0000,
        )
        peer.send_pdvs((1, 0x03, find), (1, 0x02, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "))
        response = peer.read_command()
        assert (response.CommandField, response.Status) == (0x8020, 0x0211)
        assert response.MessageIDBeingRespondedTo == 3
    finally:
        peer.close()


def test_network_timeout_aborts_a_silent_association(
    start_scp: Callable[..., StorageSCP],
) -> None:
    scp = start_scp(network_timeout=0.5, acse_timeout=0.5)
    peer = RawPeer(scp.port)
    try:
        assert peer.associate((MRImageStorage, ExplicitVRLittleEndian))[0] == 0x02
        started = time.monotonic()
        _expect_abort(peer)
        assert 0.4 < time.monotonic() - started < 5
    finally:
        peer.close()
    # Silent before the A-ASSOCIATE-RQ: the ACSE time-out.
    peer = RawPeer(scp.port)
    try:
        peer.sock.sendall(b"\x01\x00")
        _expect_abort(peer)
    finally:
        peer.close()


def test_stop_aborts_active_associations(
    scp: StorageSCP, sink: RecordingSink, ts_files: list[Path]
) -> None:
    uid, data = _data_set_of(ts_files[0])
    peer = RawPeer(scp.port)
    try:
        assert peer.associate((MRImageStorage, ExplicitVRLittleEndian))[0] == 0x02
        peer.send_pdvs((1, 0x03, _store_rq(uid)), (1, 0x00, data[:1000]))
        with sink.changed:
            assert sink.changed.wait_for(lambda: sink.opened, 10)
        assert scp.active_associations == 1
        scp.stop()
        assert scp.active_associations == 0
        _expect_abort(peer)
    finally:
        peer.close()
    assert [ok for _, ok in sink.closed] == [False]
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, scp.port), timeout=2).close()


def test_rejection_pdus_are_well_formed(start_scp: Callable[..., StorageSCP]) -> None:
    scp = start_scp(allow=lambda ae, _address: ae != "RAWSCU")
    peer = RawPeer(scp.port)
    try:
        raw = peer.associate((MRImageStorage, ExplicitVRLittleEndian))
    finally:
        peer.close()
    rejection = A_ASSOCIATE_RJ()
    rejection.decode(raw)
    assert (rejection.result, rejection.source, rejection.reason_diagnostic) == (1, 1, 3)
    peer = RawPeer(scp.port, calling_ae="OTHER")
    try:
        raw = peer.associate((MRImageStorage, ExplicitVRLittleEndian))
        acceptance = A_ASSOCIATE_AC()
        acceptance.decode(raw)
        assert acceptance.calling_ae_title == "OTHER"
        assert acceptance.called_ae_title == AE_TITLE
    finally:
        peer.close()


def test_concurrent_associations_and_their_limit(
    start_scp: Callable[..., StorageSCP], sink: RecordingSink, ts_files: list[Path]
) -> None:
    scp = start_scp(max_associations=3)
    reports: list[Any] = []

    def send(calling_ae: str) -> None:
        reports.append(store_files(ts_files, LOOPBACK, scp.port, AE_TITLE, calling_ae))

    senders = [threading.Thread(target=send, args=(f"SENDER{n}",)) for n in range(3)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(60)
    assert [len(r.succeeded) for r in reports] == [len(ts_files)] * 3
    assert len(sink.closed) == 3 * len(ts_files)
    assert all(ok for _, ok in sink.closed)

    held = [RawPeer(scp.port) for _ in range(3)]
    try:
        for peer in held:
            assert peer.associate((MRImageStorage, ExplicitVRLittleEndian))[0] == 0x02
        extra = RawPeer(scp.port)
        try:
            rejection = A_ASSOCIATE_RJ()
            rejection.decode(extra.associate((MRImageStorage, ExplicitVRLittleEndian)))
        finally:
            extra.close()
        # transient, service-provider (presentation), local limit exceeded
        assert (rejection.result, rejection.source, rejection.reason_diagnostic) == (2, 3, 2)
    finally:
        for peer in held:
            peer.close()


def test_storage_sop_class_policy() -> None:
    assert is_storage_sop_class(CTImageStorage)
    assert is_storage_sop_class("1.2.840.10008.1.1")
    assert is_storage_sop_class("1.2.840.10008.5.1.4.1.1.999.1")  # newer than pydicom
    assert is_storage_sop_class("1.2.840.10008.5.1.4.38.1")  # Hanging Protocol Storage
    assert is_storage_sop_class("1.3.12.2.1107.5.9.1")  # Siemens CSA Non-Image (private)
    assert not is_storage_sop_class(StudyRootQueryRetrieveInformationModelFind)
    assert not is_storage_sop_class("1.2.840.10008.5.1.4.1.1.201.2")  # Inventory FIND
    assert not is_storage_sop_class("1.2.840.10008.5.1.4.31")  # Modality Worklist
    assert not is_storage_sop_class("1.2.840.10008.3.1.2.3.3")  # MPPS
    assert not is_storage_sop_class("../../etc")
