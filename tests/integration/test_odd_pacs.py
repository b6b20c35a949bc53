"""What an HTTP client sees when the PACS answers oddly, for C-FIND, C-MOVE and C-GET.

Each DIMSE status of interest (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4), an abort
mid-C-FIND, silence, and association rejections (permanent and transient,
PS3.8 Table 9-21) must become the HTTP status of ``app/api/errors.py`` and
``docs/conformance.md`` with a JSON message a person can act on, and leave the
pool with nothing in use and no association the PACS still holds open beyond
the pool's idle ones.

No real PACS answers 0xA700 or rejects associations on demand: the PACS here is
an in-process pynetdicom Q/R SCP (FIND, MOVE and GET) whose answers each test
scripts.  One gateway serves the whole module, with two nodes on that SCP: one
retrieving with C-MOVE, one with C-GET.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from app.sampledata import ct_series, sample_patients
from tests.gateway_server import GatewayServer, free_port, gateway_settings, local_node

pytestmark = pytest.mark.integration

PACS_AE = "ODDPACS"
STUDY = "2.25.555000444"
MOVE_NODE = "oddmove"
GET_NODE = "oddget"
DIMSE_TIMEOUT = 1.5


@dataclass
class Script:
    """How the PACS answers the next operations."""

    # C-FIND: the final status after the matches (int, or a Status data set).
    find_final: Any = 0x0000
    find_abort: bool = False
    find_delay: float = 0.0
    # C-MOVE / C-GET: instances sent before ``retrieve_final`` (None: pynetdicom's own end).
    deliver: int = 3
    retrieve_final: Any = None
    retrieve_delay: float = 0.0


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment
    return ds


class OddPacs:
    """A Study Root Q/R SCP holding one 3-instance CT series, answering as scripted."""

    def __init__(self, storage_port: int) -> None:
        self.storage_port = storage_port
        self.script = Script()
        patient = sample_patients()["ascii"]
        self.datasets = list(
            ct_series(patient=patient, study_uid=STUDY, series_number=1, slices=3, rows=16, cols=16)
        )
        ae = AE(ae_title=PACS_AE)
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        # C-GET: the gateway proposes storage contexts in which it takes the SCP role.
        ae.add_supported_context(
            CTImageStorage, ALL_TRANSFER_SYNTAXES, scp_role=True, scu_role=False
        )
        # C-MOVE: the sub-association to the gateway's storage SCP.
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        self.ae = ae
        server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[
                (evt.EVT_C_FIND, self._find),
                (evt.EVT_C_MOVE, self._move),
                (evt.EVT_C_GET, self._get),
            ],
        )
        assert server is not None
        self.server = server
        self.port: int = server.server_address[1]

    @property
    def series(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    def open_associations(self) -> int:
        """Associations the PACS side still holds (what a real PACS would count)."""
        return sum(1 for a in self.server.active_associations if a.is_established)

    def _answer(self, level: str) -> Iterator[Dataset]:
        if level == "STUDY":
            ds = Dataset()
            ds.QueryRetrieveLevel = level
            ds.StudyInstanceUID = STUDY
            ds.SOPClassesInStudy = CTImageStorage
            yield ds
        elif level == "SERIES":
            ds = Dataset()
            ds.QueryRetrieveLevel = level
            ds.StudyInstanceUID = STUDY
            ds.SeriesInstanceUID = self.series
            ds.Modality = "CT"
            yield ds
        else:
            for inst in self.datasets:
                ds = Dataset()
                ds.QueryRetrieveLevel = level
                ds.StudyInstanceUID = STUDY
                ds.SeriesInstanceUID = self.series
                ds.SOPInstanceUID = inst.SOPInstanceUID
                ds.SOPClassUID = inst.SOPClassUID
                yield ds

    def _find(self, event: Any) -> Iterator[tuple[Any, Dataset | None]]:
        script = self.script
        if script.find_delay:
            time.sleep(script.find_delay)
        for ds in self._answer(str(event.identifier.QueryRetrieveLevel)):
            yield 0xFF00, ds
            if script.find_abort:
                event.assoc.abort()
                return
        yield script.find_final, None

    def _retrieve(self, event: Any) -> Iterator[Any]:
        script = self.script
        if script.retrieve_delay:
            time.sleep(script.retrieve_delay)
        yield len(self.datasets)
        for ds in self.datasets[: script.deliver]:
            yield 0xFF00, ds
        if script.retrieve_final is None:
            return
        if script.deliver < len(self.datasets):
            yield script.retrieve_final, None
            return
        # With every sub-operation done pynetdicom ends with its own status;
        # a PACS that counts a warning (CTN does) says B000: rewrite it.
        dimse = event.assoc.dimse
        send = dimse.send_msg

        def final_as_scripted(primitive: Any, context_id: int) -> None:
            if getattr(primitive, "Status", None) == 0x0000:
                primitive.Status = script.retrieve_final
                dimse.send_msg = send
            send(primitive, context_id)

        dimse.send_msg = final_as_scripted

    def _move(self, event: Any) -> Iterator[Any]:
        if self.script.retrieve_delay:
            time.sleep(self.script.retrieve_delay)
        yield ("127.0.0.1", self.storage_port)
        yield from self._retrieve(event)

    def _get(self, event: Any) -> Iterator[Any]:
        yield from self._retrieve(event)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OddPacs, GatewayServer]]:
    storage_port = free_port()
    pacs = OddPacs(storage_port)
    options: dict[str, Any] = {
        "dimse_timeout": DIMSE_TIMEOUT,
        "idle_timeout": 1.0,
        "acquire_timeout": 5.0,
    }
    settings = gateway_settings(
        tmp_path_factory.mktemp("odd"),
        local_node(MOVE_NODE, PACS_AE, pacs.port, default=True, retrieve="move", **options),
        local_node(GET_NODE, PACS_AE, pacs.port, retrieve="get", **options),
        storage_port=storage_port,
    )
    try:
        with GatewayServer(settings) as gw:
            yield pacs, gw
    finally:
        pacs.stop()


@pytest.fixture
def pacs(odd: tuple[OddPacs, GatewayServer]) -> Iterator[OddPacs]:
    odd[0].script = Script()
    yield odd[0]
    odd[0].script = Script()


@pytest.fixture
def gw(odd: tuple[OddPacs, GatewayServer]) -> GatewayServer:
    return odd[1]


def _pools(gw: GatewayServer) -> dict[str, dict[str, Any]]:
    return {n["name"]: n["pool"] for n in httpx.get(f"{gw.url}/pacs", timeout=5).json()}


def _assert_no_leak(pacs: OddPacs, gw: GatewayServer) -> None:
    """Nothing in use; the PACS holds no association beyond the pools' idle ones."""
    deadline = time.monotonic() + 10
    while True:
        pools = _pools(gw)
        in_use = sum(p["in_use"] for p in pools.values())
        idle = sum(p["idle"] for p in pools.values())
        held = pacs.open_associations()
        if in_use == 0 and held <= idle:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"pools {pools}, PACS holds {held} associations")
        time.sleep(0.05)


