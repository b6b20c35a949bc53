"""The same QIDO searches through the gateway against three real PACS.

Orthanc, DCMTK dcmqrscp (strict: hierarchical only, no ModalitiesInStudy, answers
in each record's stored charset unless told otherwise) and pynetdicom's qrscp
(answers once per instance at every level, indexes 12 keys).  The expected
answer is computed from the files each PACS holds, read with pydicom, so the
test knows the truth independently of any PACS.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from app.demo import QrscpProcess
from tests.gateway_server import GatewayServer, gateway_settings, local_node
from tests.peers.dcmqrscp import DcmqrscpPeer
from tests.peers.orthanc import OrthancPeer

pytestmark = pytest.mark.integration

PACS = ["orthanc", "dcmqrscp", "qrscp"]
# Neither index keeps SeriesDescription: they neither match nor return it.
NO_SERIES_DESCRIPTION = {"dcmqrscp", "qrscp"}


@dataclass
class Truth:
    """What one PACS holds, from the files themselves."""

    headers: list[Dataset]

    def studies(self, pred: Any = lambda ds: True) -> set[str]:
        return {str(ds.StudyInstanceUID) for ds in self.headers if pred(ds)}

    def series(self, pred: Any = lambda ds: True) -> set[str]:
        return {str(ds.SeriesInstanceUID) for ds in self.headers if pred(ds)}

    def instances(self, pred: Any = lambda ds: True) -> set[str]:
        return {str(ds.SOPInstanceUID) for ds in self.headers if pred(ds)}


def _headers(paths: list[Path]) -> list[Dataset]:
    return [dcmread(p, stop_before_pixels=True, force=True) for p in paths]


@pytest.fixture(scope="module")
def truth(
    orthanc_peer: OrthancPeer, dcmqrscp_peer: DcmqrscpPeer, sample_files: list[Path]
) -> dict[str, Truth]:
    return {
        "orthanc": Truth(_headers([i.path for i in orthanc_peer.loaded.values()])),
        "dcmqrscp": Truth(_headers([i.path for i in dcmqrscp_peer.loaded.values()])),
        "qrscp": Truth(_headers(sample_files)),
    }


@pytest.fixture(scope="module")
def gateway(
    orthanc_peer: OrthancPeer,
    dcmqrscp_peer: DcmqrscpPeer,
    qrscp_peer: QrscpProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw"),
        local_node("orthanc", orthanc_peer.aet, orthanc_peer.dicom_port),
        local_node("dcmqrscp", dcmqrscp_peer.aet, dcmqrscp_peer.dicom_port),
        local_node("qrscp", qrscp_peer.ae_title, qrscp_peer.port),
    )
    with GatewayServer(settings) as gw:
        yield gw


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
    objs = objects(resp)
    found = [o[tag]["Value"][0] for o in objs]
    assert len(found) == len(set(found)), f"duplicates in {tag}"
    return set(found)


def value(obj: dict[str, Any], tag: str) -> Any:
    return obj.get(tag, {}).get("Value", [None])[0]


STUDY, SERIES, SOP = "0020000D", "0020000E", "00080018"


@pytest.mark.parametrize("pacs", PACS)
class TestSearchEveryPacs:
    def test_all_studies(self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str) -> None:
        assert uids(search(gateway, pacs, "/studies"), STUDY) == truth[pacs].studies()

    def test_study_by_patient_id(
        self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str
    ) -> None:
        got = uids(search(gateway, pacs, "/studies", PatientID="DGW0002"), STUDY)
        assert got == truth[pacs].studies(lambda ds: ds.PatientID == "DGW0002")
        assert len(got) == 2

    def test_study_by_name_wildcard(
        self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str
    ) -> None:
        got = uids(search(gateway, pacs, "/studies", PatientName="Doe*"), STUDY)
        assert got == truth[pacs].studies(lambda ds: str(ds.PatientName).startswith("Doe"))

    def test_study_by_date_range(
        self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str
    ) -> None:
        got = uids(search(gateway, pacs, "/studies", StudyDate="20200101-20221231"), STUDY)
        expected = truth[pacs].studies(lambda ds: "20200101" <= ds.StudyDate <= "20221231")
        assert got == expected and expected

    def test_modalities_in_study_matched_and_returned(
        self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str
    ) -> None:
        resp = search(gateway, pacs, "/studies", ModalitiesInStudy="CT", PatientID="DGW*")
        t = truth[pacs]
        ct_studies = t.studies(lambda ds: ds.Modality == "CT" and ds.PatientID.startswith("DGW"))
        assert uids(resp, STUDY) == ct_studies
        for obj in objects(resp):
            study = obj[STUDY]["Value"][0]
            modalities = {ds.Modality for ds in t.headers if ds.StudyInstanceUID == study}
            assert set(obj["00080061"]["Value"]) == modalities
            series = t.series(lambda ds, s=study: ds.StudyInstanceUID == s)
            assert value(obj, "00201206") == len(series)

    def test_code_lists_match_any_code(
        self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str
    ) -> None:
        """OHIF's two-modality filter: derived (dcmqrscp) or native (Orthanc)."""
        t = truth[pacs]
        got = uids(search(gateway, pacs, "/studies", ModalitiesInStudy="US,MR"), STUDY)
        assert got == t.studies(lambda ds: ds.Modality == "MR") != set()
        got = uids(search(gateway, pacs, "/series", Modality="CT\\PT"), SERIES)
        assert got == t.series(lambda ds: ds.Modality == "CT") != set()

    def test_series_of_each_study(
        self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str
    ) -> None:
        t = truth[pacs]
        for study in sorted(t.studies(lambda ds: ds.PatientID.startswith("DGW"))):
            resp = search(gateway, pacs, f"/studies/{study}/series")
            objs = objects(resp)
            expected = t.series(lambda ds, s=study: ds.StudyInstanceUID == s)
            assert {o[SERIES]["Value"][0] for o in objs} == expected
            for obj in objs:
                ref = next(
                    ds for ds in t.headers if ds.SeriesInstanceUID == obj[SERIES]["Value"][0]
                )
                assert value(obj, "00080060") == ref.Modality
                assert value(obj, "00200011") == int(ref.SeriesNumber)
                assert value(obj, STUDY) == study

    def test_instances_of_a_series(
        self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str
    ) -> None:
        t = truth[pacs]
        ref = next(ds for ds in t.headers if ds.PatientID == "DGW0003")
        path = f"/studies/{ref.StudyInstanceUID}/series/{ref.SeriesInstanceUID}/instances"
        got = uids(search(gateway, pacs, path), SOP)
        assert got == t.instances(lambda ds: ds.SeriesInstanceUID == ref.SeriesInstanceUID)

    def test_relational_series_search(
        self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str
    ) -> None:
        resp = search(gateway, pacs, "/series", PatientID="DGW0002", Modality="MR")
        expected = truth[pacs].series(lambda ds: ds.PatientID == "DGW0002" and ds.Modality == "MR")
        assert uids(resp, SERIES) == expected and len(expected) == 2
        for obj in objects(resp):
            # /series adds the study's attributes (PS3.18 §10.6.3.3.2).
            assert value(obj, "00100020") == "DGW0002"

    def test_founding_use_case_series_by_patient_date_description(
        self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str
    ) -> None:
        resp = search(
            gateway,
            pacs,
            "/series",
            PatientID="DGW0003",
            StudyDate="20220110",
            SeriesDescription="T2 TSE oblique",
        )
        expected = truth[pacs].series(
            lambda ds: ds.PatientID == "DGW0003" and ds.SeriesDescription == "T2 TSE oblique"
        )
        assert len(expected) == 1
        if pacs in NO_SERIES_DESCRIPTION:
            # The gateway cannot narrow the answer without the value, and says so.
            assert "did not return SeriesDescription" in resp.headers["warning"]
            assert uids(resp, SERIES) == truth[pacs].series(lambda ds: ds.PatientID == "DGW0003")
        else:
            assert uids(resp, SERIES) == expected
            assert "warning" not in resp.headers

    def test_relational_instances_of_a_study(
        self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str
    ) -> None:
        t = truth[pacs]
        ref = next(ds for ds in t.headers if ds.PatientID == "DGW0002" and ds.Modality == "MR")
        resp = search(gateway, pacs, f"/studies/{ref.StudyInstanceUID}/instances")
        assert uids(resp, SOP) == t.instances(
            lambda ds: ds.StudyInstanceUID == ref.StudyInstanceUID
        )

    def test_series_key_in_a_study_search_is_matched_by_the_gateway(
        self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str
    ) -> None:
        resp = search(gateway, pacs, "/studies", PatientID="DGW*", SeriesDescription="t2*")
        expected = truth[pacs].studies(
            lambda ds: ds.PatientID.startswith("DGW") and ds.SeriesDescription.startswith("t2")
        )
        assert expected
        if pacs in NO_SERIES_DESCRIPTION:
            assert "did not return SeriesDescription" in resp.headers["warning"]
            assert uids(resp, STUDY) >= expected
        else:
            assert uids(resp, STUDY) == expected

    def test_patients(self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str) -> None:
        resp = search(gateway, pacs, "/patients", PatientID="DGW*")
        names = {value(o, "00100020"): value(o, "00100010") for o in objects(resp)}
        assert names == {
            "DGW0001": {"Alphabetic": "Doe^John"},
            "DGW0002": {"Alphabetic": "Müller^Jürgen"},
            "DGW0003": {"Alphabetic": "Łukasiewicz^Zofia^Maria"},
            "DGW0004": {
                "Alphabetic": "Yamada^Tarou",
                "Ideographic": "山田^太郎",
                "Phonetic": "やまだ^たろう",
            },
        }

    def test_studies_of_a_patient(
        self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str
    ) -> None:
        got = uids(search(gateway, pacs, "/patients/DGW0001/studies"), STUDY)
        assert got == truth[pacs].studies(lambda ds: ds.PatientID == "DGW0001")

    def test_paging_covers_everything_once(
        self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str
    ) -> None:
        seen: list[str] = []
        offset = 0
        while True:
            resp = search(gateway, pacs, "/studies", limit="2", offset=str(offset))
            page = [o[STUDY]["Value"][0] for o in objects(resp)]
            if not page:
                break
            seen += page
            offset += 2
        assert len(seen) == len(set(seen))
        assert set(seen) == truth[pacs].studies()

    def test_fuzzy_name_matching_by_the_gateway(
        self, gateway: GatewayServer, truth: dict[str, Truth], pacs: str
    ) -> None:
        literal = search(gateway, pacs, "/studies", PatientName="muller")
        assert literal.status_code == 204
        fuzzy = search(gateway, pacs, "/studies", PatientName="muller", fuzzymatching="true")
        assert uids(fuzzy, STUDY) == truth[pacs].studies(lambda ds: ds.PatientID == "DGW0002")
        jap = search(gateway, pacs, "/studies", PatientName="やまだ", fuzzymatching="true")
        assert uids(jap, STUDY) == truth[pacs].studies(lambda ds: ds.PatientID == "DGW0004")

    def test_no_match_is_204(self, gateway: GatewayServer, pacs: str) -> None:
        resp = search(gateway, pacs, "/studies", PatientID="NOBODY")
        assert resp.status_code == 204


