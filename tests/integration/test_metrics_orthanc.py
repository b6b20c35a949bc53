"""/metrics and request ids after real searches and retrieves against Orthanc.

Each DIMSE operation the gateway runs writes one INFO line (``C-FIND orthanc
...``); the counters must move by exactly as many operations as those lines
show, and the lines must carry the request id of the HTTP request behind them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.logs import JsonFormatter, RequestIdFilter
from tests.gateway_server import GatewayServer, gateway_settings, local_node
from tests.peers.orthanc import OrthancPeer

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def gateway(
    orthanc_peer: OrthancPeer, gateway_storage_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw-metrics"),
        local_node("orthanc", orthanc_peer.aet, orthanc_peer.dicom_port, default=True),
        local_node("orthanc-get", orthanc_peer.aet, orthanc_peer.dicom_port, retrieve="get"),
        storage_port=gateway_storage_port,
    )
    with GatewayServer(settings) as gw:
        yield gw


class _Lines(logging.Handler):
    """The gateway's log lines as the JSON formatter writes them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(RequestIdFilter())
        self.setFormatter(JsonFormatter())
        self.entries: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append(json.loads(self.format(record)))

    def operations(self, prefix: str) -> list[dict[str, object]]:
        return [e for e in self.entries if str(e["message"]).startswith(prefix)]


@pytest.fixture
def lines() -> Iterator[_Lines]:
    handler = _Lines()
    app_logger = logging.getLogger("app")
    old_level = app_logger.level
    app_logger.setLevel(logging.INFO)
    app_logger.addHandler(handler)
    try:
        yield handler
    finally:
        app_logger.removeHandler(handler)
        app_logger.setLevel(old_level)


def scrape(gw: GatewayServer) -> Samples:
    resp = httpx.get(gw.url + "/metrics", timeout=30)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_a_search_moves_the_request_and_c_find_counters(
    gateway: GatewayServer, lines: _Lines
) -> None:
    before = scrape(gateway)
    resp = httpx.get(
        gateway.dicomweb + "/studies",
        params={"PatientID": "DGW0002"},
        headers={"X-Request-ID": "search-1"},
        timeout=60,
    )
    assert resp.status_code == 200 and len(resp.json()) == 2
    assert resp.headers["x-request-id"] == "search-1"
    after = scrape(gateway)

    finds = lines.operations("C-FIND orthanc")
    assert finds, "the search ran no C-FIND"
    # Every C-FIND line of this request carries its id, though it ran on a worker thread.
    assert {e["request_id"] for e in finds} == {"search-1"}
    assert all(str(e["thread"]).startswith("dimse") for e in finds)

    route = "/dicomweb/studies"
    assert (
        delta(
            before,
            after,
            "dimse_gateway_http_requests_total",
            method="GET",
            route=route,
            status="200",
        )
        == 1
    )
    assert (
        delta(
            before,
            after,
            "dimse_gateway_http_request_duration_seconds_count",
            method="GET",
            route=route,
        )
        == 1
    )
    assert delta(before, after, "dimse_gateway_http_response_bytes_total", route=route) == len(
        resp.content
    )
    ok = {"node": "orthanc", "operation": "C-FIND"}
    assert delta(
        before, after, "dimse_gateway_dimse_operations_total", status="success", **ok
    ) == len(finds)
    assert delta(
        before, after, "dimse_gateway_dimse_operation_duration_seconds_count", **ok
    ) == len(finds)
    # Associations went back to the pool: idle, none in use, nobody waiting.
    assert value(after, "dimse_gateway_pool_associations", node="orthanc", state="in_use") == 0
    assert value(after, "dimse_gateway_pool_associations", node="orthanc", state="idle") >= 1
    assert value(after, "dimse_gateway_pool_waiting", node="orthanc") == 0
    assert value(after, "dimse_gateway_pool_max_associations", node="orthanc") == 4


def test_an_echo_is_one_c_echo(gateway: GatewayServer) -> None:
    before = scrape(gateway)
    assert httpx.get(gateway.url + "/pacs/orthanc/echo", timeout=30).status_code == 200
    after = scrape(gateway)
    labels = {"node": "orthanc", "operation": "C-ECHO", "status": "success"}
    assert delta(before, after, "dimse_gateway_dimse_operations_total", **labels) == 1
    assert (
        delta(
            before,
            after,
            "dimse_gateway_http_requests_total",
            method="GET",
            route="/pacs/{node}/echo",
            status="200",
        )
        == 1
    )


def small_series(peer: OrthancPeer, rank: int) -> tuple[str, str, int]:
    """(study, series, instances) of the *rank*-th smallest series of more than one
    instance: small to be quick, several instances so that counts mean something."""
    by_series: dict[tuple[str, str], int] = {}
    for info in peer.loaded.values():
        key = (info.study_instance_uid, info.series_instance_uid)
        by_series[key] = by_series.get(key, 0) + 1
    ranked = sorted(((n, k) for k, n in by_series.items() if n > 1))
    count, (study, series) = ranked[rank]
    return study, series, count


