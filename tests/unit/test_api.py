"""The HTTP surface with no PACS behind it: errors are JSON, fast and named."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from app.config import PacsNode, Settings
from tests.gateway_server import GatewayServer


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    settings = Settings(
        http_port=0,
        storage_port=0,
        work_dir=tmp_path_factory.mktemp("gw"),
        nodes=[
            PacsNode(
                name="down", ae_title="DOWN", host="127.0.0.1", port=_closed_port(), default=True
            )
        ],
    )
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:
        yield c


def test_health(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_nodes_lists_pool_state(client: httpx.Client) -> None:
    nodes = client.get("/pacs").json()
    assert [n["name"] for n in nodes] == ["down"]
    assert nodes[0]["default"] is True
    assert nodes[0]["pool"]["in_use"] == 0


def test_pacs_down_is_a_fast_503_with_json(client: httpx.Client) -> None:
    started = time.monotonic()
    resp = client.get("/dicomweb/studies")
    assert time.monotonic() - started < 2
    assert resp.status_code == 503
    assert resp.headers["retry-after"]
    body = resp.json()
    assert body["error"] == "PacsUnavailable"
    assert body["node"] == "down"
    assert "Traceback" not in resp.text
    echo = client.get("/pacs/down/echo")
    assert echo.status_code == 503
    assert client.get("/pacs").json()[0]["pool"]["in_use"] == 0


def test_unknown_node_is_404(client: httpx.Client) -> None:
    resp = client.get("/pacs/elsewhere/dicomweb/studies")
    assert resp.status_code == 404
    assert resp.json()["error"] == "UnknownNode"
    assert "down" in resp.json()["message"]


@pytest.mark.parametrize(
    ("url", "parameter"),
    [
        ("/dicomweb/studies?StudyDate=yesterday", "StudyDate"),
        ("/dicomweb/studies?limit=-5", "limit"),
        ("/dicomweb/studies?Foo=bar", "Foo"),
        ("/dicomweb/studies/1.2.x/series", "study"),
        ("/dicomweb/studies/1.2.3/series/1.2.%2E%2E/instances", "series"),
    ],
)
def test_bad_input_is_400_naming_the_parameter(
    client: httpx.Client, url: str, parameter: str
) -> None:
    resp = client.get(url)
    assert resp.status_code == 400, resp.text
    assert resp.json()["parameter"] == parameter


def test_unsupported_accept_is_406(client: httpx.Client) -> None:
    resp = client.get("/dicomweb/studies", headers={"Accept": "application/dicom+xml"})
    assert resp.status_code == 406
    assert "application/dicom+json" in resp.json()["message"]
    # The same error name as retrieve's 406, not a private class's.
    assert resp.json()["error"] == "NotAcceptable"


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        ("application/dicom+json;q=0", 406),
        ("*/*;q=0", 406),
        ("application/dicom+json;q=0, */*", 406),
        ("application/dicom+json;q=abc", 400),
        ("application/json", 503),
        ("text/html;q=0.9, application/*;q=0.1", 503),
    ],
)
def test_search_accept_honours_q_values(client: httpx.Client, accept: str, status: int) -> None:
    """A search negotiates as metadata does (RFC 9110 §12.4.2: q=0 is "not
    acceptable"); it used to answer DICOM JSON to an Accept refusing it.  503:
    negotiation passed and the (stopped) PACS was asked."""
    resp = client.get("/dicomweb/studies", headers={"Accept": accept})
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")


def test_method_not_allowed_lists_head(client: httpx.Client) -> None:
    """RFC 9110 §15.5.6: a 405 lists the methods the resource supports, HEAD
    with GET (every GET route answers HEAD)."""
    resp = client.post("/dicomweb/studies")
    assert resp.status_code == 405
    assert resp.json()["error"] == "HTTPError"
    assert {m.strip() for m in resp.headers["allow"].split(",")} == {"GET", "HEAD"}


def test_unknown_route_is_json_404(client: httpx.Client) -> None:
    resp = client.get("/dicomweb/nothing-here")
    assert resp.status_code == 404
    assert resp.json()["error"] == "HTTPError"
