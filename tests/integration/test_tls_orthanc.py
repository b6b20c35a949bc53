"""DICOM TLS in both directions against a real Orthanc with ``DicomTlsEnabled``.

One CA signs Orthanc's certificate and the gateway's (client certificate towards
Orthanc, server certificate of the storage SCP's TLS port); Orthanc requires
client certificates and reaches the gateway's C-MOVE destination with
``UseDicomTls``.  The same gateway also serves the session's plain-TCP Orthanc.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from app.config import PacsNode
from app.dimse.tls import client_context
from app.runtime import Gateway
from tests.gateway_server import GatewayServer, gateway_settings, local_node
from tests.integration.conftest import GATEWAY_AE
from tests.integration.test_retrieve_orthanc import dataset_bytes, dataset_bytes_of, parse_multipart
from tests.peers.common import LOOPBACK, InstanceInfo, c_echo, free_port, http_ok
from tests.peers.orthanc import OrthancPeer, orthanc_available
from tests.tlscerts import Credentials, TestCA

pytestmark = pytest.mark.integration

TLS_AE = "ORTHANCTLS"


@dataclass(frozen=True)
class Pki:
    ca: TestCA
    orthanc: Credentials
    gateway: Credentials
    stranger_ca: TestCA  # signs nothing the others know


class TlsOrthanc(OrthancPeer):
    """Orthanc whose DICOM port speaks TLS only, with client certificates required."""

    def __init__(self, workdir: Path, pki: Pki, **kwargs: Any) -> None:
        self.pki = pki
        super().__init__(workdir, aet=TLS_AE, **kwargs)

    def config(self) -> dict[str, Any]:
        config = super().config()
        config.update(
            DicomTlsEnabled=True,
            DicomTlsCertificate=str(self.pki.orthanc.cert),
            DicomTlsPrivateKey=str(self.pki.orthanc.key),
            DicomTlsTrustedCertificates=str(self.pki.ca.cert),
            DicomTlsRemoteCertificateRequired=True,
            # UseDicomTls needs the object form of a modality.
            DicomModalities={
                name: {"AET": aet, "Host": host, "Port": port, "UseDicomTls": True}
                for name, (aet, host, port) in self.modalities.items()
            },
        )
        return config

    def _probe_ready(self) -> bool:
        if not http_ok(f"{self.http_url}/system", timeout=1.0):
            return False
        return tls_echo(self.dicom_port, TLS_AE, self.pki, "ECHOSCU")


def tls_echo(port: int, called_ae: str, pki: Pki, calling_ae: str, *, cert: bool = True) -> bool:
    """A C-ECHO over TLS with the gateway's certificate (or none)."""
    context = client_context(
        ca_file=pki.ca.cert,
        cert_file=pki.gateway.cert if cert else None,
        key_file=pki.gateway.key if cert else None,
        verify_hostname=True,
    )
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.connection_timeout = ae.dimse_timeout = 5
    assoc = ae.associate(LOOPBACK, port, ae_title=called_ae, tls_args=(context, "localhost"))
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = TestCA(folder / "ca")
    return Pki(
        ca=ca,
        orthanc=ca.issue("orthanc"),
        gateway=ca.issue("dimse-gateway"),
        stranger_ca=TestCA(folder / "stranger", name="Stranger CA"),
    )


@pytest.fixture(scope="module")
def storage_tls_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def tls_orthanc(
    tmp_path_factory: pytest.TempPathFactory,
    pki: Pki,
    storage_tls_port: int,
    sample_files: list[Path],
) -> Iterator[TlsOrthanc]:
    if not orthanc_available():
        pytest.skip("Orthanc or its DICOMweb plugin is not installed")
    peer = TlsOrthanc(
        tmp_path_factory.mktemp("orthanc-tls"),
        pki,
        modalities={GATEWAY_AE: (GATEWAY_AE, LOOPBACK, storage_tls_port)},
    )
    try:
        peer.start()
        loaded = peer.load_rest(sample_files)
        assert loaded.loaded, loaded.refused
        yield peer
    finally:
        peer.stop()


