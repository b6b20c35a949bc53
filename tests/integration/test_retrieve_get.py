"""WADO-RS through the gateway over C-GET, and ``retrieve = "auto"`` falling back to C-MOVE.

Peers: Orthanc (C-GET allowed for the gateway's AE; and, as a second gateway
AE, registered with ``AllowGet: false``, which makes Orthanc abort the C-GET),
DCMTK dcmqrscp (supports C-GET, returns no SOP Class UID in C-FIND answers) and
an in-process pynetdicom Q/R SCP offering FIND and MOVE but no GET (it rejects
the C-GET presentation context).  Which DIMSE retrieve the gateway really ran
is counted by wrapping ``c_get``/``c_move`` where the retriever calls them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

import app.services.retrieve as retrieve_module
from app.dimse.get import MAX_CONTEXTS, STORED_SYNTAXES, storage_contexts
from app.runtime import Gateway
from app.sampledata import ct_series, sample_patients, write_datasets
from tests.gateway_server import (
    GATEWAY_AE,
    GatewayServer,
    free_port,
    gateway_settings,
    local_node,
)
from tests.integration.test_retrieve_orthanc import (
    dataset_bytes,
    dataset_bytes_of,
    parse_multipart,
    read_part,
)
from tests.peers.common import InstanceInfo
from tests.peers.dcmqrscp import DcmqrscpPeer
from tests.peers.orthanc import OrthancPeer

pytestmark = pytest.mark.integration

AS_STORED = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
NOGET_AE = "NOGETPACS"
NOGET_STUDY = "2.25.9118271"


# ---------------------------------------------------------------------------- a PACS without C-GET


class NoGetPacs:
    """A pynetdicom Study Root Q/R SCP with C-FIND and C-MOVE but no C-GET context.

    It holds the data sets it was given; C-FIND answers STUDY and IMAGE level
    (with SOP Class UID), C-MOVE sends to the destinations it knows.
    """

    def __init__(self, files: list[Path], destinations: dict[str, tuple[str, int]]) -> None:
        self.datasets: list[Dataset] = [dcmread(p) for p in files]
        self.destinations = destinations
        self.moves = 0
        ae = AE(ae_title=NOGET_AE)
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        # The C-MOVE sub-association proposes these.
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae = ae
        server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[(evt.EVT_C_FIND, self._find), (evt.EVT_C_MOVE, self._move)],
        )
        assert server is not None
        self.server = server
        self.port: int = server.server_address[1]

    def _matching(self, query: Dataset) -> list[Dataset]:
        out: list[Dataset] = []
        for ds in self.datasets:
            if any(
                query.get(key) and str(query.get(key)) != str(ds.get(key))
                for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
            ):
                continue
            out.append(ds)
        return out

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        level = str(query.QueryRetrieveLevel)
        seen: set[str] = set()
        for ds in self._matching(query):
            key = str(ds.StudyInstanceUID if level == "STUDY" else ds.SOPInstanceUID)
            if key in seen:
                continue
            seen.add(key)
            answer = Dataset()
            answer.QueryRetrieveLevel = level
            answer.StudyInstanceUID = ds.StudyInstanceUID
            if level == "IMAGE":
                answer.SeriesInstanceUID = ds.SeriesInstanceUID
                answer.SOPInstanceUID = ds.SOPInstanceUID
                answer.SOPClassUID = ds.SOPClassUID
            yield 0xFF00, answer
        yield 0x0000, None

    def _move(self, event: Any) -> Iterator[Any]:
        self.moves += 1
        destination = self.destinations.get(str(event.move_destination).strip())
        if destination is None:
            yield None, None
            return
        yield destination
        matches = self._matching(event.identifier)
        yield len(matches)
        for ds in matches:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, ds

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def noget_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small CT series of one study."""
    patient = sample_patients()["ascii"]
    datasets: list[Dataset] = []
    for number in (1, 2, 3):
        datasets += ct_series(
            patient=patient,
            study_uid=NOGET_STUDY,
            series_number=number,
            slices=4,
            rows=32,
            cols=32,
            seed="noget",
        )
    return write_datasets(datasets, tmp_path_factory.mktemp("noget"))


@pytest.fixture(scope="module")
def noget_pacs(noget_files: list[Path], gateway_storage_port: int) -> Iterator[NoGetPacs]:
    pacs = NoGetPacs(noget_files, {GATEWAY_AE: ("127.0.0.1", gateway_storage_port)})
    try:
        yield pacs
    finally:
        pacs.stop()


