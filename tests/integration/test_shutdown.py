"""Graceful shutdown of a real gateway in front of Orthanc, judged from outside.

A retrieve (cold: C-MOVE into the storage SCP while the answer streams) and a
search are in flight when the server is told to stop. Afterwards, seen only
through ports, files and HTTP:

- each answer either finished (a multipart body with its closing delimiter and
  every instance whole) or was cut (no closing delimiter): never a body that
  looks complete but is not;
- no DICOM connection to Orthanc is left open, and the pools hold none;
- the storage SCP's port is closed, and so is the HTTP port;
- the cache holds no half-written file: no ``*.part``, nothing in ``tmp/``,
  and every cached instance reads back whole.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from tests.gateway_server import GatewayServer, gateway_settings, local_node
from tests.peers.orthanc import OrthancPeer

pytestmark = pytest.mark.integration

_ESTABLISHED = "01"


def established_connections(port: int) -> int:
    """TCP connections in ESTABLISHED state with *port* at either end (this host)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            ports = {int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)}
            if state == _ESTABLISHED and port in ports:
                count += 1
    return count


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def largest_study(peer: OrthancPeer) -> tuple[str, set[str]]:
    sizes: dict[str, int] = {}
    members: dict[str, set[str]] = {}
    for info in peer.loaded.values():
        sizes[info.study_instance_uid] = sizes.get(info.study_instance_uid, 0) + (
            info.path.stat().st_size
        )
        members.setdefault(info.study_instance_uid, set()).add(info.sop_instance_uid)
    study = max(sizes, key=lambda uid: sizes[uid])
    return study, members[study]


def multipart_parts(content_type: str, body: bytes) -> tuple[bool, list[bytes]]:
    """(ends with the closing delimiter, the payloads of the whole parts)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    assert match, content_type
    delimiter = b"--" + match.group(1).encode()
    closed = body.endswith(delimiter + b"--\r\n")
    parts = []
    for chunk in body.split(delimiter)[1:]:
        head, sep, rest = chunk.partition(b"\r\n\r\n")
        length = re.search(rb"Content-Length: *(\d+)", head, re.IGNORECASE)
        if not sep or length is None or len(rest) < int(length.group(1)) + 2:
            break  # the part the cut fell into
        parts.append(rest[: int(length.group(1))])
    return closed, parts


class Client(threading.Thread):
    """One HTTP request in a thread; keeps what arrived and how it ended."""

    def __init__(self, url: str, headers: dict[str, str], delay: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.headers = headers
        self.delay = delay  # a slow reader: seconds between chunks
        self.first_bytes = threading.Event()
        self.status: int | None = None
        self.content_type = ""
        self.body = bytearray()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, headers=self.headers, timeout=60) as response:
                self.status = response.status_code
                self.content_type = response.headers.get("content-type", "")
                for chunk in response.iter_raw():
                    self.body += chunk
                    self.first_bytes.set()
                    time.sleep(self.delay)
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.first_bytes.set()


@pytest.mark.parametrize(
    "grace",
    [pytest.param(60.0, id="in-flight-finish"), pytest.param(0.2, id="in-flight-cut")],
)
def test_shutdown_mid_retrieve_and_search_leaves_nothing_behind(
    orthanc_peer: OrthancPeer, gateway_storage_port: int, tmp_path: Path, grace: float
) -> None:
    study, instances = largest_study(orthanc_peer)
    orthanc_port = orthanc_peer.dicom_port
    # Other modules' gateways are stopped, but count what is there regardless.
    before = established_connections(orthanc_port)
    settings = gateway_settings(
        tmp_path,
        local_node("orthanc", orthanc_peer.aet, orthanc_port, default=True),
        storage_port=gateway_storage_port,
    ).model_copy(update={"shutdown_grace": grace})
    gw = GatewayServer(settings)
    # With a short grace period the client reads slowly, so the answer is still
    # streaming (and the C-MOVE still running) when the grace period ends.
    cut = grace < 1
    retrieve = Client(
        f"{gw.dicomweb}/studies/{study}",
        {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        delay=0.01 if cut else 0.0,
    )
    search = Client(f"{gw.dicomweb}/instances?includefield=all", {})
    with gw:
        retrieve.start()
        assert retrieve.first_bytes.wait(60), "the retrieve never started streaming"
        pools: Any = gw.app.state.gateway.pools
        search.start()
        time.sleep(0.05)
        assert listening(gateway_storage_port)
        # Leaving the block stops the server: uvicorn's shutdown, then the lifespan's.
    assert not gw.running, "the server did not stop"
    retrieve.join(60)
    search.join(60)
    assert not retrieve.is_alive() and not search.is_alive()

    # The retrieve: finished whole, or cut at a part boundary without the
    # closing delimiter; either way a complete HTTP message, whole parts.
    assert retrieve.status == 200, (retrieve.status, bytes(retrieve.body[:300]))
    assert retrieve.error is None, retrieve.error
    closed, parts = multipart_parts(retrieve.content_type, bytes(retrieve.body))
    received = [dcmread(BytesIO(p)).SOPInstanceUID for p in parts]
    assert set(received) <= instances
    assert len(set(received)) == len(received)
    if cut:
        assert not closed, "the answer was complete before the grace period ended"
        assert len(received) < len(instances)
    else:
        assert closed, "the server stopped before an in-flight answer was complete"
        assert set(received) == instances

    # The search: a whole JSON answer, or no answer at all; never a server error.
    if search.status is not None and search.error is None:
        assert search.status in (200, 204, 503), (search.status, bytes(search.body[:300]))
        if search.status == 200:
            assert bytes(search.body).startswith(b"[") and bytes(search.body).endswith(b"]")

    # Associations released: Orthanc's side too, and the pools hold none.
    assert wait_until(lambda: established_connections(orthanc_port) <= before), (
        f"{established_connections(orthanc_port)} connections to Orthanc still open"
    )
    for pool in pools.values():
        state = pool.state()
        assert (state.in_use, state.idle) == (0, 0), state
    # Storage SCP and HTTP server stopped.
    assert not listening(gateway_storage_port)
    assert not listening(settings.http_port)
    assert established_connections(gateway_storage_port) == 0

    # Nothing half-written in the cache.
    cache = settings.work_dir / "cache"
    assert list(settings.work_dir.rglob("*.part")) == []
    assert list((cache / "tmp").iterdir()) == []
    for path in (cache / "instances").rglob("*.dcm"):
        assert dcmread(path).SOPInstanceUID == path.stem
