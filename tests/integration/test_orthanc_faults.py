"""Orthanc going away: before a request, in the middle of a C-FIND, and restarted
while clients keep asking.

What must hold each time: the client gets 502/503/504 quickly with a JSON
message, never a hang or a 500; the pool has nothing in use afterwards and the
gateway holds no more sockets or file descriptors than before; once Orthanc is
back the next request succeeds.

The module has its own Orthanc (the tests stop it).  Between the gateway and
Orthanc sits a small TCP relay that can hold back Orthanc's answers once a
C-FIND is under way, so that Orthanc is stopped while the search is in flight
rather than before or after it, whatever the machine's speed.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.sampledata import ct_series, sample_patients, write_datasets
from tests.gateway_server import GatewayServer, free_port, gateway_settings, local_node
from tests.integration.conftest import GATEWAY_AE
from tests.peers.orthanc import OrthancPeer, orthanc_available

pytestmark = pytest.mark.integration

STUDY = "2.25.666000555"
ERRORS = (502, 503, 504)


class HoldingRelay:
    """Relays TCP to ``upstream``.  Once :meth:`arm` ed, a connection that has
    carried ``after`` more bytes from upstream holds everything else back and
    sets ``held``; when upstream then goes away, the client side is closed."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.held = threading.Event()
        self._armed_after: int | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, after: int) -> None:
        with self._lock:
            self.held.clear()
            self._armed_after = after

    def disarm(self) -> None:
        with self._lock:
            self._armed_after = None

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=2)
                server.settimeout(None)
            except OSError:
                client.close()  # as if the PACS refused: nothing listens behind us
                continue
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        carried = 0
        holding = False
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if downstream and not holding:
                    with self._lock:
                        after = self._armed_after
                    if after is not None:
                        carried += len(data)
                        if carried > after:
                            holding = True
                            self.held.set()
                if not holding:
                    dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    patient = sample_patients()["ascii"]
    out = tmp_path_factory.mktemp("faults-data")
    # A series whose IMAGE-level C-FIND answer is large (400 matches), and a
    # small one to retrieve.
    many = ct_series(
        patient=patient, study_uid=STUDY, series_number=1, slices=400, rows=8, cols=8, seed="many"
    )
    small = ct_series(
        patient=patient, study_uid=STUDY, series_number=2, slices=12, rows=64, cols=64, seed="few"
    )
    return write_datasets([*many, *small], out)


@pytest.fixture(scope="module")
def setup(
    files: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[OrthancPeer, HoldingRelay, GatewayServer]]:
    if not orthanc_available():
        pytest.skip("Orthanc is not installed (apt: orthanc orthanc-dicomweb)")
    tmp = tmp_path_factory.mktemp("faults")
    storage_port = free_port()
    peer = OrthancPeer(
        tmp / "orthanc", modalities={GATEWAY_AE: (GATEWAY_AE, "127.0.0.1", storage_port)}
    )
    peer.start()
    relay = HoldingRelay(("127.0.0.1", peer.dicom_port))
    try:
        peer.load(files)
        node = local_node(
            "orthanc",
            peer.aet,
            relay.port,
            default=True,
            dimse_timeout=5,
            idle_timeout=1.0,
            max_associations=4,
        )
        with GatewayServer(gateway_settings(tmp / "gw", node, storage_port=storage_port)) as gw:
            yield peer, relay, gw
    finally:
        relay.close()
        peer.stop()


@pytest.fixture
def running(
    setup: tuple[OrthancPeer, HoldingRelay, GatewayServer],
) -> Iterator[tuple[OrthancPeer, HoldingRelay, GatewayServer]]:
    """The setup, with Orthanc running before and after the test."""
    peer, relay, _ = setup
    peer.start()
    try:
        yield setup
    finally:
        relay.disarm()
        peer.start()


