"""Back-pressure through the real HTTP app: a full pool answers 503 with a Retry-After
that follows how long the PACS keeps associations busy.

A slow PACS on demand is a fault case real peers cannot produce, so the PACS is
an in-process pynetdicom C-FIND SCP that takes ``DELAY`` seconds per search;
the node allows one association and waits at most half a second for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from tests.gateway_server import GatewayServer, gateway_settings, local_node

pytestmark = pytest.mark.integration

DELAY = 2.0


class SlowScp:
    def __init__(self) -> None:
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()
        ae = AE(ae_title="SLOWSCP")
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, self._find)]
        )
        self.port: int = self.server.server_address[1]

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        if event.identifier.QueryRetrieveLevel != "STUDY":
            # Studies without series: the planner's follow-up is answered at once.
            yield 0x0000, None
            return
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            time.sleep(DELAY)
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = "1.2.3.4"
            yield 0xFF00, ds
            yield 0x0000, None
        finally:
            with self._lock:
                self.active -= 1

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def slow_gateway(tmp_path: Path) -> Iterator[tuple[GatewayServer, SlowScp]]:
    scp = SlowScp()
    settings = gateway_settings(
        tmp_path,
        local_node(
            "slow", "SLOWSCP", scp.port, default=True, max_associations=1, acquire_timeout=0.5
        ),
    )
    try:
        with GatewayServer(settings) as gw:
            yield gw, scp
    finally:
        scp.stop()


def _two_at_once(url: str) -> list[httpx.Response]:
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(httpx.get, url, timeout=30) for _ in range(2)]
        # The second starts while the first holds the only association.
        return sorted((f.result() for f in futures), key=lambda r: r.status_code)


def test_full_pool_is_503_with_a_retry_after_from_the_hold_time(
    slow_gateway: tuple[GatewayServer, SlowScp],
) -> None:
    gw, scp = slow_gateway
    url = f"{gw.url}/dicomweb/studies"
    ok, busy = _two_at_once(url)
    assert ok.status_code == 200
    assert busy.status_code == 503
    assert busy.json()["error"] == "PoolExhausted"
    # Nothing was returned yet: the best guess is the age of the busy lease (~0.5 s).
    first_guess = int(busy.headers["retry-after"])
    assert 1 <= first_guess <= 2
    # Now the pool has seen an operation hold its association for DELAY seconds.
    ok, busy = _two_at_once(url)
    assert ok.status_code == 200
    assert busy.status_code == 503
    retry_after = int(busy.headers["retry-after"])
    assert DELAY <= retry_after <= DELAY + 2
    assert scp.most_active == 1  # the bound held: never two associations at once
    # After the wait it says, a retry is served.
    time.sleep(retry_after)
    assert httpx.get(url, timeout=30).status_code == 200
    pool = httpx.get(f"{gw.url}/pacs", timeout=10).json()[0]["pool"]
    assert (pool["in_use"], pool["waiting"]) == (0, 0)
