"""QIDO-RS through the gateway against Orthanc, with Orthanc's own DICOMweb plugin as the reference.

The gateway talks C-FIND to Orthanc; Orthanc's plugin answers the same query from
the same database.  Both must return the same matches with the same values.
Where they legitimately differ, the test says so and why.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from app.dicomweb.attributes import PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS, Level
from tests.gateway_server import GatewayServer, gateway_settings, local_node
from tests.integration.qido_sweep import normalized
from tests.peers.orthanc import OrthancPeer

pytestmark = pytest.mark.integration

STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SOP_UID = "00080018"
RETRIEVE_URL = "00081190"
RETRIEVE_AET = "00080054"
# Attributes Orthanc's plugin computes or adds that a C-FIND answer does not
# carry; they are checked elsewhere, not compared value by value here.
# SpecificCharacterSet: the plugin echoes the stored one (e.g. ISO_IR 100) over
# strings it has already turned into UTF-8 JSON (PS3.18 F.2); the gateway drops it.
PLUGIN_ONLY = {RETRIEVE_URL, RETRIEVE_AET, "00080056", "00080005"}


@pytest.fixture(scope="module")
def gateway(
    orthanc_peer: OrthancPeer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw"),
        local_node("orthanc", orthanc_peer.aet, orthanc_peer.dicom_port, default=True),
    )
    with GatewayServer(settings) as gw:
        yield gw


def _get(url: str, params: list[tuple[str, str]] | None = None) -> httpx.Response:
    # '*' and ',' stay literal: Orthanc 1.10's plugin does not percent-decode
    # them (PatientName=Doe%2A matches nothing there), while the gateway does.
    if params:
        url += "?" + urlencode(params, safe="*,")
    return httpx.get(url, headers={"Accept": "application/dicom+json"}, timeout=30)


def _json(resp: httpx.Response) -> list[dict[str, Any]]:
    if resp.status_code == 204:
        return []
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()
    return data


def _by_key(objs: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    out = {}
    for obj in objs:
        out[obj[key]["Value"][0]] = obj
    assert len(out) == len(objs), f"duplicate {key} in answer"
    return out


def compare(
    ours: list[dict[str, Any]],
    theirs: list[dict[str, Any]],
    key: str,
    *,
    extra_in_orthanc: frozenset[str] = frozenset(),
) -> None:
    a, b = _by_key(ours, key), _by_key(theirs, key)
    assert set(a) == set(b), (
        f"different matches: only ours {set(a) - set(b)}, only Orthanc {set(b) - set(a)}"
    )
    for uid, obj in a.items():
        ref = b[uid]
        for tag, attr in obj.items():
            if tag in PLUGIN_ONLY or tag not in ref:
                continue
            assert attr["vr"] == ref[tag]["vr"], (uid, tag)
            assert normalized(attr) == normalized(ref[tag]), (uid, tag, attr, ref[tag])
        missing = set(ref) - set(obj) - PLUGIN_ONLY - extra_in_orthanc
        assert not missing, f"{uid}: Orthanc returns {sorted(missing)} and we do not"


def both(gateway: GatewayServer, orthanc: OrthancPeer, path: str, params: list[tuple[str, str]]):
    ours = _get(f"{gateway.url}/pacs/orthanc/dicomweb{path}", params)
    theirs = _get(f"{orthanc.dicomweb_url}{path}", params)
    return ours, theirs


STUDY_QUERIES = [
    [],
    [("PatientID", "DGW0002")],
    [("00100020", "DGW000*")],
    [("PatientName", "Doe*")],
    [("PatientName", "M*ller*")],
    [("StudyDate", "20200101-20221231")],
    [("StudyDate", "-20200602")],
    [("StudyDate", "20230101-")],
    [("AccessionNumber", "*")],
    [("ModalitiesInStudy", "MR")],
    [("includefield", "StudyDescription"), ("includefield", "00081030,00080090")],
    [("PatientID", "DGW0001"), ("includefield", "all")],
    [("StudyTime", "080000-120000")],
    [("StudyTime", "-1000")],
    [("StudyDate", "20190314"), ("StudyTime", "081500")],
    [("PatientBirthDate", "-19700101")],
    [("PatientSex", "F")],
    [("PatientName", "*john")],
    [("ModalitiesInStudy", "C*")],
    [("includefield", "00100040,00100030"), ("includefield", "NumberOfStudyRelatedInstances")],
]


@pytest.mark.parametrize(
    "params", STUDY_QUERIES, ids=lambda p: "&".join(f"{k}={v}" for k, v in p) or "all"
)
def test_studies_match_orthanc_dicomweb(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, params: list[tuple[str, str]]
) -> None:
    ours, theirs = both(gateway, orthanc_peer, "/studies", params)
    assert (
        ours.headers.get("content-type", "").startswith("application/dicom+json")
        or ours.status_code == 204
    )
    compare(_json(ours), _json(theirs), STUDY_UID)


# Orthanc's plugin adds the study's attributes to /studies/{study}/series and
# .../instances answers; PS3.18 Table 10.6.3-4 asks only for series attributes
# there, and fetching them would cost the PACS one more C-FIND per search.
def _attributes_above(level: Level) -> frozenset[str]:
    tables = {
        Level.SERIES: STUDY_KEYS | PATIENT_KEYS,
        Level.IMAGE: STUDY_KEYS | PATIENT_KEYS | SERIES_KEYS,
    }
    return frozenset(f"{t:08X}" for t in tables[level])


STUDY_LEVEL_EXTRAS = _attributes_above(Level.SERIES)
SERIES_LEVEL_EXTRAS = _attributes_above(Level.IMAGE)


def test_series_and_instances_match_orthanc(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    studies = _json(_get(f"{orthanc_peer.dicomweb_url}/studies"))
    assert studies
    for study in studies:
        uid = study[STUDY_UID]["Value"][0]
        ours, theirs = both(gateway, orthanc_peer, f"/studies/{uid}/series", [])
        compare(_json(ours), _json(theirs), SERIES_UID, extra_in_orthanc=STUDY_LEVEL_EXTRAS)
        for series in _json(theirs)[:3]:
            se = series[SERIES_UID]["Value"][0]
            ours, theirs = both(gateway, orthanc_peer, f"/studies/{uid}/series/{se}/instances", [])
            compare(
                _json(ours),
                _json(theirs),
                SOP_UID,
                extra_in_orthanc=STUDY_LEVEL_EXTRAS | SERIES_LEVEL_EXTRAS,
            )


@pytest.mark.parametrize(
    "params",
    [
        [("Modality", "MR")],
        [("PatientID", "DGW0002"), ("Modality", "CT")],
        [("SeriesDescription", "t2_*")],
        [("StudyDate", "20200101-20221231"), ("SeriesDescription", "*obl*")],
    ],
    ids=str,
)
def test_relational_series_search(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, params: list[tuple[str, str]]
) -> None:
    ours, theirs = both(gateway, orthanc_peer, "/series", params)
    compare(_json(ours), _json(theirs), SERIES_UID)


def test_empty_result_is_204(gateway: GatewayServer) -> None:
    resp = _get(f"{gateway.dicomweb}/studies", [("PatientID", "NOSUCHPATIENT")])
    assert resp.status_code == 204
    assert resp.content == b""


def test_non_ascii_names_decoded(gateway: GatewayServer) -> None:
    names = {
        o["00100020"]["Value"][0]: o["00100010"]["Value"][0]
        for o in _json(_get(f"{gateway.dicomweb}/studies", [("PatientID", "DGW*")]))
    }
    assert names["DGW0002"] == {"Alphabetic": "Müller^Jürgen"}
    assert names["DGW0003"] == {"Alphabetic": "Łukasiewicz^Zofia^Maria"}
    assert names["DGW0004"] == {
        "Alphabetic": "Yamada^Tarou",
        "Ideographic": "山田^太郎",
        "Phonetic": "やまだ^たろう",
    }


def test_retrieve_url_points_at_the_gateway(gateway: GatewayServer) -> None:
    studies = _json(_get(f"{gateway.dicomweb}/studies", [("PatientID", "DGW0001")]))
    for study in studies:
        uid = study[STUDY_UID]["Value"][0]
        assert study[RETRIEVE_URL]["Value"] == [f"{gateway.dicomweb}/studies/{uid}"]
        assert RETRIEVE_AET not in study


def test_limit_and_offset_page_stably(gateway: GatewayServer) -> None:
    everything = _json(_get(f"{gateway.dicomweb}/studies"))
    uids = [o[STUDY_UID]["Value"][0] for o in everything]
    paged: list[str] = []
    for offset in range(0, len(uids), 2):
        resp = _get(f"{gateway.dicomweb}/studies", [("limit", "2"), ("offset", str(offset))])
        page = [o[STUDY_UID]["Value"][0] for o in _json(resp)]
        paged += page
        if offset + 2 < len(uids):
            assert "additional results" in resp.headers.get("warning", "")
    assert paged == uids


def test_limit_zero_means_no_limit_as_in_orthanc(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    ours, theirs = both(gateway, orthanc_peer, "/studies", [("limit", "0")])
    everything = _json(_get(f"{gateway.dicomweb}/studies"))
    assert len(everything) > 1
    uids = sorted(o[STUDY_UID]["Value"][0] for o in _json(ours))
    assert uids == sorted(o[STUDY_UID]["Value"][0] for o in everything)
    assert uids == sorted(o[STUDY_UID]["Value"][0] for o in _json(theirs))


def test_bad_parameter_is_400_naming_it(gateway: GatewayServer) -> None:
    resp = _get(f"{gateway.dicomweb}/studies", [("StudyDate", "2024-13-45")])
    assert resp.status_code == 400
    body = resp.json()
    assert body["parameter"] == "StudyDate"
    assert "StudyDate" in body["message"]


def test_unknown_node_is_404(gateway: GatewayServer) -> None:
    resp = _get(f"{gateway.url}/pacs/nope/dicomweb/studies")
    assert resp.status_code == 404
    assert "nope" in resp.json()["message"]


def test_echo_and_pool_state(gateway: GatewayServer) -> None:
    resp = httpx.get(f"{gateway.url}/pacs/orthanc/echo", timeout=10)
    assert resp.status_code == 200
    assert resp.json()["status"] == "ok"
    nodes = httpx.get(f"{gateway.url}/pacs", timeout=10).json()
    pool = nodes[0]["pool"]
    assert pool["in_use"] == 0
    assert 1 <= pool["idle"] <= pool["max_associations"]


def test_dicomweb_client_searches(gateway: GatewayServer, tmp_path: Path) -> None:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=gateway.dicomweb)
    studies = client.search_for_studies(search_filters={"PatientID": "DGW0002"})
    assert len(studies) == 2
    study_uid = studies[0][STUDY_UID]["Value"][0]
    series = client.search_for_series(study_uid)
    assert series
    instances = client.search_for_instances(study_uid, series[0][SERIES_UID]["Value"][0])
    assert instances
    assert client.search_for_studies(search_filters={"PatientID": "NOSUCH"}) == []


def test_text_wildcards_are_case_sensitive(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    """A named difference: Orthanc matches LO wild cards regardless of case, both in
    its plugin and over C-FIND; PS3.4 C.2.2.2.4 makes matching case-sensitive for
    every VR but PN, and the gateway filters the PACS's answers by that rule."""
    ours, theirs = both(gateway, orthanc_peer, "/series", [("SeriesDescription", "t2*")])
    ours_desc = {o["0008103E"]["Value"][0] for o in _json(ours)}
    theirs_desc = {o["0008103E"]["Value"][0] for o in _json(theirs)}
    assert ours_desc == {d for d in theirs_desc if d.startswith("t2")}
    assert theirs_desc - ours_desc == {"T2 TSE oblique"}


