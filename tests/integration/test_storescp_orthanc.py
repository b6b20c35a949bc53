"""Real C-MOVEs from Orthanc into the gateway's storage SCP (``app.dimse.storescp``).

Orthanc (``orthanc_peer``: ``TCP_NODELAY=1``, holding the shared test data and the
sample studies) is told about a move destination of our own, registered while it
runs, so that these tests never collide with the gateway's AE and port.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from app.dimse.storescp import (
    IMPLEMENTATION_CLASS_UID,
    STATUS_NOT_AUTHORIZED,
    DirectorySink,
    IncomingInstance,
    StorageSCP,
)
from tests.peers.common import LOOPBACK, InstanceInfo, dcmtk_env, dcmtk_tool, free_port
from tests.peers.orthanc import OrthancPeer

pytestmark = pytest.mark.integration

DEST_AE = "GWSCPTEST"
MOVE_SCU_AE = "MOVESCU"  # registered in every peer by the integration conftest


class RecordingSink(DirectorySink):
    """DirectorySink that remembers what it was given and how each instance ended."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.lock = threading.Lock()
        self.received: list[IncomingInstance] = []
        self.failed: list[IncomingInstance] = []
        self.offered: list[IncomingInstance] = []
        self.refuse_with: int | None = None

    def open(self, incoming: IncomingInstance) -> BinaryIO | int:
        with self.lock:
            self.offered.append(incoming)
        return self.refuse_with if self.refuse_with is not None else super().open(incoming)

    def close(self, incoming: IncomingInstance, file: BinaryIO, ok: bool) -> int:
        status = super().close(incoming, file, ok)
        with self.lock:
            (self.received if ok else self.failed).append(incoming)
        return status


@pytest.fixture
def receiver(
    orthanc_peer: OrthancPeer, tmp_path: Path
) -> Iterator[tuple[StorageSCP, RecordingSink]]:
    sink = RecordingSink(tmp_path)
    scp = StorageSCP(
        DEST_AE,
        host=LOOPBACK,
        port=free_port(),
        sink=sink,
        allow=lambda calling_ae, _address: calling_ae == orthanc_peer.aet,
    )
    scp.start()
    orthanc_peer.register_modality(DEST_AE, DEST_AE, LOOPBACK, scp.port)
    try:
        yield scp, sink
    finally:
        scp.stop()


def _series(orthanc_peer: OrthancPeer, folder: str) -> list[InstanceInfo]:
    """Every instance Orthanc holds in the series of the files under a test data folder."""
    series = {
        i.series_instance_uid for i in orthanc_peer.loaded.values() if f"/{folder}/" in str(i.path)
    }
    assert len(series) == 1, f"files under {folder}: {len(series)} series in Orthanc"
    return [i for i in orthanc_peer.loaded.values() if i.series_instance_uid in series]


def _series_move_identifier(info: InstanceInfo) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = info.study_instance_uid
    identifier.SeriesInstanceUID = info.series_instance_uid
    return identifier


def _data_set_bytes(raw: bytes) -> bytes:
    """A Part 10 file's bytes after its file meta (whose group length ends at 144)."""
    assert raw[128:132] == b"DICM"
    return raw[144 + int.from_bytes(raw[140:144], "little") :]


