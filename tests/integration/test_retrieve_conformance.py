"""WADO-RS conformance through the gateway in front of Orthanc: what a demanding
client hits besides the happy path (absent resources, HEAD, query parameters)."""

from __future__ import annotations

from collections.abc import Iterator

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

