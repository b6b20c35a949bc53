"""Retrieves that go wrong: the client leaves mid-stream, the PACS dies mid-move.

Each test gets its own Orthanc holding one large CT series, so a move lasts long
enough to be interrupted, and so that stopping the PACS hurts no other test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.runtime import Gateway
from app.sampledata import ct_series, sample_patients, write_datasets
from tests.gateway_server import (
    GatewayServer,
    free_port,
    gateway_settings,
    local_node,
    partial_files,
)
from tests.integration.conftest import GATEWAY_AE
from tests.peers.orthanc import OrthancPeer, orthanc_available

pytestmark = pytest.mark.integration

STUDY = "2.25.777000111"


@pytest.fixture(scope="module")
def big_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    datasets = ct_series(
        patient=sample_patients()["ascii"],
        study_uid=STUDY,
        series_number=7,
        slices=150,
        rows=512,
        cols=512,
        seed="faults",
    )
    return write_datasets(datasets, tmp_path_factory.mktemp("big"))


@pytest.fixture
def setup(
    big_series: list[Path], tmp_path: Path
) -> Iterator[tuple[OrthancPeer, GatewayServer, str]]:
    if not orthanc_available():
        pytest.skip("Orthanc is not installed (apt: orthanc orthanc-dicomweb)")
    storage_port = free_port()
    peer = OrthancPeer(
        tmp_path / "orthanc", modalities={GATEWAY_AE: (GATEWAY_AE, "127.0.0.1", storage_port)}
    )
    peer.start()
    try:
        peer.load(big_series)
        settings = gateway_settings(
            tmp_path / "gw",
            local_node("orthanc", peer.aet, peer.dicom_port, default=True, dimse_timeout=10),
            storage_port=storage_port,
        )
        series = next(iter(peer.loaded.values())).series_instance_uid
        with GatewayServer(settings) as gw:
            yield peer, gw, series
    finally:
        peer.stop()


def _runtime(gw: GatewayServer) -> Gateway:
    state: Gateway = gw.app.state.gateway
    return state


def _wait(predicate: object, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def _no_temp_files(gw: GatewayServer) -> bool:
    return not partial_files(_runtime(gw).cache.root / "tmp")


def test_client_leaving_mid_stream_cancels_the_move(
    setup: tuple[OrthancPeer, GatewayServer, str],
) -> None:
    peer, gw, series = setup
    url = f"{gw.dicomweb}/studies/{STUDY}/series/{series}"
    with httpx.stream("GET", url, timeout=30) as resp:
        assert resp.status_code == 200
        got = 0
        for chunk in resp.iter_bytes():
            got += len(chunk)
            if got > 2_000_000:
                break
    retriever = _runtime(gw).retriever
    assert _wait(lambda: not retriever._fetches), "the move was not stopped"
    assert _wait(lambda: _no_temp_files(gw))
    assert _runtime(gw).cache.series(series) is None, "a cancelled move is not a complete series"
    kept = list((_runtime(gw).cache.root / "instances").rglob("*.dcm"))
    assert len(kept) < len(peer.loaded), "C-CANCEL should have stopped the PACS early"
    # The pool is healthy afterwards: the same series can be fetched whole.
    again = httpx.get(url, timeout=60)
    assert again.status_code == 200
    assert again.content.count(b"Content-Location:") == len(peer.loaded)
    pool = httpx.get(f"{gw.url}/pacs", timeout=5).json()[0]["pool"]
    assert pool["in_use"] == 0


def test_pacs_dying_mid_move_leaves_an_unterminated_body(
    setup: tuple[OrthancPeer, GatewayServer, str],
) -> None:
    peer, gw, series = setup
    url = f"{gw.dicomweb}/studies/{STUDY}/series/{series}"
    body = b""
    with httpx.stream("GET", url, timeout=30) as resp:
        assert resp.status_code == 200
        boundary = resp.headers["content-type"].split("boundary=")[1].strip('"')
        killed = False
        for chunk in resp.iter_bytes():
            body += chunk
            if not killed and len(body) > 1_000_000:
                peer.stop(timeout=0.1)
                killed = True
    assert killed
    assert not body.endswith(f"--{boundary}--\r\n".encode()), (
        "an incomplete retrieve looked complete"
    )
    assert _wait(lambda: _no_temp_files(gw))
    assert _runtime(gw).cache.series(series) is None
    # The PACS is gone: an honest, fast error, and no association left in use.
    started = time.monotonic()
    echo = httpx.get(f"{gw.url}/pacs/orthanc/echo", timeout=10)
    assert echo.status_code in (502, 503)
    assert time.monotonic() - started < 3
    pool = httpx.get(f"{gw.url}/pacs", timeout=5).json()[0]["pool"]
    assert pool["in_use"] == 0
