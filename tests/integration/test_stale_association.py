"""An idle pooled association that died without a FIN (a firewall or NAT that
forgot the connection, a PACS host that rebooted) is only found dead when the
next C-MOVE is sent on it.  The PACS never saw that request, so the gateway
asks again on a new association instead of failing the retrieve.

Between the gateway and the PACS sits a small TCP relay that can "forget" the
connections it carries: the next bytes the gateway sends on one are answered by
a reset, exactly what a stateful firewall does after its idle timeout.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove, Verification

from app.sampledata import ct_series, sample_patients
from tests.gateway_server import GatewayServer, free_port, gateway_settings, local_node

pytestmark = pytest.mark.integration

PACS_AE = "RELAYPACS"
STUDY = "2.25.999000333"


class ForgetfulRelay:
    """Relays TCP to ``upstream``; :meth:`forget` makes every open connection
    answer its next client bytes with a reset (SO_LINGER 0) on both sides."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0
        self.resets = 0
        self._forgotten: set[socket.socket] = set()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def forget(self) -> None:
        with self._lock:
            self._forgotten |= self._open

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self.connections += 1
                self._open.add(client)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if from_client:
                    with self._lock:
                        forgotten = src in self._forgotten
                    if forgotten:
                        self._reset(src, dst)
                        return
                dst.sendall(data)
        for sock in (src, dst):
            with self._lock:
                self._open.discard(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _reset(self, *socks: socket.socket) -> None:
        with self._lock:
            self.resets += 1
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()


class MovePacs:
    """A pynetdicom Move SCP holding two small series."""

    def __init__(self, storage_port: int) -> None:
        self.storage_port = storage_port
        self.moves = 0
        patient = sample_patients()["ascii"]
        self.series: dict[str, list[Any]] = {}
        for number in (1, 2):
            datasets = list(
                ct_series(
                    patient=patient,
                    study_uid=STUDY,
                    series_number=number,
                    slices=4,
                    rows=16,
                    cols=16,
                )
            )
            self.series[str(datasets[0].SeriesInstanceUID)] = datasets
        ae = AE(ae_title=PACS_AE)
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_MOVE, self._move)]
        )
        assert server is not None
        self.server = server
        self.port: int = server.server_address[1]

    def _move(self, event: Any) -> Iterator[Any]:
        self.moves += 1
        datasets = self.series.get(str(event.identifier.SeriesInstanceUID), [])
        yield ("127.0.0.1", self.storage_port)
        yield len(datasets)
        for ds in datasets:
            yield 0xFF00, ds


@pytest.fixture
def relayed(tmp_path: Path) -> Iterator[tuple[MovePacs, ForgetfulRelay, GatewayServer]]:
    storage_port = free_port()
    pacs = MovePacs(storage_port)
    relay = ForgetfulRelay(("127.0.0.1", pacs.port))
    try:
        settings = gateway_settings(
            tmp_path / "gw",
            # "counts": no C-FIND listing beside the move, so that the only
            # operation that can meet the dead association is the C-MOVE.
            local_node(
                "relayed",
                PACS_AE,
                relay.port,
                default=True,
                retrieve="move",
                expected_instances="counts",
            ),
            storage_port=storage_port,
        )
        with GatewayServer(settings) as gw:
            yield pacs, relay, gw
    finally:
        relay.close()
        pacs.server.shutdown()


def test_a_move_on_a_silently_dead_idle_association_is_asked_again_on_a_new_one(
    relayed: tuple[MovePacs, ForgetfulRelay, GatewayServer], caplog: pytest.LogCaptureFixture
) -> None:
    pacs, relay, gw = relayed
    first, second = pacs.series
    resp = httpx.get(f"{gw.dicomweb}/studies/{STUDY}/series/{first}", timeout=30)
    assert resp.status_code == 200
    assert relay.connections == 1 and pacs.moves == 1

    relay.forget()  # the association now sits idle in the pool, dead
    with caplog.at_level(logging.INFO, logger="app.dimse.move"):
        resp = httpx.get(f"{gw.dicomweb}/studies/{STUDY}/series/{second}", timeout=30)
    assert resp.status_code == 200
    got = resp.content.count(b"Content-Location:")
    assert got == len(pacs.series[second])
    assert resp.content.rstrip().endswith(b"--"), "the body must be complete"
    assert relay.resets == 1, "the reused association was not the dead one"
    assert relay.connections == 2, "the C-MOVE was not asked again on a new association"
    assert pacs.moves == 2, "the PACS must see the request once, not twice"
    assert any("retrying" in r.getMessage() for r in caplog.records)