# ---------------------------------------------------------------------------- gateway


@pytest.fixture(scope="module")
def gateway(
    orthanc_peer: OrthancPeer,
    dcmqrscp_peer: DcmqrscpPeer,
    noget_pacs: NoGetPacs,
    gateway_storage_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw-retrieve-get"),
        local_node("orthanc", orthanc_peer.aet, orthanc_peer.dicom_port, retrieve="get"),
        local_node("dcmqrscp", dcmqrscp_peer.aet, dcmqrscp_peer.dicom_port, retrieve="auto"),
        local_node("noget", NOGET_AE, noget_pacs.port, retrieve="auto"),
        local_node("noget-strict", NOGET_AE, noget_pacs.port, retrieve="get"),
        storage_port=gateway_storage_port,  # the C-MOVE destination the peers know
    )
    with GatewayServer(settings) as gw:
        yield gw


def runtime(gw: GatewayServer) -> Gateway:
    state: Gateway = gw.app.state.gateway
    return state


class Calls:
    """C-GETs and C-MOVEs the retriever started, per node name."""

    def __init__(self) -> None:
        self.gets: Counter[str] = Counter()
        self.moves: Counter[str] = Counter()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    counted = Calls()
    real_get = getattr(retrieve_module, "c_get")  # noqa: B009 (not re-exported)
    real_move = getattr(retrieve_module, "c_move")  # noqa: B009

    async def c_get(pool: Any, *args: Any, **kwargs: Any) -> Any:
        counted.gets[pool.node.name] += 1
        return await real_get(pool, *args, **kwargs)

    async def c_move(pool: Any, *args: Any, **kwargs: Any) -> Any:
        counted.moves[pool.node.name] += 1
        return await real_move(pool, *args, **kwargs)

    monkeypatch.setattr(retrieve_module, "c_get", c_get)
    monkeypatch.setattr(retrieve_module, "c_move", c_move)
    return counted


def series_url(gw: GatewayServer, node: str, study: str, series: str) -> str:
    return f"{gw.url}/pacs/{node}/dicomweb/studies/{study}/series/{series}"


def series_of(loaded: dict[str, InstanceInfo], series: str) -> dict[str, InstanceInfo]:
    return {sop: i for sop, i in loaded.items() if i.series_instance_uid == series}


def check_as_stored(
    resp: httpx.Response,
    expected: dict[str, InstanceInfo],
    stored: Callable[[InstanceInfo], bytes] | None = None,
) -> None:
    """Every expected instance, in its stored transfer syntax, with the data set bytes
    of the file loaded into the PACS (or those *stored* returns: Orthanc rewrites
    some files on ingest, e.g. sequences of undefined length)."""
    assert resp.status_code == 200, resp.text
    parts = parse_multipart(resp)
    assert len(parts) == len(expected)
    for headers, payload in parts:
        info = expected[str(read_part(payload).SOPInstanceUID)]
        assert headers["Content-Type"] == (
            f"application/dicom; transfer-syntax={info.transfer_syntax_uid}"
        )
        reference = stored(info) if stored else dataset_bytes(info.path)
        assert dataset_bytes_of(payload) == reference, info.path


def orthanc_file(peer: OrthancPeer) -> Callable[[InstanceInfo], bytes]:
    """The data set bytes of the file Orthanc holds for an instance."""

    def stored(info: InstanceInfo) -> bytes:
        with peer.http() as client:
            found = client.post("/tools/lookup", content=info.sop_instance_uid).json()
            [instance] = [f for f in found if f["Type"] == "Instance"]
            return dataset_bytes_of(client.get(f"/instances/{instance['ID']}/file").content)

    return stored


# ---------------------------------------------------------------------------- C-GET


def test_contexts_fit_the_128_limit() -> None:
    one = storage_contexts([CTImageStorage])
    assert one == [(CTImageStorage, [ts]) for ts in STORED_SYNTAXES]
    many = storage_contexts([f"1.2.840.10008.5.1.4.1.1.{n}" for n in range(1, 60)])
    assert len(many) == MAX_CONTEXTS - 1
    # Every class keeps Explicit and Implicit VR Little Endian contexts of its own.
    assert all(
        (f"1.2.840.10008.5.1.4.1.1.{n}", [ExplicitVRLittleEndian]) in many for n in range(1, 60)
    )
    assert len(storage_contexts([f"1.2.3.{n}" for n in range(300)])) == MAX_CONTEXTS - 1


