"""The storage SCP's DICOM TLS listener with pynetdicom as the TLS sender.

In process (``StorageSCP`` with an SSL context) for the life cycle: C-STORE and
C-ECHO over TLS, a stop while a handshake or an association is open; in the
child process (``StorageProcess`` with ``StorageTls``) for the two ports: the
TLS port reported and kept across a restart, and a TLS node's AE title refused
on the plain port.  DCMTK's ``storescu +tls`` is the sender in
``tests/integration/test_storescp_tls.py``.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from app.dimse.storeproc import Arrival, Expectation, StorageProcess, StorageTls
from app.dimse.storescp import DirectorySink, StorageSCP
from app.dimse.tls import client_context, server_context
from app.sampledata import ct_series, sample_patients
from tests.peers.common import LOOPBACK, wait_until
from tests.tlscerts import Credentials, TestCA

SCP_AE = "GWTLS"
PACS_AE = "PACS"
PLAIN_AE = "PLAINPACS"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def server(ca: TestCA) -> Credentials:
    return ca.issue("gateway")


@pytest.fixture(scope="module")
def client(ca: TestCA) -> Credentials:
    return ca.issue("pacs")


def ct(slices: int) -> list[Dataset]:
    patient = next(iter(sample_patients().values()))
    return list(
        ct_series(
            patient=patient,
            study_uid="1.2.826.0.1.3680043.8.498.4343",
            series_number=1,
            slices=slices,
            rows=32,
            cols=32,
        )
    )


def associate(
    port: int, ca: TestCA, client: Credentials | None, datasets: list[Dataset], calling: str
) -> Association:
    context = client_context(
        ca_file=ca.cert,
        cert_file=client.cert if client else None,
        key_file=client.key if client else None,
        verify_hostname=True,
    )
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.connection_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(Verification)
    for ds in datasets[:1]:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    return ae.associate(LOOPBACK, port, ae_title=SCP_AE, tls_args=(context, "localhost"))


# --------------------------------------------------------------------------- in process


@pytest.fixture
def scp(ca: TestCA, server: Credentials, tmp_path: Path) -> Iterator[StorageSCP]:
    scp = StorageSCP(
        SCP_AE,
        host=LOOPBACK,
        port=0,
        sink=DirectorySink(tmp_path),
        allow=lambda calling_ae, _address: calling_ae == PACS_AE,
        # Long: a stop must not wait for it.
        acse_timeout=60,
        ssl_context=server_context(
            cert_file=server.cert, key_file=server.key, ca_file=ca.cert, require_client_cert=True
        ),
    )
    scp.start()
    yield scp
    scp.stop()


def test_c_store_and_c_echo_over_tls(
    scp: StorageSCP, ca: TestCA, client: Credentials, tmp_path: Path
) -> None:
    series = ct(3)
    assoc = associate(scp.port, ca, client, series, PACS_AE)
    assert assoc.is_established
    try:
        assert assoc.dul.socket.socket.version() in ("TLSv1.2", "TLSv1.3")
        assert assoc.send_c_echo().Status == 0
        for ds in series:
            assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    for ds in series:
        written = pydicom.dcmread(tmp_path / f"{ds.SOPInstanceUID}.dcm")
        assert written.PixelData == ds.PixelData


def test_a_client_without_certificate_is_refused(scp: StorageSCP, ca: TestCA) -> None:
    assoc = associate(scp.port, ca, None, [], PACS_AE)
    assert not assoc.is_established
    assert wait_until(lambda: scp.active_associations == 0, timeout=5)


def test_stop_ends_a_pending_handshake_and_an_open_association(
    scp: StorageSCP, ca: TestCA, client: Credentials
) -> None:
    silent = socket.create_connection((LOOPBACK, scp.port))  # never says ClientHello
    assoc = associate(scp.port, ca, client, [], PACS_AE)
    try:
        assert assoc.is_established
        assert wait_until(lambda: scp.active_associations == 2, timeout=5)
        scp.stop(timeout=5)
        # Both threads woke up (the handshake would otherwise wait out 60 s).
        assert scp.active_associations == 0
        assert wait_until(lambda: not assoc.is_established, timeout=10)
    finally:
        silent.close()
        if assoc.is_established:
            assoc.abort()


# --------------------------------------------------------------------------- child process


@pytest.fixture
def storage(
    tmp_path: Path, ca: TestCA, server: Credentials
) -> Iterator[tuple[StorageProcess, queue.Queue[Arrival]]]:
    arrivals: queue.Queue[Arrival] = queue.Queue()
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = StorageProcess(
        SCP_AE,
        host=LOOPBACK,
        port=0,
        max_pdu=1048576,
        senders={PACS_AE: ["localhost"], PLAIN_AE: ["localhost"]},
        temp_dir=temp,
        on_arrivals=lambda batch: [arrivals.put(a) for a in batch],
        log_level="WARNING",
        tls=StorageTls(
            port=0,
            cert_file=str(server.cert),
            key_file=str(server.key),
            ca_file=str(ca.cert),
            require_client_cert=True,
            tls_only_senders=frozenset({PACS_AE}),
        ),
    )
    proc.start()
    yield proc, arrivals
    proc.stop()


def test_the_child_serves_tls_beside_plain(
    storage: tuple[StorageProcess, queue.Queue[Arrival]], ca: TestCA, client: Credentials
) -> None:
    proc, arrivals = storage
    assert proc.tls_port not in (None, 0, proc.port)
    assert proc.tls_port is not None
    ds = ct(1)[0]
    proc.expect(Expectation(7, PACS_AE, ds.StudyInstanceUID)).result(timeout=10)

    # The TLS node on the plain port: refused, so its instances never travel in the clear.
    plain = AE(ae_title=PACS_AE)
    plain.add_requested_context(Verification)
    assert plain.associate(LOOPBACK, proc.port, ae_title=SCP_AE).is_rejected
    # A plain node on the plain port: as before.
    other = AE(ae_title=PLAIN_AE)
    other.add_requested_context(Verification)
    assoc = other.associate(LOOPBACK, proc.port, ae_title=SCP_AE)
    assert assoc.is_established
    assoc.release()

    assoc = associate(proc.tls_port, ca, client, [ds], PACS_AE)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds, originator_aet="MOVER", originator_id=7).Status == 0
    finally:
        assoc.release()
    arrival = arrivals.get(timeout=5)
    assert arrival.sop_uid == ds.SOPInstanceUID and arrival.msg_id == 7


def test_a_restarted_child_listens_on_the_same_tls_port(
    storage: tuple[StorageProcess, queue.Queue[Arrival]], ca: TestCA, client: Credentials
) -> None:
    proc, _ = storage
    tls_port, pid = proc.tls_port, proc.pid
    assert tls_port is not None and pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: proc.restarts == 1 and proc.pid != pid, timeout=20)
    assert proc.tls_port == tls_port
    assoc = associate(tls_port, ca, client, [], PACS_AE)
    assert assoc.is_established
    assoc.release()


def test_optional_client_certificates(ca: TestCA, server: Credentials) -> None:
    context = server_context(
        cert_file=server.cert, key_file=server.key, ca_file=ca.cert, require_client_cert=False
    )
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_OPTIONAL
