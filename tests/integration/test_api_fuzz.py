"""Schemathesis fuzzing of the HTTP API against the app's own OpenAPI schema.

A real gateway (uvicorn on a free port) in front of pynetdicom's ``qrscp``
holding the sample studies. Every operation of the schema gets a bounded
number of generated requests, valid and invalid by the schema; none may
answer 5xx (502/503/504 would blame the PACS, and this one is healthy), none
may hang, and every answer must match the response schema the API declares,
where it declares one for its status and media type.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance
from schemathesis.schemas import APIOperation

from app.config import Settings
from app.demo import QrscpProcess
from app.main import create_app
from tests.gateway_server import GatewayServer, gateway_settings, local_node

pytestmark = pytest.mark.integration

NODE = "demo"

# The schema does not depend on the nodes or ports: build it without a server so
# that every operation is its own test (and its own line in the report).
_SPEC = create_app(Settings(nodes=[])).openapi()
_SCHEMA = schemathesis.openapi.from_dict(_SPEC)


def _violable(operation: APIOperation) -> bool:
    """Whether the schema says of any parameter more than "a string": else no
    request can violate it, and negative generation has nothing to do."""
    params = _SPEC["paths"][operation.path][operation.method.lower()].get("parameters", [])
    return any(
        set(p["schema"]) & {"pattern", "minimum", "maxLength", "items"}
        or p["schema"].get("type") not in ("string", None)
        for p in params
    )


CASES = [
    pytest.param(operation, mode, id=f"{mode.value}-{operation.label}")
    for operation in (result.ok() for result in _SCHEMA.get_all_operations())
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or _violable(operation)
]

# Bounded: about 120 (operation, mode) pairs x 5 examples, and every search
# stops after a few matches (max_results). The /pacs/{node}/... twins of the
# /dicomweb/... operations get random node names: their handlers are the same,
# so the PACS is asked once per example, not twice.
FUZZ = settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzzed_gateway(
    qrscp_peer: QrscpProcess, gateway_storage_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    # max_results bounds the whole-archive scans (/instances takes tens of
    # seconds on qrscp), which the fuzzer asks for with no key at all.
    node = local_node(NODE, qrscp_peer.ae_title, qrscp_peer.port, default=True, max_results=10)
    work: Path = tmp_path_factory.mktemp("fuzz-gateway")
    with GatewayServer(gateway_settings(work, node, storage_port=gateway_storage_port)) as gw:
        yield gw


@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_no_server_errors_and_declared_schemas_hold(
    operation: APIOperation, mode: GenerationMode, fuzzed_gateway: GatewayServer
) -> None:
    @FUZZ
    @given(case=operation.as_strategy(mode))
    def fuzz(case: schemathesis.Case) -> None:
        # A hang shows up as a timeout here, not as a stuck suite.
        response = case.call(base_url=fuzzed_gateway.url, timeout=30)
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    fuzz()


# -- regression tests for what the fuzzing found ------------------------------------------------


def test_non_ascii_code_string_key_is_400_not_500(fuzzed_gateway: GatewayServer) -> None:
    # pydicom could not encode Modality=\U000e899d in the Identifier: the C-FIND
    # failed inside pynetdicom and the client got a 500.
    response = httpx.get(
        f"{fuzzed_gateway.dicomweb}/studies/1.2.3/series",
        params={"Modality": "\U000e899d"},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["parameter"] == "Modality"
