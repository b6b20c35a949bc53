"""The HTTP API describes itself: /openapi.json, /docs, /metrics, and rendering's
parameter checks, with no PACS behind the gateway."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.config import PacsNode, Settings
from tests.gateway_server import GatewayServer

INSTANCE = "/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5"


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
        work_dir=tmp_path_factory.mktemp("gw-openapi"),
        nodes=[
            PacsNode(
                name="down", ae_title="DOWN", host="127.0.0.1", port=_closed_port(), default=True
            )
        ],
    )
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def schema(client: httpx.Client) -> dict[str, Any]:
    resp = client.get("/openapi.json")
    assert resp.status_code == 200
    result: dict[str, Any] = resp.json()
    return result


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_every_operation_has_a_summary_and_a_description(schema: dict[str, Any]) -> None:
    operations = list(_operations(schema))
    assert len(operations) > 50  # both prefixes of every DICOMweb route, and the rest
    missing = [
        f"{method.upper()} {path}"
        for path, method, op in operations
        if not op.get("summary", "").strip() or len(op.get("description", "").strip()) < 30
    ]
    assert not missing, missing


def test_every_path_parameter_is_declared_and_described(schema: dict[str, Any]) -> None:
    for path, _, op in _operations(schema):
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)", path)), path
    bare = [
        (path, p["name"])
        for path, _, op in _operations(schema)
        for p in op.get("parameters", [])
        if p["in"] == "path" and not p.get("description")
    ]
    assert not bare, bare


def test_searches_document_their_query_parameters_and_answers(schema: dict[str, Any]) -> None:
    op = schema["paths"]["/dicomweb/studies"]["get"]
    names = {p["name"] for p in op["parameters"]}
    assert {"includefield", "limit", "offset", "fuzzymatching", "Accept"} <= names
    assert any("PatientName" in p["description"] for p in op["parameters"])
    example = op["responses"]["200"]["content"]["application/dicom+json"]["example"]
    assert example[0]["0020000D"]["vr"] == "UI"
    error = op["responses"]["400"]["content"]["application/json"]
    assert error["example"]["parameter"] == "StudyDate"
    assert error["schema"]["required"] == ["error", "message"]


def test_rendered_and_thumbnail_resources_are_listed(schema: dict[str, Any]) -> None:
    paths = set(schema["paths"])
    for suffix in (
        "/studies/{study}/rendered",
        "/studies/{study}/series/{series}/rendered",
        "/studies/{study}/series/{series}/instances/{instance}/rendered",
        "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
        "/studies/{study}/thumbnail",
        "/studies/{study}/series/{series}/thumbnail",
        "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
    ):
        assert "/dicomweb" + suffix in paths
        assert "/pacs/{node}/dicomweb" + suffix in paths
    op = schema["paths"]["/dicomweb" + "/studies/{study}/thumbnail"]["get"]
    assert {"window", "viewport", "quality"} <= {p["name"] for p in op["parameters"]}


def test_docs_and_redoc_answer_without_a_cdn(client: httpx.Client) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "/openapi.json" in docs.text
    redoc = client.get("/redoc")
    assert redoc.status_code == 200
    # A hospital network may reach no CDN: every script and style sheet is ours.
    for page in (docs.text, redoc.text):
        assets = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert assets and all(a.startswith("/docs-assets/") for a in assets), assets
        for asset in assets:
            got = client.get(asset)
            assert got.status_code == 200 and len(got.content) > 1000, asset


def test_metrics_answer_without_a_pacs(client: httpx.Client) -> None:
    client.get("/health")
    text = client.get("/metrics").text
    assert 'dimse_gateway_pool_max_associations{node="down"} 4.0' in text
    assert 'dimse_gateway_http_requests_total{method="GET",route="/health",status="200"}' in text
    assert "dimse_gateway_cache_bytes " in text


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("window=abc,100", "window"),
        ("window=40,0", "window"),
        ("window=40,400,cubic", "window"),
        ("viewport=256", "viewport"),
        ("viewport=256,0", "viewport"),
        ("quality=0", "quality"),
    ],
)
def test_bad_rendering_parameters_are_400_before_any_retrieve(
    client: httpx.Client, query: str, parameter: str
) -> None:
    resp = client.get(f"{INSTANCE}/rendered?{query}")
    assert resp.status_code == 400, resp.text
    assert resp.json()["parameter"] == parameter


def test_a_non_image_accept_is_406_for_rendered(client: httpx.Client) -> None:
    resp = client.get(f"{INSTANCE}/thumbnail", headers={"Accept": "application/dicom"})
    assert resp.status_code == 406
    assert "image/jpeg" in resp.json()["message"]