def _base(gw: GatewayServer, node: str) -> str:
    return f"{gw.url}/pacs/{node}/dicomweb"


def _fresh_cache(gw: GatewayServer, pacs: OddPacs) -> None:
    """Forget the series, so that the next retrieve asks the PACS again."""
    cache = gw.app.state.gateway.cache
    for ds in pacs.datasets:
        sop = str(ds.SOPInstanceUID)
        cache.path_for(STUDY, pacs.series, sop).unlink(missing_ok=True)
        cache._forget(sop)


def _json_error(resp: httpx.Response) -> dict[str, Any]:
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    body: dict[str, Any] = resp.json()
    assert body["message"] and "Traceback" not in resp.text
    return body


# ------------------------------------------------------------------- C-FIND


@pytest.mark.parametrize(
    ("code", "http", "meaning"),
    [
        (0xA700, 503, "out of resources"),
        (0xA900, 502, "identifier does not match SOP class"),
        (0xC000, 502, "unable to process"),
        (0xFE00, 502, "Cancelled"),
    ],
    ids=["A700", "A900", "C000", "FE00"],
)
def test_c_find_failure_status(
    pacs: OddPacs, gw: GatewayServer, code: int, http: int, meaning: str
) -> None:
    pacs.script = Script(find_final=_status(code, "scripted trouble"))
    resp = httpx.get(f"{_base(gw, MOVE_NODE)}/studies/{STUDY}/series", timeout=10)
    assert resp.status_code == http
    body = _json_error(resp)
    assert body["error"] == "PacsFailureStatus"
    assert body["dimse_status"] == f"0x{code:04X}"
    assert meaning.lower() in body["dimse_meaning"].lower()
    assert "C-FIND" in body["message"] and MOVE_NODE in body["message"]
    assert body.get("error_comment") == "scripted trouble"
    if http == 503:
        assert resp.headers["retry-after"]
    _assert_no_leak(pacs, gw)