def test_limit_with_a_series_key_in_a_study_search(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    """Regression: the study C-FIND was cut at limit+1 answers before the series
    key was checked, so a match further down the PACS's list went missing."""
    resp = _get(
        f"{gateway.dicomweb}/studies", [("SeriesDescription", "t2_tse_obl"), ("limit", "1")]
    )
    found = [o[STUDY_UID]["Value"][0] for o in _json(resp)]
    assert len(found) == 1
    series = _json(_get(f"{gateway.dicomweb}/studies/{found[0]}/series"))
    assert any(s.get("0008103E", {}).get("Value") == ["t2_tse_obl"] for s in series)


@pytest.mark.parametrize(
    ("path", "attribute", "values"),
    [
        ("/studies", "ModalitiesInStudy", ["CT", "MR"]),
        ("/series", "Modality", ["CT", "M*"]),
        ("/studies", "PatientSex", ["F", "O"]),
    ],
)
def test_code_string_lists_match_any_value(
    gateway: GatewayServer,
    orthanc_peer: OrthancPeer,
    path: str,
    attribute: str,
    values: list[str],
) -> None:
    """OHIF's modality filter sends ``ModalitiesInStudy=CT,MR`` when two are
    ticked. A comma is not a CS character (PS3.5 Table 6.2-1), so the only
    reading is a list matching any of its values (PS3.18 §8.3.4.1 lists UIDs
    alike); the gateway used to send the literal value and answer 204.
    Orthanc's plugin ignores such a key and returns everything: the reference
    is the union of its answers to each value on its own."""
    key = SERIES_UID if path == "/series" else STUDY_UID
    expected: dict[str, dict[str, Any]] = {}
    for value in values:
        expected.update(
            _by_key(_json(_get(orthanc_peer.dicomweb_url + path, [(attribute, value)])), key)
        )
    assert expected
    ours = _json(
        _get(f"{gateway.url}/pacs/orthanc/dicomweb{path}", [(attribute, ",".join(values))])
    )
    compare(
        ours,
        list(expected.values()),
        key,
        extra_in_orthanc=frozenset(_attributes_above(Level.SERIES))
        if path == "/series"
        else frozenset(),
    )


@pytest.mark.parametrize("name", ["Doe^John^^^", "Doe^John^", "Doe^John=", "doe^john^^=="])
def test_trailing_empty_name_components_are_insignificant(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, name: str
) -> None:
    """PS3.5 6.2.1.1: trailing empty components and component groups of a PN
    may be left out, so ``Doe^John^^^`` is ``Doe^John``.  Orthanc (plugin and
    C-FIND) compares the key literally and finds nothing; the gateway sends the
    short form."""
    # '^' and '=' unencoded: Orthanc 1.10's plugin does not percent-decode them.
    plugin = orthanc_peer.dicomweb_url + "/studies?PatientName="
    reference = _json(_get(plugin + "Doe^John"))
    assert reference
    assert not _json(_get(plugin + name))
    ours = _json(_get(f"{gateway.url}/pacs/orthanc/dicomweb/studies", [("PatientName", name)]))
    compare(ours, reference, STUDY_UID)


def test_fuzzy_matching_where_orthanc_matches_literally(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    """A named difference: Orthanc 1.10's plugin takes ``fuzzymatching=true``
    and matches literally without the Warning PS3.18 §8.3.4.2 asks of a server
    that does not support it (``muller`` finds nothing there); the gateway
    matches names case- and accent-free by component, and finds what Orthanc
    finds for the exact name."""
    params = [("PatientName", "muller"), ("fuzzymatching", "true")]
    plugin = _get(orthanc_peer.dicomweb_url + "/studies", params)
    assert _json(plugin) == []
    assert "warning" not in plugin.headers
    exact = _json(_get(orthanc_peer.dicomweb_url + "/studies?PatientName=M*ller^J*rgen"))
    assert exact
    ours = _get(f"{gateway.url}/pacs/orthanc/dicomweb/studies", params)
    assert "warning" not in ours.headers
    compare(_json(ours), exact, STUDY_UID)
