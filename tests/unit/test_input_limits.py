"""Input that cannot hurt: UIDs, parameters, limits, match-everything searches, request size.

Through the real HTTP app; the node points at a closed port, so a request that
passes every check ends as 503 PacsUnavailable.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from app.config import PacsNode, Settings
from app.dicomweb.attributes import Level
from app.dicomweb.query import apply_limits, parse_qido, valid_uid
from app.errors import InvalidRequest
from tests.gateway_server import GatewayServer


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    port = _closed_port()
    settings = Settings(
        http_port=0,
        storage_port=0,
        work_dir=tmp_path_factory.mktemp("gw"),
        nodes=[
            PacsNode(name="open", ae_title="OPEN", host="127.0.0.1", port=port, default=True),
            PacsNode(
                name="strict",
                ae_title="STRICT",
                host="127.0.0.1",
                port=port,
                refuse_unfiltered_searches=True,
                max_limit=50,
            ),
        ],
    )
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:
        yield c


@pytest.mark.parametrize(
    ("uid", "valid"),
    [
        ("1.2.840.10008.1.2.1", True),
        ("0.1.0", True),
        ("1", True),
        ("1." + "2" * 62, True),  # 64 characters
        ("1." + "2" * 63, False),  # 65
        ("1.02", False),  # leading zero
        ("01.2", False),
        ("1..2", False),
        (".1", False),
        ("1.", False),
        ("1.2.a", False),
        ("1.2 ", False),
        ("", False),
        ("1.2/../3", False),
        ("\uff11.\uff12", False),  # full-width digits are not DICOM digits
    ],
)
def test_uid_grammar(uid: str, valid: bool) -> None:
    assert valid_uid(uid) is valid


@pytest.mark.parametrize(
    ("path", "parameter"),
    [
        # Encoded slashes, backslashes, NULs and dot segments: refused before routing.
        ("/dicomweb/studies/..%2F..%2Fetc%2Fpasswd/series", "path"),
        ("/dicomweb/studies/..%2F..%2Fetc%2Fpasswd", "path"),
        ("/dicomweb/studies/1.2.3/series/..%2F1.2", "path"),
        ("/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5%00", "path"),
        ("/dicomweb/studies/1.2.3/series/1.2.4/instances/%2Fetc/metadata", "path"),
        ("/dicomweb/studies/1.2.3/series/%2e%2e/instances", "path"),
        ("/dicomweb/studies/1.2.3/series/1.2%5C..%5C..%5Cx", "path"),
        ("/dicomweb/patients/..%2f..%2fP1/studies", "path"),
        # Anything else that is not a UID is refused by the route, naming it.
        ("/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5..", "instance"),
        ("/dicomweb/studies/etc.passwd/metadata", "study"),
        ("/dicomweb/studies/1.2.3/series/1.02/nifti", "series"),
        ("/pacs/open/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5/frames/1", None),
    ],
)
def test_uids_in_paths_are_checked_before_anything_else(
    client: httpx.Client, path: str, parameter: str | None
) -> None:
    resp = client.get(path)
    if parameter is None:
        assert resp.status_code == 503  # valid: on to the (down) PACS
        return
    assert resp.status_code == 400, resp.text
    assert resp.json()["parameter"] == parameter


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("StudyInstanceUID=1.2.3,..%2F..%2Fx", "StudyInstanceUID"),
        ("SeriesInstanceUID=1.2.3%5C1.02", "SeriesInstanceUID"),
        ("0020000D=1.2.3.", "0020000D"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("offset=1e3", "offset"),
        ("fuzzymatching=maybe", "fuzzymatching"),
        ("StudyDate=20201301", "StudyDate"),
        ("StudyTime=250000", "StudyTime"),
        ("NoSuchAttribute=1", "NoSuchAttribute"),
        ("includefield=NoSuchAttribute", "includefield"),
        ("PatientName=A%5CB", "PatientName"),
        ("NumberOfStudyRelatedInstances=many", "NumberOfStudyRelatedInstances"),
    ],
)
def test_query_parameters_are_validated_by_name(
    client: httpx.Client, query: str, parameter: str
) -> None:
    resp = client.get(f"/dicomweb/studies?{query}")
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["parameter"] == parameter
    assert parameter in body["message"]


def test_nifti_flags_are_validated_by_name(client: httpx.Client) -> None:
    resp = client.get("/dicomweb/studies/1.2.3/series/1.2.4/nifti?compress=perhaps")
    assert resp.status_code == 400
    assert "compress" in resp.json()["message"]


@pytest.mark.parametrize("patient_id", ["A*", "A%3F", "A%0AB", "A%7F", "X" * 65, "%20"])
def test_patient_id_in_the_path_is_one_literal_value(client: httpx.Client, patient_id: str) -> None:
    resp = client.get(f"/dicomweb/patients/{patient_id}/studies")
    assert resp.status_code == 400, resp.text
    assert resp.json()["parameter"] == "patient_id"


def test_match_everything_is_refused_where_the_node_says_so(client: httpx.Client) -> None:
    for url in (
        "/pacs/strict/dicomweb/studies",
        "/pacs/strict/dicomweb/series?Modality=*",
        "/pacs/strict/dicomweb/instances?includefield=all",
        "/pacs/strict/dicomweb/patients?PatientName=**",
    ):
        resp = client.get(url)
        assert resp.status_code == 400, url
        assert "match everything" in resp.json()["message"]
    # A key with a value, or a UID in the path, is a real search: on to the PACS.
    for url in (
        "/pacs/strict/dicomweb/studies?PatientName=DOE*",
        "/pacs/strict/dicomweb/studies/1.2.3/series",
        "/pacs/strict/dicomweb/patients/P1/studies",
        "/pacs/open/dicomweb/studies",
    ):
        assert client.get(url).status_code == 503, url


def test_limit_is_cut_to_the_node_maximum() -> None:
    query = parse_qido(Level.STUDY, [("limit", "500")])
    apply_limits(query, max_limit=50, refuse_unfiltered=False)
    assert query.limit == 50
    assert query.limit_note is not None and "500" in query.limit_note
    query = parse_qido(Level.STUDY, [])
    apply_limits(query, max_limit=50, refuse_unfiltered=False)
    assert query.limit == 50
    assert query.limit_note is None  # nothing asked, nothing to explain
    query = parse_qido(Level.STUDY, [("limit", "10")])
    apply_limits(query, max_limit=50, refuse_unfiltered=False)
    assert query.limit == 10
    assert query.limit_note is None
    query = parse_qido(Level.STUDY, [("limit", "10")])
    apply_limits(query, max_limit=None, refuse_unfiltered=False)
    assert query.limit == 10


def test_unfiltered_detection() -> None:
    def refused(params: list[tuple[str, str]], **kw: object) -> bool:
        query = parse_qido(Level.STUDY, params, **kw)  # type: ignore[arg-type]
        try:
            apply_limits(query, max_limit=None, refuse_unfiltered=True)
        except InvalidRequest:
            return True
        return False

    assert refused([])
    assert refused([("PatientName", "*"), ("StudyDescription", "")])
    assert not refused([("PatientName", "D*")])
    assert not refused([("StudyDate", "20200101-")])
    assert not refused([], path_uids={0x0020000D: "1.2.3"})


def test_long_url_is_414(client: httpx.Client) -> None:
    resp = client.get("/dicomweb/studies?PatientName=" + "A" * 9000)
    assert resp.status_code == 414
    assert resp.json()["error"] == "RequestRefused"


def test_large_or_many_headers_are_431(client: httpx.Client) -> None:
    resp = client.get("/dicomweb/studies", headers={"X-Padding": "x" * 17000})
    assert resp.status_code == 431
    many = {f"X-H{i}": "1" for i in range(120)}
    assert client.get("/dicomweb/studies", headers=many).status_code == 431


def test_request_bodies_are_refused_but_for_small_posts(client: httpx.Client) -> None:
    resp = client.request("GET", "/dicomweb/studies", content=b"{}" * 10)
    assert resp.status_code == 413
    assert "take no body" in resp.json()["message"]
    assert client.request("DELETE", "/jobs/x", content=b"x").status_code == 413
    # POST (a job request) takes a small body with its length.
    big = {"study": "1.2.3", "padding": "x" * 20000}
    resp = client.post("/dicomweb/jobs", json=big)
    assert resp.status_code == 413
    assert "larger than 16384" in resp.json()["message"]

    def chunks() -> Iterator[bytes]:
        yield b'{"study": "1.2.3"}'

    assert client.post("/dicomweb/jobs", content=chunks()).status_code == 411
    # A small body passes the limits and meets the route's own checks.
    resp = client.post("/dicomweb/jobs", json={"study": "1.2.3", "padding": "x"})
    assert resp.status_code == 400
    # Without a body, an unsupported method is the usual 405.
    assert client.delete("/dicomweb/studies").status_code == 405


def test_transfer_syntax_in_accept_must_be_a_dicom_uid(client: httpx.Client) -> None:
    # Full-width digits pass str.isdigit() but are not the digits of PS3.5 §9.1.
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=\uff11.\uff12'
    resp = client.get("/dicomweb/studies/1.2.3/series/1.2.4", params={"accept": accept})
    assert resp.status_code == 406
    assert "is not a UID" in resp.json()["message"]