@pytest.mark.parametrize("code", [0xB000, 0xB007], ids=["B000", "B007"])
def test_c_find_warning_status_is_200_with_a_warning(
    pacs: OddPacs, gw: GatewayServer, code: int
) -> None:
    pacs.script = Script(find_final=code)
    resp = httpx.get(f"{_base(gw, MOVE_NODE)}/studies/{STUDY}/series", timeout=10)
    assert resp.status_code == 200
    assert [obj["0020000E"]["Value"][0] for obj in resp.json()] == [pacs.series]
    warning = resp.headers.get("warning", "")
    assert warning.startswith("299 dimse-gateway:")
    assert f"0x{code:04X}" in warning
    _assert_no_leak(pacs, gw)


def test_abort_mid_c_find_is_502(pacs: OddPacs, gw: GatewayServer) -> None:
    pacs.script = Script(find_abort=True)
    started = time.monotonic()
    resp = httpx.get(f"{_base(gw, MOVE_NODE)}/studies/{STUDY}/series", timeout=10)
    assert resp.status_code == 502
    assert time.monotonic() - started < 5
    body = _json_error(resp)
    assert body["error"] == "AssociationAborted"
    assert "aborted" in body["message"]
    _assert_no_leak(pacs, gw)
    # The next search works on a new association.
    pacs.script = Script()
    assert httpx.get(f"{_base(gw, MOVE_NODE)}/studies/{STUDY}/series", timeout=10).is_success


def test_slow_c_find_is_504_and_the_association_is_not_reused(
    pacs: OddPacs, gw: GatewayServer
) -> None:
    before = _pools(gw)[MOVE_NODE]
    pacs.script = Script(find_delay=DIMSE_TIMEOUT + 2)
    started = time.monotonic()
    resp = httpx.get(f"{_base(gw, MOVE_NODE)}/studies/{STUDY}/series", timeout=15)
    elapsed = time.monotonic() - started
    assert resp.status_code == 504
    assert elapsed < DIMSE_TIMEOUT + 1.5, f"answered after {elapsed:.1f} s"
    body = _json_error(resp)
    assert body["error"] == "DimseTimeout"
    assert f"{DIMSE_TIMEOUT:g} s" in body["message"]
    after = _pools(gw)[MOVE_NODE]
    assert after["discarded_total"] > before["discarded_total"]
    _assert_no_leak(pacs, gw)


# ------------------------------------------------------------------- association rejection


def _wait_pool_empty(pacs: OddPacs, gw: GatewayServer) -> None:
    deadline = time.monotonic() + 10
    while _pools(gw)[MOVE_NODE]["idle"] or pacs.open_associations():
        assert time.monotonic() < deadline, "idle associations did not expire"
        time.sleep(0.1)


def test_permanent_rejection_is_502_naming_the_cause(pacs: OddPacs, gw: GatewayServer) -> None:
    _wait_pool_empty(pacs, gw)
    pacs.ae.require_calling_aet = ["SOMEONEELSE"]
    try:
        started = time.monotonic()
        resp = httpx.get(f"{_base(gw, MOVE_NODE)}/studies/{STUDY}/series", timeout=10)
    finally:
        pacs.ae.require_calling_aet = []
    assert resp.status_code == 502
    assert time.monotonic() - started < 3
    body = _json_error(resp)
    assert body["error"] == "AssociationRejected"
    assert "calling AE title not recognized" in body["message"]
    assert "DIMSEGW" in body["message"]
    _assert_no_leak(pacs, gw)


@pytest.mark.parametrize("resource", ["series", "retrieve"])
def test_transient_rejection_is_503_with_retry_after(
    pacs: OddPacs, gw: GatewayServer, resource: str
) -> None:
    _wait_pool_empty(pacs, gw)
    _fresh_cache(gw, pacs)
    # The PACS is at its association limit: someone else holds its only slot.
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate("127.0.0.1", pacs.port, ae_title=PACS_AE)
    assert held.is_established
    pacs.ae.maximum_associations = 1
    try:
        url = f"{_base(gw, MOVE_NODE)}/studies/{STUDY}/series"
        if resource == "retrieve":
            url += f"/{pacs.series}"
        resp = httpx.get(url, timeout=10)
    finally:
        pacs.ae.maximum_associations = 10
        held.release()
    assert resp.status_code == 503
    assert resp.headers["retry-after"]
    body = _json_error(resp)
    assert body["error"] == "AssociationRejected"
    assert "local limit exceeded" in body["message"] and "try again later" in body["message"]
    _assert_no_leak(pacs, gw)
    # The PACS has room again: the same request succeeds.
    assert httpx.get(url, timeout=10).status_code == 200


# ------------------------------------------------------------------- C-MOVE and C-GET