def test_get_series_in_nine_transfer_syntaxes_byte_identical_without_move(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, testdata_dir: Path, calls: Calls
) -> None:
    """The dcm_qa_ts series (RLE, JPEG Lossless, JPEG-LS, JPEG 2000, Big Endian and
    the rest) comes back over C-GET exactly as Orthanc holds it, then from the cache."""
    first = dcmread(testdata_dir / "dcm_qa_ts" / "In" / "1.dcm", stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    expected = series_of(orthanc_peer.loaded, series)
    syntaxes = {i.transfer_syntax_uid for i in expected.values()}
    assert {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"} <= syntaxes

    resp = httpx.get(series_url(gateway, "orthanc", study, series), headers=AS_STORED, timeout=60)
    check_as_stored(resp, expected)
    assert calls.gets["orthanc"] == 1
    assert calls.moves["orthanc"] == 0

    cached = runtime(gateway).cache.series(series)
    assert cached is not None
    assert {c.sop_uid for c in cached} == set(expected)
    again = httpx.get(series_url(gateway, "orthanc", study, series), headers=AS_STORED, timeout=60)
    check_as_stored(again, expected)
    assert calls.gets["orthanc"] == 1


def test_get_study_and_single_instance(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, calls: Calls
) -> None:
    """A study of several series and SOP classes; one instance of another study
    (IMAGE level, multi-frame Enhanced MR)."""
    loaded = orthanc_peer.loaded
    classes: dict[str, set[str]] = {}
    for info in loaded.values():
        classes.setdefault(info.study_instance_uid, set()).add(info.sop_class_uid)
    study = max(classes, key=lambda uid: len(classes[uid]))
    expected = {sop: i for sop, i in loaded.items() if i.study_instance_uid == study}
    assert len(classes[study]) > 1
    assert len({i.series_instance_uid for i in expected.values()}) > 1
    resp = httpx.get(f"{gateway.url}/pacs/orthanc/dicomweb/studies/{study}", timeout=120)
    assert resp.status_code == 200, resp.text
    got = {str(read_part(p).SOPInstanceUID) for _, p in parse_multipart(resp)}
    assert got == set(expected)

    enhanced = next(i for i in loaded.values() if "dcm_qa_enh" in str(i.path))
    resp = httpx.get(
        series_url(gateway, "orthanc", enhanced.study_instance_uid, enhanced.series_instance_uid)
        + f"/instances/{enhanced.sop_instance_uid}",
        headers=AS_STORED,
        timeout=60,
    )
    check_as_stored(resp, {enhanced.sop_instance_uid: enhanced}, orthanc_file(orthanc_peer))
    assert calls.moves["orthanc"] == 0
    assert calls.gets["orthanc"] >= 2


def test_auto_uses_get_on_dcmqrscp(
    gateway: GatewayServer, dcmqrscp_peer: DcmqrscpPeer, calls: Calls
) -> None:
    """dcmqrscp supports C-GET but names no SOP classes in its C-FIND answers: the
    gateway proposes its list of common storage classes instead."""
    loaded = dcmqrscp_peer.loaded
    # (The cache is shared by the nodes: a series no other test retrieves.)
    series = next(i.series_instance_uid for i in loaded.values() if i.patient_id == "DGW0004")
    assert runtime(gateway).cache.series(series) is None
    expected = series_of(loaded, series)
    study = next(iter(expected.values())).study_instance_uid
    resp = httpx.get(series_url(gateway, "dcmqrscp", study, series), headers=AS_STORED, timeout=60)
    check_as_stored(resp, expected)
    assert (calls.gets["dcmqrscp"], calls.moves["dcmqrscp"]) == (1, 0)
    assert runtime(gateway).cache.series(series) is not None


def _noget_series(files: list[Path]) -> list[tuple[str, dict[str, Path]]]:
    """(series UID, {SOP instance UID: file}) in series number order."""
    out: dict[tuple[int, str], dict[str, Path]] = {}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        key = (int(ds.SeriesNumber), str(ds.SeriesInstanceUID))
        out.setdefault(key, {})[str(ds.SOPInstanceUID)] = path
    return [(series, files) for (_, series), files in sorted(out.items())]


def test_auto_falls_back_to_move_when_get_is_not_offered(
    gateway: GatewayServer,
    noget_pacs: NoGetPacs,
    noget_files: list[Path],
    calls: Calls,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first retrieve tries C-GET, is refused (no C-GET context) and moves; the
    second goes straight to C-MOVE."""
    caplog.set_level(logging.INFO, logger="app.services.retrieve")
    for round_, (series, files) in enumerate(_noget_series(noget_files)[:2]):
        resp = httpx.get(series_url(gateway, "noget", NOGET_STUDY, series), timeout=60)
        assert resp.status_code == 200, resp.text
        parts = [read_part(p) for _, p in parse_multipart(resp)]
        assert {str(d.SOPInstanceUID) for d in parts} == set(files)
        for ds in parts:
            original = dcmread(files[str(ds.SOPInstanceUID)])
            np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)
        assert calls.gets["noget"] == 1, round_
        assert calls.moves["noget"] == round_ + 1
    assert noget_pacs.moves == 2
    assert "retrieving with C-MOVE from now on (C-GET refused" in caplog.text


def test_get_node_does_not_fall_back(
    gateway: GatewayServer, noget_files: list[Path], calls: Calls
) -> None:
    """``retrieve = "get"``: a PACS without C-GET is an error (0122H), not a C-MOVE."""
    series, _ = _noget_series(noget_files)[2]  # one no other test retrieves
    assert runtime(gateway).cache.series(series) is None
    resp = httpx.get(series_url(gateway, "noget-strict", NOGET_STUDY, series), timeout=60)
    assert resp.status_code == 502, resp.text
    body = resp.json()
    assert body["dimse_status"] == "0x0122"
    assert "C-GET" in body["message"]
    assert calls.moves["noget-strict"] == 0


# ---------------------------------------------------------------------------- Orthanc without C-GET


@pytest.fixture
def gateway_without_get(
    orthanc_peer: OrthancPeer, tmp_path: Path
) -> Iterator[tuple[GatewayServer, str]]:
    """A second gateway AE that Orthanc knows with ``AllowGet: false`` (Orthanc then
    aborts its C-GETs) but lets C-FIND and C-MOVE."""
    ae_title, storage_port, modality = "NOGETGW", free_port(), "nogetgw"
    with orthanc_peer.http() as client:
        client.put(
            f"/modalities/{modality}",
            json={"AET": ae_title, "Host": "127.0.0.1", "Port": storage_port, "AllowGet": False},
        ).raise_for_status()
    settings = gateway_settings(
        tmp_path / "gw",
        local_node("orthanc", orthanc_peer.aet, orthanc_peer.dicom_port, retrieve="auto"),
        storage_port=storage_port,
    ).model_copy(update={"ae_title": ae_title})
    try:
        with GatewayServer(settings) as gw:
            yield gw, ae_title
    finally:
        with orthanc_peer.http() as client:
            client.delete(f"/modalities/{modality}")


def test_auto_falls_back_to_move_when_orthanc_aborts_get(
    gateway_without_get: tuple[GatewayServer, str],
    orthanc_peer: OrthancPeer,
    calls: Calls,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Orthanc answers a C-GET it does not allow with an A-ABORT, which could also be
    a network failure: the gateway moves, and keeps moving once the C-MOVE worked."""
    caplog.set_level(logging.INFO, logger="app.services.retrieve")
    gw, _ = gateway_without_get
    loaded = orthanc_peer.loaded
    series_uids = sorted(
        {i.series_instance_uid for i in loaded.values() if i.patient_id == "DGW0003"}
    )
    assert len(series_uids) >= 2
    for round_, series in enumerate(series_uids[:2]):
        expected = series_of(loaded, series)
        study = next(iter(expected.values())).study_instance_uid
        resp = httpx.get(series_url(gw, "orthanc", study, series), headers=AS_STORED, timeout=60)
        check_as_stored(resp, expected, orthanc_file(orthanc_peer))
        # One C-GET (aborted by Orthanc), then C-MOVE only.
        assert calls.gets["orthanc"] == 1, round_
        assert calls.moves["orthanc"] == round_ + 1
    assert "C-GET delivered nothing" in caplog.text
    assert "retrieving with C-MOVE from now on" in caplog.text
