"""One search and retrieve suite over four real PACS, each with the profile the
probe found on it (``tests/data/profiles``): Orthanc, DCMTK dcmqrscp,
pynetdicom's qrscp and CTN.

The truth comes from the files each PACS was loaded with.  CTN holds less (one
sample patient, the MR series of a second, and the dcm_qa_ts series with one
Explicit VR instance: see ``ctn_peer``), and its quirks get tests of their own
at the end: Implicit VR only on the Q/R contexts, and a C-MOVE that answers
Success while never sending the Explicit VR instance.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from app.demo import QrscpProcess
from app.runtime import Gateway
from tests.gateway_server import GatewayServer, gateway_settings, local_node, probed_profile
from tests.integration.conftest import CTN_EXPLICIT_TS_FILES
from tests.integration.test_retrieve_orthanc import parse_multipart, read_part
from tests.peers.ctn import CtnPeer
from tests.peers.dcmqrscp import DcmqrscpPeer
from tests.peers.orthanc import OrthancPeer

pytestmark = pytest.mark.integration

PACS = ["orthanc", "dcmqrscp", "qrscp", "ctn"]
STUDY, SERIES, SOP = "0020000D", "0020000E", "00080018"
ANY_SYNTAX = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


def _headers(paths: list[Path]) -> list[Dataset]:
    return [dcmread(p, stop_before_pixels=True, force=True) for p in paths]


@pytest.fixture(scope="module")
def truth(
    orthanc_peer: OrthancPeer,
    dcmqrscp_peer: DcmqrscpPeer,
    ctn_peer: CtnPeer,
    sample_files: list[Path],
) -> dict[str, list[Dataset]]:
    return {
        "orthanc": _headers(orthanc_peer.loaded_files),
        "dcmqrscp": _headers(dcmqrscp_peer.loaded_files),
        "qrscp": _headers(sample_files),
        "ctn": _headers(ctn_peer.loaded_files),
    }


@pytest.fixture(scope="module")
def paths(
    orthanc_peer: OrthancPeer,
    dcmqrscp_peer: DcmqrscpPeer,
    ctn_peer: CtnPeer,
    sample_files: list[Path],
) -> dict[str, dict[str, Path]]:
    """SOP Instance UID -> file, per PACS."""
    out = {
        name: {uid: info.path for uid, info in peer.loaded.items()}
        for name, peer in (
            ("orthanc", orthanc_peer),
            ("dcmqrscp", dcmqrscp_peer),
            ("ctn", ctn_peer),
        )
    }
    out["qrscp"] = {
        str(ds.SOPInstanceUID): p
        for p, ds in zip(sample_files, _headers(sample_files), strict=True)
    }
    return out


@pytest.fixture(scope="module")
def gateway(
    orthanc_peer: OrthancPeer,
    dcmqrscp_peer: DcmqrscpPeer,
    qrscp_peer: QrscpProcess,
    ctn_peer: CtnPeer,
    gateway_storage_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayServer]:
    """Each PACS twice: retrieving with C-MOVE (``name``) and with C-GET (``name-get``);
    ``ctn-default`` is CTN with the default profile, to show what the profile fixes."""
    addresses = {
        "orthanc": (orthanc_peer.aet, orthanc_peer.dicom_port),
        "dcmqrscp": (dcmqrscp_peer.aet, dcmqrscp_peer.dicom_port),
        "qrscp": (qrscp_peer.ae_title, qrscp_peer.port),
        "ctn": (ctn_peer.aet, ctn_peer.dicom_port),
    }
    nodes = []
    for name, (aet, port) in addresses.items():
        profile = probed_profile(name)
        nodes.append(local_node(name, aet, port, profile=profile))
        nodes.append(local_node(f"{name}-get", aet, port, profile=profile, retrieve="get"))
    nodes.append(local_node("ctn-default", ctn_peer.aet, ctn_peer.dicom_port, max_associations=1))
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw-interop"), *nodes, storage_port=gateway_storage_port
    )
    with GatewayServer(settings) as gw:
        yield gw


def runtime(gw: GatewayServer) -> Gateway:
    state: Gateway = gw.app.state.gateway
    return state


def search(gw: GatewayServer, pacs: str, path: str, **params: str) -> httpx.Response:
    url = f"{gw.url}/pacs/{pacs}/dicomweb{path}"
    if params:
        url += "?" + urlencode(params, safe="*,")
    return httpx.get(url, timeout=60)


def objects(resp: httpx.Response) -> list[dict[str, Any]]:
    if resp.status_code == 204:
        return []
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()
    return data


def uids(resp: httpx.Response, tag: str) -> set[str]:
    found = [o[tag]["Value"][0] for o in objects(resp)]
    assert len(found) == len(set(found)), f"duplicates in {tag}"
    return set(found)


def value(obj: dict[str, Any], tag: str) -> Any:
    return obj.get(tag, {}).get("Value", [None])[0]


def studies(headers: list[Dataset], pred: Any = lambda ds: True) -> set[str]:
    return {str(ds.StudyInstanceUID) for ds in headers if pred(ds)}


def a_series(headers: list[Dataset], patient: str, modality: str) -> tuple[str, str]:
    ds = next(d for d in headers if d.PatientID == patient and d.Modality == modality)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


# ---------------------------------------------------------------------------- search


@pytest.mark.parametrize("pacs", PACS)
class TestSearch:
    def test_studies(
        self, gateway: GatewayServer, truth: dict[str, list[Dataset]], pacs: str
    ) -> None:
        assert uids(search(gateway, pacs, "/studies"), STUDY) == studies(truth[pacs])

    def test_patient_name_ignores_case(
        self, gateway: GatewayServer, truth: dict[str, list[Dataset]], pacs: str
    ) -> None:
        """QIDO matches PN without regard to case; dcmqrscp and qrscp do not, so
        their profile makes the gateway send ``???*`` and match itself."""
        expected = studies(truth[pacs], lambda ds: ds.PatientID == "DGW0001")
        assert expected
        for pattern in ("doe*", "DOE^JOHN", "Doe^john"):
            assert uids(search(gateway, pacs, "/studies", PatientName=pattern), STUDY) == expected

    def test_study_counts_native_or_derived(
        self, gateway: GatewayServer, truth: dict[str, list[Dataset]], pacs: str
    ) -> None:
        resp = search(
            gateway,
            pacs,
            "/studies",
            PatientID="DGW0001",
            includefield="NumberOfStudyRelatedInstances",
        )
        objs = objects(resp)
        assert {value(o, STUDY) for o in objs} == studies(
            truth[pacs], lambda d: d.PatientID == "DGW0001"
        )
        for obj in objs:
            held = [d for d in truth[pacs] if d.StudyInstanceUID == value(obj, STUDY)]
            assert set(obj["00080061"]["Value"]) == {d.Modality for d in held}
            assert value(obj, "00201206") == len({d.SeriesInstanceUID for d in held})
            assert value(obj, "00201208") == len(held)

    def test_modalities_in_study_as_a_key(
        self, gateway: GatewayServer, truth: dict[str, list[Dataset]], pacs: str
    ) -> None:
        resp = search(gateway, pacs, "/studies", ModalitiesInStudy="MR", PatientID="DGW*")
        assert uids(resp, STUDY) == studies(
            truth[pacs], lambda d: d.Modality == "MR" and d.PatientID.startswith("DGW")
        )

    def test_series_with_instance_counts(
        self, gateway: GatewayServer, truth: dict[str, list[Dataset]], pacs: str
    ) -> None:
        study, _ = a_series(truth[pacs], "DGW0001", "CT")
        resp = search(
            gateway, pacs, f"/studies/{study}/series", includefield="NumberOfSeriesRelatedInstances"
        )
        held = [d for d in truth[pacs] if d.StudyInstanceUID == study]
        got = {value(o, SERIES): value(o, "00201209") for o in objects(resp)}
        assert got == {
            se: sum(1 for d in held if d.SeriesInstanceUID == se)
            for se in {str(d.SeriesInstanceUID) for d in held}
        }

    def test_series_count_as_a_key_with_a_limit(
        self, gateway: GatewayServer, truth: dict[str, list[Dataset]], pacs: str
    ) -> None:
        """A derived key is matched after the counts are known: no early stop
        on unfiltered answers."""
        resp = search(
            gateway,
            pacs,
            "/series",
            PatientID="DGW0001",
            NumberOfSeriesRelatedInstances="24",
            limit="1",
        )
        assert uids(resp, SERIES) == {
            str(d.SeriesInstanceUID)
            for d in truth[pacs]
            if d.PatientID == "DGW0001" and d.Modality == "MR"
        }

    def test_instances_of_a_series(
        self, gateway: GatewayServer, truth: dict[str, list[Dataset]], pacs: str
    ) -> None:
        study, series = a_series(truth[pacs], "DGW0002", "MR")
        got = uids(search(gateway, pacs, f"/studies/{study}/series/{series}/instances"), SOP)
        assert got == {str(d.SOPInstanceUID) for d in truth[pacs] if d.SeriesInstanceUID == series}

    def test_relational_series(
        self, gateway: GatewayServer, truth: dict[str, list[Dataset]], pacs: str
    ) -> None:
        resp = search(gateway, pacs, "/series", PatientID="DGW000*", Modality="MR")
        assert uids(resp, SERIES) == {
            str(d.SeriesInstanceUID)
            for d in truth[pacs]
            if d.Modality == "MR" and d.PatientID.startswith("DGW000")
        }

    def test_patients(self, gateway: GatewayServer, pacs: str) -> None:
        objs = objects(search(gateway, pacs, "/patients", PatientID="DGW0001"))
        assert [value(o, "00100020") for o in objs] == ["DGW0001"]
        # CTN keeps names upper-cased.
        assert value(objs[0], "00100010")["Alphabetic"].upper() == "DOE^JOHN"


def test_a_case_sensitive_pacs_without_its_profile_misses_names(
    tmp_path: Path, dcmqrscp_peer: DcmqrscpPeer, truth: dict[str, list[Dataset]]
) -> None:
    """Why the profile matters: with the default (trusting) profile, dcmqrscp's
    case-sensitive matching loses ``doe*``."""
    settings = gateway_settings(
        tmp_path, local_node("plain", dcmqrscp_peer.aet, dcmqrscp_peer.dicom_port)
    )
    with GatewayServer(settings) as gw:
        assert search(gw, "plain", "/studies", PatientName="doe*").status_code == 204
        assert uids(search(gw, "plain", "/studies", PatientName="Doe*"), STUDY) == studies(
            truth["dcmqrscp"], lambda ds: ds.PatientID == "DGW0001"
        )


# ---------------------------------------------------------------------------- retrieve


@pytest.mark.parametrize("method", ["move", "get"])
@pytest.mark.parametrize("pacs", PACS)
def test_series_retrieve_is_complete(
    gateway: GatewayServer,
    truth: dict[str, list[Dataset]],
    paths: dict[str, dict[str, Path]],
    pacs: str,
    method: str,
) -> None:
    """Every instance of a series (stored as Implicit VR on CTN), pixel for pixel."""
    node = pacs if method == "move" else f"{pacs}-get"
    study, series = a_series(truth[pacs], "DGW0002", "MR")
    url = f"{gateway.url}/pacs/{node}/dicomweb/studies/{study}/series/{series}"
    resp = httpx.get(url, headers=ANY_SYNTAX, timeout=120)
    assert resp.status_code == 200, resp.text
    parts = {str(read_part(p).SOPInstanceUID): read_part(p) for _, p in parse_multipart(resp)}
    expected = {str(d.SOPInstanceUID) for d in truth[pacs] if d.SeriesInstanceUID == series}
    assert set(parts) == expected
    for sop, ds in parts.items():
        original = dcmread(paths[pacs][sop])
        np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)
        assert ds.PatientID == original.PatientID
    meta = httpx.get(f"{url}/metadata", timeout=60)
    assert meta.status_code == 200 and "warning" not in meta.headers


# ---------------------------------------------------------------------------- CTN


def test_ctn_echo(gateway: GatewayServer) -> None:
    resp = httpx.get(f"{gateway.url}/pacs/ctn/echo", timeout=30)
    assert resp.status_code == 200, resp.text


def test_ctn_without_its_profile_fails_loudly(gateway: GatewayServer) -> None:
    """CTN accepts Explicit VR for C-FIND, misparses the identifier and aborts:
    with the default profile the search fails with a JSON error, not a wrong answer."""
    resp = search(gateway, "ctn-default", "/studies")
    assert resp.status_code >= 500
    assert resp.json()["error"] and "Traceback" not in resp.text


def test_ctn_skipped_instances_make_an_incomplete_retrieve(
    gateway: GatewayServer,
    ctn_peer: CtnPeer,
    testdata_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The dcm_qa_ts series: CTN lists three instances, sends the two stored as
    Implicit VR, counts the Explicit VR one as a warning and answers Success.
    The gateway must say the retrieve is incomplete, name the missing instance
    and not cache the series as complete."""
    explicit = dcmread(testdata_dir / "dcm_qa_ts" / "In" / CTN_EXPLICIT_TS_FILES[0])
    study, series = str(explicit.StudyInstanceUID), str(explicit.SeriesInstanceUID)
    held = {u for u, i in ctn_peer.loaded.items() if i.series_instance_uid == series}
    assert len(held) == 3 and str(explicit.SOPInstanceUID) in held
    url = f"{gateway.url}/pacs/ctn/dicomweb/studies/{study}/series/{series}"
    retriever = runtime(gateway).retriever
    caplog.set_level(logging.WARNING, logger="app.services.retrieve")

    resp = httpx.get(url, headers=ANY_SYNTAX, timeout=120)
    # The first instances are streamed before the move ends: the only honest
    # signal left is a body without its closing delimiter.
    assert resp.status_code in (200, 206)
    boundary = re.search(r'boundary="?([^";]+)"?', resp.headers["content-type"])
    assert boundary
    assert not resp.content.endswith(b"--" + boundary.group(1).encode() + b"--\r\n")
    assert resp.content.count(b"Content-Location") == 2
    assert str(explicit.SOPInstanceUID) in caplog.text

    started = retriever.moves_started
    meta = httpx.get(f"{url}/metadata", timeout=60)
    assert meta.status_code == 206, meta.text
    assert "1 of the 3 instances the PACS lists never arrived" in meta.headers["warning"]
    assert {o[SOP]["Value"][0] for o in meta.json()} == held - {str(explicit.SOPInstanceUID)}
    assert retriever.moves_started == started + 1, "an incomplete series was served from the cache"


def test_ctn_c_get_of_the_mixed_series_is_never_complete(
    gateway: GatewayServer, testdata_dir: Path
) -> None:
    """Over C-GET, CTN aborts the association when it reaches the Explicit VR
    instance (it cannot open its own Part 10 file for the sub-operation): the
    gateway reports the failure instead of a complete series."""
    explicit = dcmread(testdata_dir / "dcm_qa_ts" / "In" / CTN_EXPLICIT_TS_FILES[0])
    study, series = str(explicit.StudyInstanceUID), str(explicit.SeriesInstanceUID)
    url = f"{gateway.url}/pacs/ctn-get/dicomweb/studies/{study}/series/{series}"
    resp = httpx.get(url, headers=ANY_SYNTAX, timeout=120)
    if resp.status_code == 502:
        assert "aborted" in resp.json()["message"]
    else:
        boundary = re.search(r'boundary="?([^";]+)"?', resp.headers["content-type"])
        assert boundary
        assert not resp.content.endswith(b"--" + boundary.group(1).encode() + b"--\r\n")
    assert httpx.get(f"{url}/metadata", timeout=60).status_code in (206, 502)