def tls_node(name: str, peer: OrthancPeer, pki: Pki, **options: Any) -> PacsNode:
    settings: dict[str, Any] = {
        "tls": True,
        "tls_ca_file": pki.ca.cert,
        "tls_cert_file": pki.gateway.cert,
        "tls_key_file": pki.gateway.key,
    }
    settings.update(options)
    return local_node(name, peer.aet, peer.dicom_port, **settings)


@pytest.fixture(scope="module")
def gateway(
    tls_orthanc: TlsOrthanc,
    orthanc_peer: OrthancPeer,
    pki: Pki,
    gateway_storage_port: int,
    storage_tls_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayServer]:
    slow = {"connect_timeout": 30.0, "acse_timeout": 30.0}
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw-tls"),
        tls_node("secure", tls_orthanc, pki, default=True),
        tls_node("secure-get", tls_orthanc, pki, retrieve="get"),
        # Orthanc's certificate is not signed by this CA.
        tls_node("wrong-ca", tls_orthanc, pki, tls_ca_file=pki.stranger_ca.cert, **slow),
        tls_node("no-client-cert", tls_orthanc, pki, tls_cert_file=None, tls_key_file=None),
        local_node("plain", orthanc_peer.aet, orthanc_peer.dicom_port),
        storage_port=gateway_storage_port,
    ).model_copy(
        update={
            "storage_tls_port": storage_tls_port,
            "storage_tls_cert_file": pki.gateway.cert,
            "storage_tls_key_file": pki.gateway.key,
            "storage_tls_ca_file": pki.ca.cert,
        }
    )
    with GatewayServer(settings) as gw:
        yield gw


def runtime(gw: GatewayServer) -> Gateway:
    state: Gateway = gw.app.state.gateway
    return state


def one_series(peer: OrthancPeer, patient_id: str) -> list[InstanceInfo]:
    infos = [i for i in peer.loaded.values() if i.patient_id == patient_id]
    series = infos[0].series_instance_uid
    return [i for i in infos if i.series_instance_uid == series]


def series_url(base: str, files: list[InstanceInfo]) -> str:
    return f"{base}/studies/{files[0].study_instance_uid}/series/{files[0].series_instance_uid}"


# --------------------------------------------------------------------------- the peer


def test_the_peer_speaks_tls_only(tls_orthanc: TlsOrthanc, pki: Pki) -> None:
    """What the other tests rely on: no plain association, no TLS without a certificate."""
    assert tls_echo(tls_orthanc.dicom_port, TLS_AE, pki, "ECHOSCU")
    assert not c_echo(LOOPBACK, tls_orthanc.dicom_port, TLS_AE, timeout=5)
    assert not tls_echo(tls_orthanc.dicom_port, TLS_AE, pki, "ECHOSCU", cert=False)


# --------------------------------------------------------------------------- gateway -> PACS


