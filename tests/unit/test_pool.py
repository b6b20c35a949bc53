"""The association pool and C-FIND against in-process pynetdicom SCPs.

Real PACS cannot abort, stall or answer odd statuses on demand; these peers can.
Each test starts its own SCP on a free loopback port.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from app.config import PacsNode
from app.dimse.find import QueryModel, c_echo, c_find
from app.dimse.pool import AssociationPool
from app.errors import (
    AssociationAborted,
    AssociationRejected,
    DimseTimeout,
    PacsFailureStatus,
    PacsUnavailable,
    PoolExhausted,
)
from app.runtime import QUERY_CONTEXTS

Handler = Callable[[Any], Iterator[tuple[int, Dataset | None]]]


class Scp:
    """A Study Root C-FIND SCP whose behaviour each test sets."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.associations = 0
        self.cancelled = 0
        self.released = 0
        ae = AE(ae_title="TESTSCP")
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.require_called_aet = True
        self.ae = ae
        self.server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[
                (evt.EVT_C_FIND, self._find),
                (evt.EVT_ESTABLISHED, self._established),
                (evt.EVT_RELEASED, self._released),
            ],
        )
        self.port: int = self.server.server_address[1]

    def _established(self, event: Any) -> None:
        self.associations += 1

    def _released(self, event: Any) -> None:
        self.released += 1

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        for status, ds in self.handler(event):
            if event.is_cancelled:
                self.cancelled += 1
                yield 0xFE00, None
                return
            yield status, ds

    def abort_all(self) -> None:
        for assoc in list(self.server.active_associations):
            assoc.abort()

    def stop(self) -> None:
        self.server.shutdown()


def _match(i: int) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = f"1.2.3.{i}"
    return ds


