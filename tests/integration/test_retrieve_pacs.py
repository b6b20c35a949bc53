"""WADO-RS through the gateway from DCMTK dcmqrscp and pynetdicom's qrscp (C-MOVE)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread

from app.demo import QrscpProcess
from tests.gateway_server import GatewayServer, gateway_settings, local_node
from tests.integration.test_retrieve_orthanc import (
    dataset_bytes,
    dataset_bytes_of,
    parse_multipart,
    read_part,
)
from tests.peers.dcmqrscp import DcmqrscpPeer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(
    dcmqrscp_peer: DcmqrscpPeer,
    qrscp_peer: QrscpProcess,
    gateway_storage_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw-retrieve-pacs"),
        local_node("dcmqrscp", dcmqrscp_peer.aet, dcmqrscp_peer.dicom_port),
        local_node("qrscp", qrscp_peer.ae_title, qrscp_peer.port),
        storage_port=gateway_storage_port,
    )
    with GatewayServer(settings) as gw:
        yield gw


def _files(paths: list[Path], patient: str) -> dict[str, tuple[Path, str, str]]:
    out = {}
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        if ds.PatientID == patient:
            out[str(ds.SOPInstanceUID)] = (
                path,
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
            )
    return out


@pytest.mark.parametrize("pacs", ["dcmqrscp", "qrscp"])
def test_series_and_study_as_stored(
    gateway: GatewayServer,
    dcmqrscp_peer: DcmqrscpPeer,
    sample_files: list[Path],
    pacs: str,
) -> None:
    held = [i.path for i in dcmqrscp_peer.loaded.values()] if pacs == "dcmqrscp" else sample_files
    files = _files(held, "DGW0002")
    studies = {study for _, study, _ in files.values()}
    for study in sorted(studies):
        resp = httpx.get(
            f"{gateway.url}/pacs/{pacs}/dicomweb/studies/{study}",
            headers={"Accept": "multipart/related; type=application/dicom; transfer-syntax=*"},
            timeout=120,
        )
        assert resp.status_code == 200, resp.text
        parts = parse_multipart(resp)
        got = {str(read_part(p).SOPInstanceUID): p for _, p in parts}
        expected = {sop for sop, (_, st, _) in files.items() if st == study}
        assert set(got) == expected
        for sop, payload in got.items():
            assert dataset_bytes_of(payload) == dataset_bytes(files[sop][0])


@pytest.mark.parametrize("pacs", ["dcmqrscp", "qrscp"])
def test_instance_default_is_explicit_little_endian(
    gateway: GatewayServer, sample_files: list[Path], pacs: str
) -> None:
    files = _files(sample_files, "DGW0004")
    sop, (path, study, series) = next(iter(files.items()))
    resp = httpx.get(
        f"{gateway.url}/pacs/{pacs}/dicomweb/studies/{study}/series/{series}/instances/{sop}",
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    [(headers, payload)] = parse_multipart(resp)
    assert headers["Content-Type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
    got = read_part(payload)
    np.testing.assert_array_equal(got.pixel_array, dcmread(path).pixel_array)
    assert str(got.PatientName) == str(dcmread(path).PatientName)