def test_a_retrieve_moves_c_move_c_store_cache_and_bytes(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, lines: _Lines
) -> None:
    study, series, count = small_series(orthanc_peer, 0)
    url = f"{gateway.dicomweb}/studies/{study}/series/{series}"
    route = "/dicomweb/studies/{study}/series/{series}"

    before = scrape(gateway)
    cold = httpx.get(url, headers={"X-Request-ID": "move-1"}, timeout=120)
    assert cold.status_code == 200
    middle = scrape(gateway)
    warm = httpx.get(url, timeout=120)
    assert warm.status_code == 200 and len(warm.content) == len(cold.content)
    after = scrape(gateway)

    moves = lines.operations("C-MOVE orthanc")
    assert len(moves) == 1 and moves[0]["request_id"] == "move-1"
    node = {"node": "orthanc"}
    assert (
        delta(
            before,
            middle,
            "dimse_gateway_dimse_operations_total",
            operation="C-MOVE",
            status="success",
            **node,
        )
        == 1
    )
    assert (
        delta(
            before,
            middle,
            "dimse_gateway_dimse_operations_total",
            operation="C-STORE received",
            status="success",
            **node,
        )
        == count
    )
    assert delta(before, middle, "dimse_gateway_retrieve_moves_started_total") == 1
    assert delta(before, middle, "dimse_gateway_http_response_bytes_total", route=route) == len(
        cold.content
    )
    assert (
        delta(before, middle, "dimse_gateway_cache_lookups_total", kind="series", result="hit") == 0
    )
    assert (
        delta(before, middle, "dimse_gateway_cache_lookups_total", kind="series", result="miss")
        >= 1
    )
    assert value(middle, "dimse_gateway_cache_bytes") >= len(cold.content) * 0.9

    # The second retrieve comes from the cache: no DIMSE at all.
    assert (
        delta(
            middle,
            after,
            "dimse_gateway_dimse_operations_total",
            operation="C-MOVE",
            status="success",
            **node,
        )
        == 0
    )
    assert (
        delta(
            middle,
            after,
            "dimse_gateway_dimse_operations_total",
            operation="C-STORE received",
            status="success",
            **node,
        )
        == 0
    )
    assert (
        delta(middle, after, "dimse_gateway_cache_lookups_total", kind="series", result="hit") >= 1
    )
    assert (
        delta(
            middle,
            after,
            "dimse_gateway_http_requests_total",
            method="GET",
            route=route,
            status="200",
        )
        == 1
    )
    assert delta(middle, after, "dimse_gateway_http_response_bytes_total", route=route) == len(
        warm.content
    )


def test_series_metadata_is_encoded_once_then_served_from_memory(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    study, series, count = small_series(orthanc_peer, 2)
    url = f"{gateway.dicomweb}/studies/{study}/series/{series}/metadata"
    before = scrape(gateway)
    first = httpx.get(url, timeout=120)
    middle = scrape(gateway)
    again = httpx.get(url, timeout=120)
    after = scrape(gateway)
    assert first.status_code == again.status_code == 200
    assert first.content == again.content and len(first.json()) == count
    name = "dimse_gateway_cache_lookups_total"
    assert delta(before, middle, name, kind="metadata", result="miss") == count
    assert delta(before, middle, name, kind="metadata", result="hit") == 0
    assert delta(middle, after, name, kind="metadata", result="miss") == 0
    assert delta(middle, after, name, kind="metadata", result="hit") == count


def test_a_c_get_retrieve_counts_each_c_store_with_its_time(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    study, series, count = small_series(orthanc_peer, 1)
    before = scrape(gateway)
    resp = httpx.get(
        f"{gateway.url}/pacs/orthanc-get/dicomweb/studies/{study}/series/{series}", timeout=120
    )
    assert resp.status_code == 200
    after = scrape(gateway)
    node = {"node": "orthanc-get"}
    assert (
        delta(
            before,
            after,
            "dimse_gateway_dimse_operations_total",
            operation="C-GET",
            status="success",
            **node,
        )
        == 1
    )
    assert (
        delta(
            before,
            after,
            "dimse_gateway_dimse_operations_total",
            operation="C-STORE received",
            status="success",
            **node,
        )
        == count
    )
    assert (
        delta(
            before,
            after,
            "dimse_gateway_dimse_operation_duration_seconds_count",
            operation="C-STORE received",
            **node,
        )
        == count
    )
    assert (
        delta(
            before,
            after,
            "dimse_gateway_dimse_operations_total",
            operation="C-MOVE",
            status="success",
            **node,
        )
        == 0
    )


def test_errors_and_unknown_paths_are_counted_by_status(gateway: GatewayServer) -> None:
    before = scrape(gateway)
    assert (
        httpx.get(gateway.dicomweb + "/studies?StudyDate=notadate", timeout=30).status_code == 400
    )
    assert httpx.get(gateway.url + "/no/such/path", timeout=30).status_code == 404
    after = scrape(gateway)
    assert (
        delta(
            before,
            after,
            "dimse_gateway_http_requests_total",
            method="GET",
            route="/dicomweb/studies",
            status="400",
        )
        == 1
    )
    assert (
        delta(
            before,
            after,
            "dimse_gateway_http_requests_total",
            method="GET",
            route="unmatched",
            status="404",
        )
        == 1
    )


def test_request_ids_are_echoed_or_made(gateway: GatewayServer) -> None:
    made = httpx.get(gateway.url + "/health", timeout=30).headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    other = httpx.get(gateway.url + "/health", timeout=30).headers["x-request-id"]
    assert other != made
    # An id that would garble a log line is replaced, not echoed.
    odd = httpx.get(gateway.url + "/health", headers={"X-Request-ID": "a b\tc"}, timeout=30)
    assert odd.headers["x-request-id"] != "a b\tc" and len(odd.headers["x-request-id"]) == 32