@pytest.fixture(scope="module")
def patient_root_gateway(
    dcmqrscp_peer: DcmqrscpPeer,
    qrscp_peer: QrscpProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayServer]:
    """Nodes configured for the Patient Root model only, as some PACS require."""
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw-patient-root"),
        local_node("dcmqrscp", dcmqrscp_peer.aet, dcmqrscp_peer.dicom_port, query_model="patient"),
        local_node("qrscp", qrscp_peer.ae_title, qrscp_peer.port, query_model="patient"),
    )
    with GatewayServer(settings) as gw:
        yield gw


@pytest.mark.parametrize("pacs", ["dcmqrscp", "qrscp"])
def test_patient_root_model_walks_patients_first(
    patient_root_gateway: GatewayServer, truth: dict[str, Truth], pacs: str
) -> None:
    """Patient Root needs one PatientID in every STUDY query (PS3.4 C.6.1.1.3):
    a study search without it goes through the patients."""
    t = truth[pacs]
    assert uids(search(patient_root_gateway, pacs, "/studies"), STUDY) == t.studies()
    got = uids(
        search(patient_root_gateway, pacs, "/series", Modality="MR", PatientID="DGW*"), SERIES
    )
    assert got == t.series(lambda ds: ds.Modality == "MR" and ds.PatientID.startswith("DGW"))
    resp = search(patient_root_gateway, pacs, "/studies", StudyDate="20200602")
    assert uids(resp, STUDY) == t.studies(lambda ds: ds.StudyDate == "20200602")
