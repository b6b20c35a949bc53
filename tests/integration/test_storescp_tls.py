"""The storage SCP's DICOM TLS listener against DCMTK's ``storescu +tls``.

A second implementation (OpenSSL through DCMTK, BCP 195 profile) on the client
side: what Orthanc's C-STORE SCU is built on, here with certificates the test
chooses, including the bad ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.dimse.storescp import DirectorySink, StorageSCP
from app.dimse.tls import server_context
from tests.peers.common import (
    LOOPBACK,
    dcmtk_available,
    free_port,
    read_instance_info,
    store_files,
    wait_until,
)
from tests.tlscerts import Credentials, TestCA

pytestmark = pytest.mark.integration

SCP_AE = "TLSSCP"


@dataclass(frozen=True)
class Keys:
    ca: TestCA
    scp: Credentials
    pacs: Credentials
    stranger: Credentials  # from a CA the SCP does not trust


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("storescp-pki")
    ca = TestCA(folder / "ca")
    return Keys(
        ca=ca,
        scp=ca.issue("storage-scp"),
        pacs=ca.issue("pacs"),
        stranger=TestCA(folder / "stranger", name="Stranger CA").issue("stranger"),
    )


@pytest.fixture
def scp(keys: Keys, tmp_path: Path) -> Iterator[StorageSCP]:
    if not dcmtk_available("storescu"):
        pytest.skip("DCMTK storescu is not installed")
    context = server_context(
        cert_file=keys.scp.cert,
        key_file=keys.scp.key,
        ca_file=keys.ca.cert,
        require_client_cert=True,
    )
    scp = StorageSCP(
        SCP_AE,
        host=LOOPBACK,
        port=free_port(),
        sink=DirectorySink(tmp_path),
        allow=lambda calling_ae, _address: calling_ae == "STORESCU",
        acse_timeout=30,
        ssl_context=context,
    )
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


def tls_args(keys: Keys, credentials: Credentials | None) -> list[str]:
    """storescu's TLS options: our CA to check the SCP, and a client certificate."""
    if credentials is None:
        return ["+tla", "+cf", str(keys.ca.cert)]
    return ["+tls", str(credentials.key), str(credentials.cert), "+cf", str(keys.ca.cert)]


def data_set(raw: bytes) -> bytes:
    if raw[128:132] != b"DICM":
        return raw
    return raw[144 + int.from_bytes(raw[140:144], "little") :]


def test_storescu_over_tls_stores_byte_identical(
    scp: StorageSCP, keys: Keys, sample_files: list[Path], tmp_path: Path
) -> None:
    files = sample_files[:5]
    report = store_files(
        files, LOOPBACK, scp.port, SCP_AE, extra_args=tls_args(keys, keys.pacs), timeout=60
    )
    assert not report.failed, report.failed
    for path in files:
        uid = read_instance_info(path).sop_instance_uid
        assert data_set((tmp_path / f"{uid}.dcm").read_bytes()) == data_set(path.read_bytes())


@pytest.mark.parametrize("client", ["no certificate", "unknown CA", "plain TCP"])
def test_refused_clients_store_nothing_and_the_scp_goes_on(
    client: str,
    scp: StorageSCP,
    keys: Keys,
    sample_files: list[Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    extra = {
        "no certificate": tls_args(keys, None),
        "unknown CA": tls_args(keys, keys.stranger),
        "plain TCP": [],
    }[client]
    with caplog.at_level(logging.WARNING, logger="app.dimse.storescp"):
        refused = store_files(sample_files[:1], LOOPBACK, scp.port, SCP_AE, extra_args=extra)
    assert refused.failed and not refused.succeeded
    assert not list(tmp_path.glob("*.dcm"))
    assert any("TLS handshake" in r.getMessage() for r in caplog.records), caplog.text
    # Refusals end in the handshake, not in the 30 s ACSE time-out, and leave nothing open.
    assert wait_until(lambda: scp.active_associations == 0, timeout=5)
    accepted = store_files(
        sample_files[:1], LOOPBACK, scp.port, SCP_AE, extra_args=tls_args(keys, keys.pacs)
    )
    assert accepted.succeeded and not accepted.failed