def _series(peer: OrthancPeer) -> tuple[str, str]:
    """(the 400-instance series, the 12-instance series)."""
    counts = Counter(info.series_instance_uid for info in peer.loaded.values())
    (big, _), (small, _) = counts.most_common(2)
    return big, small


def _pool(gw: GatewayServer) -> dict[str, Any]:
    pool: dict[str, Any] = httpx.get(f"{gw.url}/pacs", timeout=5).json()[0]["pool"]
    return pool


def _fd_targets() -> list[str]:
    """What this process's descriptors point at: files, pipes, and sockets that
    still carry a connection or a listener (TCP: ``local->remote``; UNIX).

    A socket whose connection is gone but whose Python object lives on is left
    out: pynetdicom logs a connection reset with its traceback, pytest keeps
    log records (and so those frames and sockets) until the test ends, and
    such a descriptor is freed with them.  The soak (``bench/soak.py``) counts
    every descriptor of a gateway process that pytest does not run.
    """
    live: dict[str, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            local, remote = (int(x.rsplit(":", 1)[1], 16) for x in (f[1], f[2]))
            live[f[9]] = f"tcp {local}->{remote}"
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        live[f[6]] = "unix"
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inode = target[8:-1]
                if inode not in live:
                    continue
                target = live[inode]
            out.append(target)
    return sorted(out)


def _established_to(port: int) -> int:
    """Established TCP connections to ``port``: the PACS side of the associations."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


def _settled(
    gw: GatewayServer,
    relay: HoldingRelay,
    fds_before: list[str] | None,
) -> None:
    """Wait until idle associations expired; then nothing may be left open."""
    deadline = time.monotonic() + 15
    while True:
        gc.collect()
        pool = _pool(gw)
        quiet = pool["in_use"] == 0 and pool["idle"] == 0
        fds = _fd_targets()
        grown = Counter(fds) - Counter(fds_before or fds)
        if quiet and _established_to(relay.port) == 0 and len(fds) <= len(fds_before or fds):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"pool {pool}, {_established_to(relay.port)} connections to the PACS, "
                f"{len(fds)} file descriptors (before: {len(fds_before or fds)}), new: {grown}"
            )
        time.sleep(0.1)


def _error_json(resp: httpx.Response) -> dict[str, Any]:
    assert resp.headers["content-type"].startswith("application/json"), resp.text[:200]
    body: dict[str, Any] = resp.json()
    assert body["message"] and body["node"] == "orthanc"
    return body


def test_orthanc_stopped_before_the_request(
    running: tuple[OrthancPeer, HoldingRelay, GatewayServer],
) -> None:
    peer, relay, gw = running
    _, small = _series(peer)
    assert httpx.get(f"{gw.dicomweb}/studies/{STUDY}/series", timeout=10).status_code == 200
    _settled(gw, relay, None)
    fds_before = _fd_targets()
    peer.stop()
    for path in (
        f"/studies/{STUDY}/series",
        f"/studies/{STUDY}/series/{small}",
        f"/studies/{STUDY}/series/{small}/metadata",
    ):
        started = time.monotonic()
        resp = httpx.get(f"{gw.dicomweb}{path}", timeout=10)
        elapsed = time.monotonic() - started
        assert resp.status_code == 503, (path, resp.text)
        assert elapsed < 1.0, f"{path}: {elapsed:.2f} s"
        assert resp.headers["retry-after"]
        body = _error_json(resp)
        assert body["error"] == "PacsUnavailable"
        assert "cannot open an association" in body["message"]
    _settled(gw, relay, fds_before)
    # Back up: the first request succeeds.
    peer.start()
    resp = httpx.get(f"{gw.dicomweb}/studies/{STUDY}/series/{small}", timeout=30)
    assert resp.status_code == 200
    assert resp.content.count(b"Content-Location:") == 12


def test_orthanc_stopped_mid_search(
    running: tuple[OrthancPeer, HoldingRelay, GatewayServer],
) -> None:
    peer, relay, gw = running
    big, _ = _series(peer)
    url = f"{gw.dicomweb}/studies/{STUDY}/series/{big}/instances"
    whole = httpx.get(url, timeout=30)
    assert whole.status_code == 200 and len(whole.json()) == 400
    _settled(gw, relay, None)
    fds_before = _fd_targets()
    # Orthanc's answers stop reaching the gateway after ~20 matches; then it stops.
    relay.arm(after=8000)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(httpx.get, url, timeout=30)
        assert relay.held.wait(10), "the C-FIND never got under way"
        stopped = time.monotonic()
        peer.stop(timeout=0.2)
        resp = future.result()
    waited = time.monotonic() - stopped
    relay.disarm()
    assert resp.status_code in (502, 503), resp.text
    assert waited < 3, f"the client waited {waited:.1f} s after Orthanc stopped"
    body = _error_json(resp)
    assert body["error"] in ("AssociationAborted", "PacsUnavailable")
    _settled(gw, relay, fds_before)
    # The pool recovers: with Orthanc back, the same search is whole again.
    peer.start()
    again = httpx.get(url, timeout=30)
    assert again.status_code == 200 and len(again.json()) == 400


def test_orthanc_restarted_under_load(
    running: tuple[OrthancPeer, HoldingRelay, GatewayServer],
) -> None:
    peer, relay, gw = running
    _, small = _series(peer)
    requests: list[tuple[str, Callable[[httpx.Response], bool]]] = [
        (f"/studies/{STUDY}/series", lambda r: len(r.json()) == 2),
        (f"/studies/{STUDY}/series/{small}/instances", lambda r: len(r.json()) == 12),
        (f"/studies/{STUDY}/series/{small}", lambda r: r.content.rstrip().endswith(b"--")),
        (f"/studies/{STUDY}/series/{small}/metadata", lambda r: len(r.json()) == 12),
    ]
    for path, _ in requests:
        assert httpx.get(f"{gw.dicomweb}{path}", timeout=30).status_code == 200
    _settled(gw, relay, None)
    fds_before = _fd_targets()

    stop = threading.Event()
    seen: list[tuple[float, float, str, int, bool]] = []

    def client(index: int) -> None:
        with httpx.Client(timeout=30) as http:
            n = index
            while not stop.is_set():
                path, right = requests[n % len(requests)]
                n += 1
                # Retrieves must be cold sometimes: forget the series now and then.
                if n % 7 == 0:
                    cache = gw.app.state.gateway.cache
                    for sop in [i.sop_uid for i in cache.series(small) or []]:
                        cache._forget(sop)
                started = time.monotonic()
                resp = http.get(f"{gw.dicomweb}{path}")
                ok = resp.status_code == 200 and right(resp)
                if resp.status_code in ERRORS:
                    _error_json(resp)
                seen.append((started, time.monotonic(), path, resp.status_code, ok))

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client, i) for i in range(6)]
        time.sleep(1.5)
        down = time.monotonic()
        peer.stop()
        time.sleep(1.0)
        peer.start()
        up = time.monotonic()
        time.sleep(3.0)
        stop.set()
        for f in futures:
            f.result()

    statuses = Counter(status for *_, status, _ in seen)
    assert set(statuses) <= {200, *ERRORS}, statuses
    assert all(ok for *_, status, ok in seen if status == 200), "a 200 with a wrong answer"
    assert any(status in ERRORS for *_, status, _ in seen), "the restart went unnoticed"
    # Errors only while Orthanc was down or just back (dead idle associations).
    late = [s for s in seen if s[3] != 200 and s[0] > up + 1.0]
    assert not late, late[:5]
    early = [s for s in seen if s[3] != 200 and s[1] < down]
    assert not early, early[:5]
    assert sum(1 for s in seen if s[0] > up + 1.0 and s[3] == 200) >= 6
    _settled(gw, relay, fds_before)