def _answers(n: int, delay: float = 0.0) -> Handler:
    def handler(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        if event.identifier.QueryRetrieveLevel != "STUDY":
            yield 0x0000, None  # this PACS holds studies without series
            return
        for i in range(n):
            if delay:
                time.sleep(delay)
            yield 0xFF00, _match(i)
        yield 0x0000, None

    return handler


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    ex = ThreadPoolExecutor(max_workers=16)
    yield ex
    ex.shutdown(wait=True)


@pytest.fixture
def scp_factory() -> Iterator[Callable[[Handler], Scp]]:
    started: list[Scp] = []

    def make(handler: Handler) -> Scp:
        scp = Scp(handler)
        started.append(scp)
        return scp

    yield make
    for scp in started:
        scp.stop()


def _node(port: int, **kw: Any) -> PacsNode:
    defaults: dict[str, Any] = {
        "name": "test",
        "ae_title": "TESTSCP",
        "host": "127.0.0.1",
        "port": port,
        "max_associations": 2,
        "acquire_timeout": 5.0,
        "dimse_timeout": 5.0,
    }
    defaults.update(kw)
    return PacsNode(**defaults)


def _pool(node: PacsNode, executor: ThreadPoolExecutor) -> AssociationPool:
    return AssociationPool(
        node, calling_ae_title="GWTEST", contexts=QUERY_CONTEXTS, executor=executor
    )


def _query() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    return ds


async def _settle(pool: AssociationPool) -> None:
    for _ in range(50):
        if pool.state().in_use == 0:
            return
        await asyncio.sleep(0.02)


def test_associations_are_reused(scp_factory: Any, executor: ThreadPoolExecutor) -> None:
    scp = scp_factory(_answers(3))

    async def run() -> None:
        pool = _pool(_node(scp.port), executor)
        pool.start()
        for _ in range(5):
            result = await c_find(pool, _query(), QueryModel.STUDY_ROOT)
            assert [str(d.StudyInstanceUID) for d in result.matches] == [
                "1.2.3.0",
                "1.2.3.1",
                "1.2.3.2",
            ]
        state = pool.state()
        assert state.opened_total == 1
        assert state.idle == 1 and state.in_use == 0
        await pool.close()

    asyncio.run(run())
    assert scp.associations == 1
    deadline = time.monotonic() + 3
    while scp.released < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scp.released == 1, "close() must release idle associations"


def test_concurrency_is_bounded_by_max_associations(
    scp_factory: Any, executor: ThreadPoolExecutor
) -> None:
    active = 0
    peak = 0
    lock = threading.Lock()

    def handler(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1
        yield 0xFF00, _match(1)
        yield 0x0000, None

    scp = scp_factory(handler)

    async def run() -> None:
        pool = _pool(_node(scp.port, max_associations=2), executor)
        results = await asyncio.gather(
            *(c_find(pool, _query(), QueryModel.STUDY_ROOT) for _ in range(10))
        )
        assert all(len(r.matches) == 1 for r in results)
        assert pool.state().opened_total == 2
        await pool.close()

    asyncio.run(run())
    assert peak <= 2
    assert scp.associations == 2


def test_waiting_too_long_for_an_association_is_pool_exhausted(
    scp_factory: Any, executor: ThreadPoolExecutor
) -> None:
    scp = scp_factory(_answers(1, delay=1.0))

    async def run() -> None:
        pool = _pool(_node(scp.port, max_associations=1, acquire_timeout=0.2), executor)
        slow = asyncio.ensure_future(c_find(pool, _query(), QueryModel.STUDY_ROOT))
        await asyncio.sleep(0.1)
        with pytest.raises(PoolExhausted) as info:
            await c_find(pool, _query(), QueryModel.STUDY_ROOT)
        assert "busy" in info.value.message
        assert len((await slow).matches) == 1
        await pool.close()

    asyncio.run(run())


def test_dead_idle_association_is_replaced_transparently(
    scp_factory: Any, executor: ThreadPoolExecutor
) -> None:
    scp = scp_factory(_answers(2))

    async def run() -> None:
        pool = _pool(_node(scp.port), executor)
        await c_find(pool, _query(), QueryModel.STUDY_ROOT)
        scp.abort_all()
        await asyncio.sleep(0.2)
        result = await c_find(pool, _query(), QueryModel.STUDY_ROOT)
        assert len(result.matches) == 2
        await _settle(pool)
        state = pool.state()
        assert state.opened_total == 2
        assert state.in_use == 0 and state.idle == 1
        await pool.close()

    asyncio.run(run())


def test_connection_refused_is_fast_and_unavailable(executor: ThreadPoolExecutor) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def run() -> None:
        pool = _pool(_node(port, connect_timeout=10.0), executor)
        started = time.monotonic()
        with pytest.raises(PacsUnavailable):
            await c_echo(pool)
        # A refusal is reported at once, not after the connect time-out.
        assert time.monotonic() - started < 5.0
        state = pool.state()
        assert state.in_use == 0 and state.failed_opens == 1
        assert state.last_error is not None
        await pool.close()

    asyncio.run(run())


def test_rejection_names_the_cause(scp_factory: Any, executor: ThreadPoolExecutor) -> None:
    scp = scp_factory(_answers(1))

    async def run() -> None:
        pool = _pool(_node(scp.port, ae_title="WRONGAE"), executor)
        with pytest.raises(AssociationRejected) as info:
            await c_echo(pool)
        assert "called AE title not recognized" in info.value.message
        await pool.close()

    asyncio.run(run())


@pytest.mark.parametrize("status", [0xC000, 0xA700, 0xA900])
def test_failure_status_is_reported_and_association_kept(
    status: int, scp_factory: Any, executor: ThreadPoolExecutor
) -> None:
    def handler(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        rsp = Dataset()
        rsp.Status = status
        rsp.ErrorComment = "no can do"
        yield rsp, None  # type: ignore[misc]

    scp = scp_factory(handler)

    async def run() -> None:
        pool = _pool(_node(scp.port), executor)
        for _ in range(2):
            with pytest.raises(PacsFailureStatus) as info:
                await c_find(pool, _query(), QueryModel.STUDY_ROOT)
            assert info.value.status == status
            assert info.value.comment == "no can do"
        await _settle(pool)
        assert pool.state().opened_total == 1
        await pool.close()

    asyncio.run(run())


def test_abort_mid_find_on_fresh_association(
    scp_factory: Any, executor: ThreadPoolExecutor
) -> None:
    def handler(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF00, _match(0)
        event.assoc.abort()
        yield 0xFF00, _match(1)

    scp = scp_factory(handler)

    async def run() -> None:
        pool = _pool(_node(scp.port), executor)
        with pytest.raises(AssociationAborted):
            await c_find(pool, _query(), QueryModel.STUDY_ROOT)
        await _settle(pool)
        state = pool.state()
        assert state.in_use == 0 and state.idle == 0
        await pool.close()

    asyncio.run(run())
    assert scp.associations == 1


def test_enough_matches_sends_c_cancel(scp_factory: Any, executor: ThreadPoolExecutor) -> None:
    scp = scp_factory(_answers(200, delay=0.005))

    async def run() -> None:
        pool = _pool(_node(scp.port), executor)
        result = await c_find(pool, _query(), QueryModel.STUDY_ROOT, max_matches=3)
        assert result.truncated
        assert len(result.matches) == 3
        # The association stays usable after the cancelled operation.
        again = await c_find(pool, _query(), QueryModel.STUDY_ROOT, max_matches=5)
        assert len(again.matches) == 5
        assert pool.state().opened_total == 1
        await pool.close()

    asyncio.run(run())
    assert scp.cancelled == 2


def test_caller_cancellation_cancels_the_find(
    scp_factory: Any, executor: ThreadPoolExecutor
) -> None:
    scp = scp_factory(_answers(500, delay=0.01))

    async def run() -> None:
        pool = _pool(_node(scp.port), executor)
        task = asyncio.ensure_future(c_find(pool, _query(), QueryModel.STUDY_ROOT))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _settle(pool)
        assert pool.state().in_use == 0
        result = await c_find(pool, _query(), QueryModel.STUDY_ROOT, max_matches=1)
        assert len(result.matches) == 1
        await pool.close()

    started = time.monotonic()
    asyncio.run(run())
    assert time.monotonic() - started < 4, "the PACS was drained instead of cancelled"
    assert scp.cancelled >= 1


def test_silent_pacs_is_a_timeout(scp_factory: Any, executor: ThreadPoolExecutor) -> None:
    def handler(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        time.sleep(2.0)
        yield 0x0000, None

    scp = scp_factory(handler)

    async def run() -> None:
        pool = _pool(_node(scp.port, dimse_timeout=0.5), executor)
        with pytest.raises(DimseTimeout):
            await c_find(pool, _query(), QueryModel.STUDY_ROOT)
        await _settle(pool)
        state = pool.state()
        assert state.in_use == 0 and state.idle == 0, "a timed-out association is never reused"
        await pool.close()

    asyncio.run(run())


def test_unresolvable_host_is_unavailable(executor: ThreadPoolExecutor) -> None:
    async def run() -> None:
        pool = _pool(_node(104, host="pacs.invalid"), executor)
        with pytest.raises(PacsUnavailable) as info:
            await c_echo(pool)
        assert "pacs.invalid" in info.value.message
        assert pool.state().in_use == 0
        await pool.close()

    asyncio.run(run())


def test_http_client_going_away_cancels_the_find(scp_factory: Any, tmp_path: Any) -> None:
    """The gateway must not drain a PACS for an answer nobody will read."""
    import httpx

    from app.config import Settings
    from tests.gateway_server import GatewayServer

    scp = scp_factory(_answers(2000, delay=0.005))
    settings = Settings(
        http_port=0, storage_port=0, work_dir=tmp_path, nodes=[_node(scp.port, default=True)]
    )
    with GatewayServer(settings) as gw:
        with pytest.raises(httpx.TimeoutException):
            httpx.get(f"{gw.dicomweb}/studies", timeout=0.5)
        deadline = time.monotonic() + 5
        while scp.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scp.cancelled == 1
        # The association survived the cancel and serves the next search.
        resp = httpx.get(f"{gw.dicomweb}/studies", params={"limit": "2"}, timeout=10)
        assert resp.status_code == 200
        assert len(resp.json()) == 2
        pool = httpx.get(f"{gw.url}/pacs", timeout=5).json()[0]["pool"]
        assert pool["in_use"] == 0
        assert pool["discarded_total"] == 0, "a cancelled C-FIND leaves the association usable"


def test_messages_larger_than_a_pdu_are_fragmented_both_ways(
    scp_factory: Any, executor: ThreadPoolExecutor
) -> None:
    """Our requestor cuts a request to the PACS's maximum PDU and reassembles
    answers the PACS cut to ours (PS3.8 §9.3.5, Annex D.1)."""
    asked = [f"1.2.826.0.1.3680043.10.1.{i}" for i in range(60)]  # ~1.7 KB identifier
    answered = [f"1.2.826.0.1.3680043.10.2.{i}" for i in range(300)]  # ~8.6 KB match
    seen: list[list[str]] = []

    def handler(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        seen.append(list(event.identifier.StudyInstanceUID))
        match = Dataset()
        match.QueryRetrieveLevel = "STUDY"
        match.StudyInstanceUID = answered
        yield 0xFF00, match
        yield 0x0000, None

    scp = scp_factory(handler)
    scp.ae.maximum_pdu_size = 1024
    received: list[int] = []
    scp.server.bind(
        evt.EVT_PDU_RECV,
        lambda event: received.append(event.pdu.pdu_length) if event.pdu.pdu_type == 4 else None,
    )

    async def run() -> None:
        pool = _pool(_node(scp.port, max_pdu=4096), executor)
        query = _query()
        query.StudyInstanceUID = asked
        result = await c_find(pool, query, QueryModel.STUDY_ROOT)
        assert seen == [asked]
        assert len(received) > 2 and max(received) <= 1024
        assert [list(m.StudyInstanceUID) for m in result.matches] == [answered]
        await pool.close()

    asyncio.run(run())


def test_idle_association_released_by_the_pacs_is_answered_and_dropped(
    scp_factory: Any, executor: ThreadPoolExecutor
) -> None:
    """A PACS may release an association it finds idle (PS3.8 §7.2): the pool
    answers A-RELEASE-RP, forgets it, and the next search opens a new one."""
    scp = scp_factory(_answers(2))

    async def run() -> None:
        pool = _pool(_node(scp.port, idle_timeout=2.0), executor)
        pool.start()
        await c_find(pool, _query(), QueryModel.STUDY_ROOT)
        await _settle(pool)
        (assoc,) = scp.server.active_associations
        releasing = threading.Thread(target=assoc.release)
        releasing.start()
        for _ in range(100):  # the reaper looks every 0.5 s
            if not releasing.is_alive() and pool.state().idle == 0:
                break
            await asyncio.sleep(0.05)
        releasing.join(5)
        assert assoc.is_released and not assoc.is_aborted
        assert pool.state().idle == 0
        result = await c_find(pool, _query(), QueryModel.STUDY_ROOT)
        assert len(result.matches) == 2
        assert pool.state().opened_total == 2
        await pool.close()

    asyncio.run(run())
