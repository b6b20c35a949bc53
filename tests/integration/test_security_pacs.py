"""Who may use which node, search limits and the audit log, against a real PACS.

pynetdicom's qrscp (the demo PACS, holding the sample studies) is configured
as three nodes: ``qa`` and ``qb`` (the same PACS under two names, so that
access can differ while the data is the same) and ``strict`` (refuses
match-everything searches, cuts ``limit`` to 2).  Access is by API key and by
OIDC bearer token verified against a JWKS the test serves over HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from app.auth.keys import generate_key, hash_key
from app.config import ApiKey, OidcSettings
from app.demo import QrscpProcess
from tests.gateway_server import GatewayServer, gateway_settings, local_node
from tests.integration.test_retrieve_orthanc import parse_multipart, read_part
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, SigningKey

pytestmark = pytest.mark.integration

KEY_QA = generate_key()
PATIENT = "DGW0002"


@pytest.fixture(scope="module")
def signing_key() -> SigningKey:
    return SigningKey("hospital-1")


@pytest.fixture(scope="module")
def idp(signing_key: SigningKey) -> Iterator[JwksServer]:
    with JwksServer([signing_key]) as server:
        yield server


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def gateway(
    qrscp_peer: QrscpProcess,
    gateway_storage_port: int,
    idp: JwksServer,
    audit_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayServer]:
    aet, port = qrscp_peer.ae_title, qrscp_peer.port
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw-security"),
        # One PACS behind three names: two associations each stay within qrscp's
        # limit of ten, idle ones included.
        local_node("qa", aet, port, default=True, max_associations=2),
        local_node("qb", aet, port, scopes=["pacs:qb"], max_associations=2),
        local_node(
            "strict", aet, port, refuse_unfiltered_searches=True, max_limit=2, max_associations=2
        ),
        storage_port=gateway_storage_port,
    ).model_copy(
        update={
            "api_keys": [ApiKey(name="viewer-qa", hash=hash_key(KEY_QA, n=2**10), nodes=["qa"])],
            "oidc": OidcSettings(issuer=ISSUER, audience=AUDIENCE, jwks_url=idp.url),
            "audit_log": audit_path,
        }
    )
    with GatewayServer(settings) as gw:
        yield gw


@pytest.fixture(scope="module")
def truth(sample_files: list[Path]) -> dict[str, dict[str, set[str]]]:
    """Studies -> series -> instances of PATIENT, from the files themselves."""
    out: dict[str, dict[str, set[str]]] = {}
    for path in sample_files:
        ds = dcmread(path, stop_before_pixels=True)
        if ds.PatientID == PATIENT:
            series = out.setdefault(str(ds.StudyInstanceUID), {})
            series.setdefault(str(ds.SeriesInstanceUID), set()).add(str(ds.SOPInstanceUID))
    return out


def _study_uids(resp: httpx.Response) -> set[str]:
    return {obj["0020000D"]["Value"][0] for obj in resp.json()}


def _audit(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_key_searches_its_node_and_only_its_node(
    gateway: GatewayServer, truth: dict[str, dict[str, set[str]]]
) -> None:
    headers = {"Authorization": f"Bearer {KEY_QA}"}
    params = {"PatientID": PATIENT}
    resp = httpx.get(f"{gateway.url}/pacs/qa/dicomweb/studies", params=params, headers=headers)
    assert resp.status_code == 200, resp.text
    assert _study_uids(resp) == set(truth)
    # The same PACS under another name: the key does not reach it.
    resp = httpx.get(f"{gateway.url}/pacs/qb/dicomweb/studies", params=params, headers=headers)
    assert resp.status_code == 403
    assert httpx.get(f"{gateway.url}/pacs/qa/dicomweb/studies", params=params).status_code == 401


def test_token_scope_opens_its_node(
    gateway: GatewayServer,
    idp: JwksServer,
    signing_key: SigningKey,
    truth: dict[str, dict[str, set[str]]],
) -> None:
    token = idp.token(signing_key, sub="dr-who", scope="openid pacs:qb")
    headers = {"Authorization": f"Bearer {token}"}
    params = {"PatientID": PATIENT}
    resp = httpx.get(f"{gateway.url}/pacs/qb/dicomweb/studies", params=params, headers=headers)
    assert resp.status_code == 200, resp.text
    assert _study_uids(resp) == set(truth)
    assert httpx.get(f"{gateway.url}/dicomweb/studies", headers=headers).status_code == 403


def test_retrieve_is_audited_with_its_count(
    gateway: GatewayServer,
    truth: dict[str, dict[str, set[str]]],
    audit_path: Path,
    idp: JwksServer,
    signing_key: SigningKey,
) -> None:
    token = idp.token(signing_key, sub="dr-who", dicom_nodes=["qa"])
    study = sorted(truth)[0]
    series = sorted(truth[study])[0]
    resp = httpx.get(
        f"{gateway.url}/pacs/qa/dicomweb/studies/{study}/series/{series}",
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
        },
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    sent = {str(read_part(p).SOPInstanceUID) for _, p in parse_multipart(resp)}
    assert sent == truth[study][series]
    line = _audit(audit_path)[-1]
    assert line["principal"] == "dr-who"
    assert (line["kind"], line["level"], line["node"]) == ("retrieve", "series", "qa")
    assert (line["study_uid"], line["series_uid"]) == (study, series)
    assert line["status"] == 200
    assert line["count"] == len(sent)
    assert line["complete"] is True
    assert line["bytes"] == len(resp.content)


def test_search_is_audited_with_its_count(
    gateway: GatewayServer, truth: dict[str, dict[str, set[str]]], audit_path: Path
) -> None:
    resp = httpx.get(
        f"{gateway.url}/dicomweb/studies",
        params={"PatientID": PATIENT, "includefield": "StudyDescription"},
        headers={"X-API-Key": KEY_QA},
    )
    assert resp.status_code == 200
    line = _audit(audit_path)[-1]
    assert line["principal"] == "viewer-qa"
    assert (line["kind"], line["level"], line["node"]) == ("search", "study", "qa")
    assert line["count"] == len(truth) == len(resp.json())
    assert line["query_keys"] == ["PatientID", "includefield"]
    assert PATIENT not in audit_path.read_text()


def test_node_refuses_match_everything_and_cuts_limit(
    gateway: GatewayServer, idp: JwksServer, signing_key: SigningKey
) -> None:
    headers = {"Authorization": f"Bearer {idp.token(signing_key, dicom_nodes='*')}"}
    base = f"{gateway.url}/pacs/strict/dicomweb"
    resp = httpx.get(f"{base}/studies", headers=headers)
    assert resp.status_code == 400
    assert "match everything" in resp.json()["message"]
    # Six studies match; the node gives two and says why.
    resp = httpx.get(
        f"{base}/studies", params={"StudyDate": "19000101-", "limit": "50"}, headers=headers
    )
    assert resp.status_code == 200, resp.text
    assert len(resp.json()) == 2
    warnings = resp.headers.get_list("warning")
    assert any("exceeds this node's maximum of 2" in w for w in warnings), warnings
    assert any("additional results" in w for w in warnings), warnings
    # The same search on an unrestricted node finds more.
    resp = httpx.get(
        f"{gateway.url}/pacs/qb/dicomweb/studies",
        params={"StudyDate": "19000101-"},
        headers=headers,
    )
    assert len(resp.json()) > 2


def test_nifti_lookup_cut_to_one_candidate_is_not_taken_as_unique(
    gateway: GatewayServer, truth: dict[str, dict[str, set[str]]], audit_path: Path
) -> None:
    assert sum(len(series) for series in truth.values()) > 1
    resp = httpx.get(
        f"{gateway.url}/dicomweb/nifti",
        params={"PatientID": PATIENT, "limit": "1"},
        headers={"X-API-Key": KEY_QA},
        timeout=60,
    )
    # A limit hid the other candidates: the answer is a choice, not a volume.
    assert resp.status_code == 300, resp.text
    assert len(resp.json()) == 1
    assert any("additional results" in w for w in resp.headers.get_list("warning"))
    line = _audit(audit_path)[-1]
    assert (line["kind"], line["resource"], line["status"], line["count"]) == (
        "nifti",
        "nifti",
        300,
        1,
    )


def test_nifti_is_audited_with_its_slices(
    gateway: GatewayServer, truth: dict[str, dict[str, set[str]]], audit_path: Path
) -> None:
    study = sorted(truth)[0]
    series = sorted(truth[study])[0]
    resp = httpx.get(
        f"{gateway.url}/dicomweb/studies/{study}/series/{series}/nifti",
        headers={"X-API-Key": KEY_QA},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    line = _audit(audit_path)[-1]
    assert (line["kind"], line["level"], line["resource"]) == ("nifti", "series", "nifti")
    assert (line["study_uid"], line["series_uid"]) == (study, series)
    assert line["count"] == len(truth[study][series])
    assert line["bytes"] == len(resp.content)
    assert line["complete"] is True