def test_echo_over_tls(gateway: GatewayServer) -> None:
    resp = httpx.get(f"{gateway.url}/pacs/secure/echo", timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "ok"
    nodes = {n["name"]: n for n in httpx.get(f"{gateway.url}/pacs", timeout=10).json()}
    assert nodes["secure"]["tls"] is True
    assert nodes["plain"]["tls"] is False
    assert nodes["secure"]["pool"]["opened_total"] >= 1


def test_search_over_tls(gateway: GatewayServer, tls_orthanc: TlsOrthanc) -> None:
    resp = httpx.get(f"{gateway.url}/pacs/secure/dicomweb/studies", timeout=30)
    assert resp.status_code == 200, resp.text
    found = {s["0020000D"]["Value"][0] for s in resp.json()}
    assert found == {i.study_instance_uid for i in tls_orthanc.loaded.values()}


def test_retrieve_by_move_over_tls_both_ways(
    gateway: GatewayServer, tls_orthanc: TlsOrthanc
) -> None:
    """C-MOVE-RQ over our TLS association, the C-STOREs over Orthanc's TLS
    association to the storage SCP's TLS port (the only one Orthanc knows)."""
    files = one_series(tls_orthanc, "DGW0002")
    resp = httpx.get(
        series_url(f"{gateway.url}/pacs/secure/dicomweb", files),
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    parts = parse_multipart(resp)
    by_uid = {i.sop_instance_uid: i for i in files}
    assert len(parts) == len(files)
    for _, payload in parts:
        info = by_uid.pop(str(dcmread_part(payload).SOPInstanceUID))
        assert dataset_bytes_of(payload) == dataset_bytes(info.path)
    assert not by_uid
    assert runtime(gateway).storage.tls_port is not None


def test_retrieve_by_get_over_tls(gateway: GatewayServer, tls_orthanc: TlsOrthanc) -> None:
    files = one_series(tls_orthanc, "DGW0003")
    resp = httpx.get(series_url(f"{gateway.url}/pacs/secure-get/dicomweb", files), timeout=120)
    assert resp.status_code == 200, resp.text
    uids = {str(dcmread_part(p).SOPInstanceUID) for _, p in parse_multipart(resp)}
    assert uids == {i.sop_instance_uid for i in files}


def dcmread_part(payload: bytes) -> Any:
    return dcmread(DicomBytesIO(payload))


# --------------------------------------------------------------------------- failures


def test_wrong_ca_is_a_fast_clear_502(gateway: GatewayServer) -> None:
    """The node waits up to 30 s for connect and ACSE; a certificate the gateway
    cannot verify must not wait for either."""
    for path in ("/pacs/wrong-ca/echo", "/pacs/wrong-ca/dicomweb/studies"):
        started = time.monotonic()
        resp = httpx.get(gateway.url + path, timeout=60)
        elapsed = time.monotonic() - started
        assert resp.status_code == 502, (path, resp.text)
        body = resp.json()
        assert body["error"] == "TlsHandshakeFailed"
        assert body["node"] == "wrong-ca"
        assert "TLS" in body["message"]
        assert "certificate" in body["message"]
        assert "certificate was refused" in body["message"]
        assert "tls_ca_file" in body["message"]
        assert elapsed < 10, elapsed
    state = runtime(gateway).pool(runtime(gateway).node("wrong-ca")).state()
    assert state.in_use == 0 and state.idle == 0
    assert "TLS" in (state.last_error or "")


def test_missing_client_certificate_names_it(gateway: GatewayServer) -> None:
    resp = httpx.get(f"{gateway.url}/pacs/no-client-cert/echo", timeout=60)
    assert resp.status_code == 502, resp.text
    body = resp.json()
    assert body["error"] == "TlsHandshakeFailed"
    assert "client certificate" in body["message"]


# --------------------------------------------------------------------------- alongside


def test_plain_node_keeps_working_alongside(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    echo = httpx.get(f"{gateway.url}/pacs/plain/echo", timeout=30)
    assert echo.status_code == 200, echo.text
    files = one_series(orthanc_peer, "DGW0004")
    search = httpx.get(
        f"{gateway.url}/pacs/plain/dicomweb/studies/{files[0].study_instance_uid}/series",
        timeout=30,
    )
    assert search.status_code == 200, search.text
    assert files[0].series_instance_uid in {s["0020000E"]["Value"][0] for s in search.json()}
    resp = httpx.get(series_url(f"{gateway.url}/pacs/plain/dicomweb", files), timeout=120)
    assert resp.status_code == 200, resp.text
    uids = {str(dcmread_part(p).SOPInstanceUID) for _, p in parse_multipart(resp)}
    assert uids == {i.sop_instance_uid for i in files}


def test_storage_ports_keep_tls_senders_on_tls(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, pki: Pki, gateway_storage_port: int
) -> None:
    """The plain port refuses the TLS node's AE title (its instances must not travel
    in the clear); the TLS port wants a certificate from the configured CA."""
    tls_port = runtime(gateway).storage.tls_port
    assert tls_port is not None
    assert c_echo(LOOPBACK, gateway_storage_port, GATEWAY_AE, orthanc_peer.aet, timeout=5)
    assert not c_echo(LOOPBACK, gateway_storage_port, GATEWAY_AE, TLS_AE, timeout=5)
    assert tls_echo(tls_port, GATEWAY_AE, pki, TLS_AE)
    assert not tls_echo(tls_port, GATEWAY_AE, pki, TLS_AE, cert=False)
    assert not c_echo(LOOPBACK, tls_port, GATEWAY_AE, TLS_AE, timeout=5)