def _c_move(orthanc_peer: OrthancPeer, info: InstanceInfo, msg_id: int) -> list[Any]:
    """A pynetdicom C-MOVE of ``info``'s series to our SCP; the responses' statuses."""
    ae = AE(ae_title=MOVE_SCU_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(LOOPBACK, orthanc_peer.dicom_port, ae_title=orthanc_peer.aet)
    assert assoc.is_established
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return [
            status
            for status, _identifier in assoc.send_c_move(
                _series_move_identifier(info),
                DEST_AE,
                StudyRootQueryRetrieveInformationModelMove,
                msg_id=msg_id,
            )
        ]
    finally:
        assoc.release()


def test_pynetdicom_c_move_of_a_series_in_nine_transfer_syntaxes(
    orthanc_peer: OrthancPeer, receiver: tuple[StorageSCP, RecordingSink]
) -> None:
    _scp, sink = receiver
    infos = _series(orthanc_peer, "dcm_qa_ts")
    final = _c_move(orthanc_peer, infos[0], msg_id=4242)[-1]
    assert final.Status == 0x0000, final
    assert final.get("NumberOfCompletedSuboperations", len(infos)) == len(infos)
    assert final.get("NumberOfFailedSuboperations", 0) == 0

    by_uid = {i.sop_instance_uid: i for i in sink.received}
    assert set(by_uid) == {i.sop_instance_uid for i in infos}
    assert sink.failed == []
    for incoming in sink.received:
        assert incoming.move_originator_message_id == 4242
        assert incoming.move_originator_ae == MOVE_SCU_AE
        assert incoming.calling_ae == orthanc_peer.aet
        assert incoming.called_ae == DEST_AE
        assert incoming.peer_address == LOOPBACK
    # Each instance arrives as Orthanc holds it: compressed ones stay compressed,
    # with the very data set bytes of the file Orthanc stored.
    with orthanc_peer.http() as client:
        for info in infos:
            incoming = by_uid[info.sop_instance_uid]
            assert incoming.transfer_syntax_uid == info.transfer_syntax_uid
            path = sink.path_for(incoming)
            received = pydicom.dcmread(path)
            assert received.file_meta.TransferSyntaxUID == info.transfer_syntax_uid
            assert received.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
            assert received.file_meta.SourceApplicationEntityTitle == orthanc_peer.aet
            found = client.post(
                "/tools/lookup", content=info.sop_instance_uid.encode("ascii")
            ).json()
            stored = client.get(f"/instances/{found[0]['ID']}/file").content
            assert _data_set_bytes(path.read_bytes()) == _data_set_bytes(stored)
            assert received == pydicom.dcmread(info.path)


def test_movescu_c_move_of_a_ct_series(
    orthanc_peer: OrthancPeer, receiver: tuple[StorageSCP, RecordingSink], tmp_path: Path
) -> None:
    _scp, sink = receiver
    ct = [
        i
        for i in orthanc_peer.loaded.values()
        if i.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2" and "sampledata" in str(i.path)
    ]
    series_uid = ct[0].series_instance_uid
    infos = [i for i in ct if i.series_instance_uid == series_uid]
    proc = subprocess.run(
        [
            dcmtk_tool("movescu"),
            "-v",
            "-S",
            "-aet",
            MOVE_SCU_AE,
            "-aec",
            orthanc_peer.aet,
            "-aem",
            DEST_AE,
            "-k",
            "QueryRetrieveLevel=SERIES",
            "-k",
            f"StudyInstanceUID={infos[0].study_instance_uid}",
            "-k",
            f"SeriesInstanceUID={series_uid}",
            LOOPBACK,
            str(orthanc_peer.dicom_port),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    finals = re.findall(r"Received Final Move Response \((\w+)\)", output)
    assert finals == ["Success"], output
    message_ids = re.findall(r"Sending Move Request \(MsgID (\d+)\)", output)
    assert len(message_ids) == 1, output
    assert {i.sop_instance_uid for i in sink.received} == {i.sop_instance_uid for i in infos}
    assert {i.move_originator_message_id for i in sink.received} == {int(message_ids[0])}
    assert {i.move_originator_ae for i in sink.received} == {MOVE_SCU_AE}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{i.sop_instance_uid}.dcm" for i in infos
    )


def test_orthanc_ends_the_move_at_the_first_refused_instance(
    orthanc_peer: OrthancPeer, receiver: tuple[StorageSCP, RecordingSink], tmp_path: Path
) -> None:
    """Orthanc 1.10 does not count a refused C-STORE (here 0124H, what the gateway
    answers for an instance no retrieve asked for) as a failed sub-operation and
    go on: it ends the whole C-MOVE with "unable to process" and no counts."""
    _scp, sink = receiver
    sink.refuse_with = STATUS_NOT_AUTHORIZED
    infos = _series(orthanc_peer, "dcm_qa_ts")
    log_offset = orthanc_peer.log_path.stat().st_size
    final = _c_move(orthanc_peer, infos[0], msg_id=77)[-1]
    assert 0xC000 <= final.Status <= 0xCFFF
    assert final.get("NumberOfCompletedSuboperations", 0) == 0
    assert final.get("NumberOfFailedSuboperations", 0) == 0
    assert len(sink.offered) == 1 < len(infos)
    with orthanc_peer.log_path.open("rb") as log:
        log.seek(log_offset)
        assert b"failed with DIMSE status 0x0124" in log.read()
    assert list(tmp_path.iterdir()) == []
