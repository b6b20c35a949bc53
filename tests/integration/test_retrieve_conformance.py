"""WADO-RS conformance through the gateway in front of Orthanc: what a demanding
client hits besides the happy path (absent resources, HEAD, query parameters)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.gateway_server import GatewayServer, gateway_settings, local_node
from tests.peers.common import InstanceInfo
from tests.peers.orthanc import OrthancPeer

pytestmark = pytest.mark.integration

# Valid UIDs that no test data uses.
ABSENT = "2.25.1234567890"


@pytest.fixture(scope="module")
def gateway(
    orthanc_peer: OrthancPeer, gateway_storage_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw-conformance"),
        local_node("orthanc", orthanc_peer.aet, orthanc_peer.dicom_port, default=True),
        storage_port=gateway_storage_port,
    )
    with GatewayServer(settings) as gw:
        yield gw


@pytest.fixture(scope="module")
def instance(orthanc_peer: OrthancPeer) -> InstanceInfo:
    """One single-frame sample CT instance Orthanc holds."""
    return next(
        i
        for i in orthanc_peer.loaded.values()
        if i.patient_id == "DGW0001" and i.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    )


def _study(gw: GatewayServer, info: InstanceInfo) -> str:
    return f"{gw.dicomweb}/studies/{info.study_instance_uid}"


def _series(gw: GatewayServer, info: InstanceInfo) -> str:
    return f"{_study(gw, info)}/series/{info.series_instance_uid}"


def _instance(gw: GatewayServer, info: InstanceInfo) -> str:
    return f"{_series(gw, info)}/instances/{info.sop_instance_uid}"


def _assert_json_error(resp: httpx.Response, status: int, error: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["error"] == error
    assert body["message"] and "Traceback" not in resp.text


@pytest.mark.parametrize(
    "path",
    [
        "/series/{absent}",
        "/series/{absent}/metadata",
        "/series/{absent}/rendered",
        "/series/{series}/instances/{absent}",
        "/series/{series}/instances/{absent}/metadata",
        "/series/{series}/instances/{absent}/frames/1",
        "/series/{series}/instances/{absent}/rendered",
        "/series/{series}/instances/{absent}/bulkdata/7FE00010",
    ],
)
def test_absent_series_or_instance_is_404(
    gateway: GatewayServer, instance: InstanceInfo, path: str
) -> None:
    """Orthanc fails a C-MOVE of UIDs it does not hold with 0xC000 (unable to
    process) where dcmqrscp answers Success with nothing moved; either way the
    resource does not exist, which is 404 (PS3.18 Table 10.4.3-1), not 502."""
    tail = path.format(absent=ABSENT, series=instance.series_instance_uid)
    resp = httpx.get(_study(gateway, instance) + tail, timeout=60)
    _assert_json_error(resp, 404, "NotFound")
    assert ABSENT in resp.json()["message"]


@pytest.mark.parametrize(
    ("level", "tail", "accept"),
    [
        ("study", "/series", "application/dicom+json"),
        ("series", "/metadata", "application/dicom+json"),
        ("instance", "", 'multipart/related; type="application/dicom"'),
        ("instance", "/frames/1", 'multipart/related; type="application/octet-stream"'),
        ("instance", "/rendered", "image/png"),
        ("series", "", 'multipart/related; type="application/dicom"; transfer-syntax=*'),
    ],
)
def test_head_answers_as_get_without_a_body(
    gateway: GatewayServer, instance: InstanceInfo, level: str, tail: str, accept: str
) -> None:
    """RFC 9110 §9.1: a server supports HEAD wherever it supports GET; FastAPI
    routes alone answer 405 to it (a link checker or proxy then sees an error)."""
    base = {"study": _study, "series": _series, "instance": _instance}[level](gateway, instance)
    headers = {"Accept": accept}
    get = httpx.get(base + tail, headers=headers, timeout=60)
    head = httpx.head(base + tail, headers=headers, timeout=60)
    assert get.status_code == 200, get.text
    assert head.status_code == 200, head.headers
    assert head.content == b""
    media = get.headers["content-type"].split(";")[0]
    assert head.headers["content-type"].split(";")[0] == media
    if "content-length" in get.headers and level != "series":
        assert head.headers["content-length"] == get.headers["content-length"]


def test_head_of_an_absent_resource_is_404(gateway: GatewayServer, instance: InstanceInfo) -> None:
    resp = httpx.head(f"{_study(gateway, instance)}/series/{ABSENT}/metadata", timeout=60)
    assert resp.status_code == 404
    assert resp.content == b""
    resp = httpx.head(f"{gateway.dicomweb}/studies", params={"StudyDate": "2024"}, timeout=60)
    assert resp.status_code == 400


IGNORED = "299 dimse-gateway: The query parameter 'foo' is not supported and was ignored."


@pytest.mark.parametrize(
    ("level", "tail"),
    [
        ("series", "/metadata"),
        ("instance", ""),
        ("instance", "/frames/1"),
        ("instance", "/bulkdata/7FE00010"),
        ("instance", "/rendered"),
        ("instance", "/thumbnail"),
        ("series", ""),
    ],
)
def test_unsupported_query_parameters_are_ignored_with_a_warning(
    gateway: GatewayServer, instance: InstanceInfo, level: str, tail: str
) -> None:
    """PS3.18 §8.3: "The origin server shall ignore any unsupported Query
    Parameters ... and may return a response containing appropriate warning"."""
    base = {"series": _series, "instance": _instance}[level](gateway, instance)
    resp = httpx.get(base + tail, params={"foo": "bar", "accept": "*/*"}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.headers.get_list("warning") == [IGNORED]
    plain = httpx.get(base + tail, params={"accept": "*/*", "charset": "utf-8"}, timeout=60)
    assert plain.status_code == 200
    assert "warning" not in plain.headers
    assert plain.content == resp.content or tail in ("", "/frames/1", "/bulkdata/7FE00010")


@pytest.mark.parametrize(
    ("tail", "parameter", "value"),
    [
        ("/rendered", "annotation", "everything"),
        ("/rendered", "iccprofile", "cmyk"),
        ("/thumbnail", "iccprofile", "maybe"),
    ],
)
def test_supported_query_parameter_with_an_invalid_value_is_400(
    gateway: GatewayServer, instance: InstanceInfo, tail: str, parameter: str, value: str
) -> None:
    """PS3.18 §8.3: a supported parameter with an invalid value is 400
    (annotation: patient, technique; iccprofile: no, yes, srgb, adobergb, rommrgb)."""
    resp = httpx.get(_instance(gateway, instance) + tail, params={parameter: value}, timeout=60)
    _assert_json_error(resp, 400, "InvalidQuery")
    assert resp.json()["parameter"] == parameter
    ok = {"annotation": "patient,technique", "iccprofile": "srgb"}[parameter]
    assert httpx.get(_instance(gateway, instance) + tail, params={parameter: ok}).status_code == 200


def _uid(obj: dict[str, Any], tag: str) -> str:
    value: str = obj[tag]["Value"][0]
    return value


def test_dicomweb_client_searches_with_every_parameter(
    gateway: GatewayServer, instance: InstanceInfo
) -> None:
    """dicomweb-client's search methods, each parameter used, unchanged
    (``test_search_orthanc.py`` covers the plain calls)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=gateway.dicomweb)
    study, series = instance.study_instance_uid, instance.series_instance_uid
    studies = client.search_for_studies(
        fuzzymatching=True,
        limit=1,
        offset=0,
        fields=["StudyDescription", "00201208"],
        search_filters={"PatientName": "doe", "StudyDate": "20190101-20191231"},
        get_remaining=True,
        additional_params={"includefield": "PatientSex"},
    )
    assert [_uid(s, "0020000D") for s in studies] == [study]
    assert {"00081030", "00201208", "00100040"} <= set(studies[0])
    everything = client.search_for_studies()
    paged = client.search_for_studies(limit=2, get_remaining=True)
    assert [_uid(s, "0020000D") for s in paged] == [_uid(s, "0020000D") for s in everything]
    assert client.search_for_studies(offset=len(everything)) == []

    found = client.search_for_series(
        study, fields=["all"], search_filters={"Modality": "CT"}, limit=5, offset=0
    )
    assert [_uid(s, "0020000E") for s in found] == [series]
    across = client.search_for_series(
        search_filters={"Modality": "CT", "PatientID": "DGW0001"}, get_remaining=True, limit=1
    )
    assert series in {_uid(s, "0020000E") for s in across}

    listed = client.search_for_instances(
        study, series, fields=["Rows"], get_remaining=True, limit=2
    )
    assert instance.sop_instance_uid in {_uid(i, "00080018") for i in listed}
    assert all("00280010" in i for i in listed)
    in_study = client.search_for_instances(study, limit=3, offset=1)
    assert len(in_study) == 3
    anywhere = client.search_for_instances(
        search_filters={"SOPInstanceUID": instance.sop_instance_uid}
    )
    assert [_uid(i, "00080018") for i in anywhere] == [instance.sop_instance_uid]


def test_dicomweb_client_retrieves_and_renders(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, instance: InstanceInfo
) -> None:
    """The retrieve methods ``test_retrieve_orthanc.py`` does not call, unchanged."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=gateway.dicomweb)
    study, series, sop = (
        instance.study_instance_uid,
        instance.series_instance_uid,
        instance.sop_instance_uid,
    )
    stored = {
        i.sop_instance_uid for i in orthanc_peer.loaded.values() if i.study_instance_uid == study
    }
    in_series = {
        i.sop_instance_uid for i in orthanc_peer.loaded.values() if i.series_instance_uid == series
    }
    assert {str(d.SOPInstanceUID) for d in client.retrieve_study(study)} == stored
    assert {str(d.SOPInstanceUID) for d in client.iter_study(study)} == stored
    assert {str(d.SOPInstanceUID) for d in client.iter_series(study, series)} == in_series
    study_meta = client.retrieve_study_metadata(study)
    assert {_uid(m, "00080018") for m in study_meta} == stored
    series_meta = client.retrieve_series_metadata(study, series)
    assert {_uid(m, "00080018") for m in series_meta} == in_series

    ds = client.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
    frames = list(client.iter_instance_frames(study, series, sop, [1]))
    assert frames == [ds.PixelData]
    # dicomweb-client sends "Host: 127.0.0.1" without the port (web.py, _http_get),
    # so the absolute BulkDataURI built from it names port 80 (Orthanc's plugin
    # does the same); the path is the gateway's, and is asked on the right port.
    meta = next(m for m in series_meta if _uid(m, "00080018") == sop)
    path = "/dicomweb/" + meta["7FE00010"]["BulkDataURI"].split("/dicomweb/", 1)[1]
    bulk = client.retrieve_bulkdata(gateway.url + path)
    assert bulk == [ds.PixelData]
    assert list(client.iter_bulkdata(gateway.url + path)) == [ds.PixelData]

    jpeg = client.retrieve_instance_rendered(study, series, sop)
    assert jpeg.startswith(b"\xff\xd8")
    png = client.retrieve_instance_rendered(
        study, series, sop, media_types=("image/png",), params={"viewport": "32,32"}
    )
    assert png.startswith(b"\x89PNG")
    assert client.retrieve_instance_frames_rendered(study, series, sop, [1]).startswith(b"\xff\xd8")
    # A series renders as one JPEG part per instance (see docs/conformance.md);
    # the client hands back the multipart body as it came.
    body = client.retrieve_series_rendered(study, series, media_types=("image/jpeg",))
    assert body.count(b"Content-Type: image/jpeg") == len(in_series)


@pytest.mark.parametrize(
    ("frames", "status", "fragment"),
    [
        ("0", 400, "start at 1"),
        ("-1", 400, "start at 1"),
        ("1.5", 400, "comma-separated list of numbers"),
        ("2", 404, "frame 2 does not exist"),
        ("99999999999999999999", 404, "does not exist"),
        ("1,1", 400, "more than once"),
        (",".join(["1"] * 3000), 400, "more than once"),
    ],
)
def test_frame_lists_refused_with_a_json_reason(
    gateway: GatewayServer, instance: InstanceInfo, frames: str, status: int, fragment: str
) -> None:
    """Frame numbers are 1-based and within the object.  A number twice is
    refused: each repetition would be another copy of the frame in an answer
    built in memory (3000 repeats of one 512x512 frame are 1.5 GB from a 6 KB URL)."""
    resp = httpx.get(f"{_instance(gateway, instance)}/frames/{frames}", timeout=60)
    _assert_json_error(resp, status, "InvalidRequest" if status == 400 else "NotFound")
    assert fragment in resp.json()["message"]
    for suffix in ("/rendered", "/thumbnail"):
        if status == 400:
            again = httpx.get(f"{_instance(gateway, instance)}/frames/{frames}{suffix}")
            _assert_json_error(again, 400, "InvalidRequest")
