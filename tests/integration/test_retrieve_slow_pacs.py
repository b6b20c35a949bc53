"""A client that gives up before the first byte of a retrieve stops the C-MOVE.

No real PACS can be made to hold back its first C-STORE on demand, so the PACS
here is an in-process pynetdicom Move SCP that waits (watching for C-CANCEL)
before it sends anything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove, Verification

from app.runtime import Gateway
from app.sampledata import ct_series, sample_patients
from tests.gateway_server import GatewayServer, free_port, gateway_settings, local_node

pytestmark = pytest.mark.integration

SLOW_AE = "SLOWPACS"
STUDY = "2.25.888000222"


class SlowPacs:
    """Answers a C-MOVE only after ``delay`` seconds, and honours C-CANCEL meanwhile."""

    def __init__(self, storage_port: int, delay: float) -> None:
        self.storage_port = storage_port
        self.delay = delay
        self.moving = threading.Event()
        self.cancelled = threading.Event()
        self.sent = 0
        patient = sample_patients()["ascii"]
        self.datasets = list(
            ct_series(patient=patient, study_uid=STUDY, series_number=1, slices=3, rows=16, cols=16)
        )
        ae = AE(ae_title=SLOW_AE)
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_MOVE, self._move)]
        )
        assert server is not None
        self.server = server
        self.port: int = server.server_address[1]

    @property
    def series(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    def _move(self, event: Any) -> Iterator[Any]:
        yield ("127.0.0.1", self.storage_port)
        yield len(self.datasets)
        self.moving.set()
        deadline = time.monotonic() + self.delay
        while time.monotonic() < deadline:
            if event.is_cancelled:
                self.cancelled.set()
                yield 0xFE00, None
                return
            time.sleep(0.02)
        for ds in self.datasets:
            self.sent += 1
            yield 0xFF00, ds

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[tuple[SlowPacs, GatewayServer]]:
    storage_port = free_port()
    pacs = SlowPacs(storage_port, delay=30.0)
    try:
        settings = gateway_settings(
            tmp_path / "gw",
            local_node("slow", SLOW_AE, pacs.port, default=True, retrieve="move"),
            storage_port=storage_port,
        )
        with GatewayServer(settings) as gw:
            yield pacs, gw
    finally:
        pacs.stop()


@pytest.mark.parametrize("resource", ["", "/metadata"])
def test_client_leaving_before_the_first_byte_cancels_the_move(
    slow: tuple[SlowPacs, GatewayServer], resource: str
) -> None:
    pacs, gw = slow
    url = f"{gw.dicomweb}/studies/{STUDY}/series/{pacs.series}{resource}"
    timeout = httpx.Timeout(5.0, read=1.0)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url, timeout=timeout)
    assert pacs.moving.is_set(), "the gateway never asked the PACS"
    # Well within the PACS's 30 s delay, even on a loaded machine.
    assert pacs.cancelled.wait(15), "the PACS got no C-CANCEL after the client left"
    assert time.monotonic() - started < 20, "the move ran on for the PACS's whole delay"
    assert pacs.sent == 0
    runtime: Gateway = gw.app.state.gateway
    deadline = time.monotonic() + 15
    while runtime.retriever._fetches and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not runtime.retriever._fetches

    def in_use() -> int:
        return int(httpx.get(f"{gw.url}/pacs", timeout=5).json()[0]["pool"]["in_use"])

    # The PACS answers the C-CANCEL with its final response; then the
    # association goes back to the pool.
    while in_use() and time.monotonic() < deadline + 5:
        time.sleep(0.05)
    assert in_use() == 0