@pytest.mark.parametrize("node", [MOVE_NODE, GET_NODE])
@pytest.mark.parametrize(
    ("code", "http"),
    [(0xA700, 503), (0xA702, 503), (0xA900, 502), (0xC000, 502), (0xFE00, 502)],
    ids=["A700", "A702", "A900", "C000", "FE00"],
)
def test_retrieve_refused_before_any_instance(
    pacs: OddPacs, gw: GatewayServer, node: str, code: int, http: int
) -> None:
    _fresh_cache(gw, pacs)
    pacs.script = Script(deliver=0, retrieve_final=_status(code, "scripted refusal"))
    resp = httpx.get(f"{_base(gw, node)}/studies/{STUDY}/series/{pacs.series}", timeout=10)
    assert resp.status_code == http
    body = _json_error(resp)
    operation = "C-MOVE" if node == MOVE_NODE else "C-GET"
    assert body["error"] == "PacsFailureStatus"
    assert body["dimse_status"] == f"0x{code:04X}"
    assert operation in body["message"] and "scripted refusal" in body["message"]
    if http == 503:
        assert resp.headers["retry-after"]
    _assert_no_leak(pacs, gw)


@pytest.mark.parametrize("node", [MOVE_NODE, GET_NODE])
def test_retrieve_that_delivered_nothing_with_a_warning_is_502_not_404(
    pacs: OddPacs, gw: GatewayServer, node: str
) -> None:
    """B000 with every sub-operation failed: the PACS has the series but did not send it."""
    _fresh_cache(gw, pacs)
    pacs.script = Script(deliver=0, retrieve_final=0xB000)
    resp = httpx.get(f"{_base(gw, node)}/studies/{STUDY}/series/{pacs.series}", timeout=10)
    assert resp.status_code == 502
    body = _json_error(resp)
    assert body["error"] == "RetrieveIncomplete"
    assert "0xB000" in body["message"] and "3 failed" in body["message"]
    _assert_no_leak(pacs, gw)


@pytest.mark.parametrize("node", [MOVE_NODE, GET_NODE])
def test_warning_after_every_instance_is_200_with_a_warning(
    pacs: OddPacs, gw: GatewayServer, node: str
) -> None:
    _fresh_cache(gw, pacs)
    pacs.script = Script(deliver=3, retrieve_final=0xB000)
    url = f"{_base(gw, node)}/studies/{STUDY}/series/{pacs.series}"
    resp = httpx.get(f"{url}/metadata", timeout=10)
    assert resp.status_code == 200
    assert len(resp.json()) == 3
    warning = resp.headers["warning"]
    assert "0xB000" in warning and "all 3 instances" in warning
    _assert_no_leak(pacs, gw)
    # Not remembered as complete: the PACS did not say Success.
    assert gw.app.state.gateway.cache.series(pacs.series) is None


@pytest.mark.parametrize("node", [MOVE_NODE, GET_NODE])
def test_warning_with_failed_sub_operations_is_206(
    pacs: OddPacs, gw: GatewayServer, node: str
) -> None:
    _fresh_cache(gw, pacs)
    pacs.script = Script(deliver=2, retrieve_final=0xB000)
    url = f"{_base(gw, node)}/studies/{STUDY}/series/{pacs.series}"
    resp = httpx.get(f"{url}/metadata", timeout=10)
    assert resp.status_code == 206
    assert len(resp.json()) == 2
    assert "1 failed" in resp.headers["warning"]
    _assert_no_leak(pacs, gw)


def test_slow_c_move_is_504(pacs: OddPacs, gw: GatewayServer) -> None:
    _fresh_cache(gw, pacs)
    pacs.script = Script(retrieve_delay=DIMSE_TIMEOUT + 2)
    started = time.monotonic()
    resp = httpx.get(f"{_base(gw, MOVE_NODE)}/studies/{STUDY}/series/{pacs.series}", timeout=15)
    assert resp.status_code == 504
    assert time.monotonic() - started < DIMSE_TIMEOUT + 1.5
    assert _json_error(resp)["error"] == "DimseTimeout"
    _assert_no_leak(pacs, gw)


def test_pacs_not_listening_is_a_fast_503(gw: GatewayServer, tmp_path: Path) -> None:
    """The node's port refuses connections: 503 at once, for search and retrieve."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = gateway_settings(tmp_path, local_node("gone", PACS_AE, port, default=True))
    with GatewayServer(settings) as down:
        for path in (f"/studies/{STUDY}/series", f"/studies/{STUDY}/series/1.2.3"):
            started = time.monotonic()
            resp = httpx.get(f"{down.dicomweb}{path}", timeout=10)
            assert resp.status_code == 503, path
            assert time.monotonic() - started < 1.0
            assert resp.headers["retry-after"]
            assert _json_error(resp)["error"] == "PacsUnavailable"
