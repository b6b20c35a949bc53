"""Authentication and per-node access through the real HTTP app (uvicorn in a thread).

The nodes point at closed ports: a request that gets past authentication and
authorisation ends as 503 PacsUnavailable, which is how these tests tell
"allowed" from 401/403 without a PACS.  Bearer JWTs are verified against a real
JWKS served over HTTP by ``tests.jwks_server``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.auth.keys import generate_key, hash_key, sha256_hash
from app.client.gateway import GatewayClient
from app.config import ApiKey, OidcSettings, PacsNode, Settings
from tests.gateway_server import GatewayServer
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, SigningKey

KEY_A = generate_key()
KEY_ALL = generate_key()
# Routes that stay open with authentication on: liveness and the API description.
OPEN_ROUTES = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
PATH_VALUES = {
    "node": "a",
    "study": "1.2.3",
    "series": "1.2.3.4",
    "instance": "1.2.3.4.5",
    "frames": "1",
    "tag_path": "7FE00010",
    "patient_id": "P1",
    "job_id": "0" * 32,
}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def signing_key() -> SigningKey:
    return SigningKey("k1")


@pytest.fixture(scope="module")
def idp(signing_key: SigningKey) -> Iterator[JwksServer]:
    with JwksServer([signing_key]) as server:
        yield server


def _settings(work_dir: Path, jwks_url: str, **extra: object) -> Settings:
    port = _closed_port()
    return Settings(
        http_port=0,
        storage_port=0,
        work_dir=work_dir,
        nodes=[
            PacsNode(name="a", ae_title="A", host="127.0.0.1", port=port, default=True),
            PacsNode(name="b", ae_title="B", host="127.0.0.1", port=port, scopes=["pacs:b"]),
        ],
        api_keys=[
            # Small scrypt cost: the format is what is under test, not the work factor.
            ApiKey(name="viewer-a", hash=hash_key(KEY_A, n=2**10), nodes=["a"]),
            ApiKey(name="robot", hash=sha256_hash(KEY_ALL), nodes=["*"]),
        ],
        oidc=OidcSettings(
            issuer=ISSUER, audience=AUDIENCE, jwks_url=jwks_url, jwks_refresh_cooldown=0
        ),
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, idp: JwksServer) -> Iterator[GatewayServer]:
    with GatewayServer(_settings(tmp_path_factory.mktemp("gw"), idp.url)) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        yield c


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _node_routes(gateway: GatewayServer) -> list[tuple[str, str]]:
    """Every (method, URL) the app serves (from its own OpenAPI description), made concrete."""
    routes = []
    for path, operations in gateway.app.openapi()["paths"].items():
        if path in OPEN_ROUTES:
            continue
        url = re.sub(r"{(\w+)(:\w+)?}", lambda m: PATH_VALUES[m.group(1)], path)
        routes += [(method.upper(), url) for method in operations]
    return routes


def _call(client: httpx.Client, method: str, url: str, **kw: object) -> httpx.Response:
    if method == "POST":
        kw["json"] = {"study": "1.2.3"}
    elif url.endswith("/nifti"):
        kw["params"] = {"PatientID": "P1"}
    return client.request(method, url, **kw)  # type: ignore[arg-type]


def test_every_route_but_health_refuses_without_credentials(
    gateway: GatewayServer, client: httpx.Client
) -> None:
    routes = _node_routes(gateway)
    # search, retrieve, rendered, NIfTI and jobs under both bases, /pacs, echo, metrics
    assert len(routes) >= 60
    assert {method for method, _ in routes} == {"GET", "POST", "DELETE"}
    for method, url in routes:
        resp = _call(client, method, url)
        assert resp.status_code == 401, (method, url, resp.text)
        assert resp.json()["error"] == "Unauthenticated"
        assert resp.headers["www-authenticate"] == 'Bearer realm="dimse-gateway"'


def test_health_stays_open(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_every_route_accepts_a_key_for_every_node(
    gateway: GatewayServer, client: httpx.Client
) -> None:
    for method, url in _node_routes(gateway):
        resp = _call(client, method, url, headers=_bearer(KEY_ALL))
        # Past authentication: what is left is the PACS being down, a list, an
        # accepted job, or (for a made-up job id) no such job.
        allowed = {200, 202, 503} | ({404} if url.startswith("/jobs/") else set())
        assert resp.status_code in allowed, (method, url, resp.text)


def test_key_for_node_a_cannot_reach_node_b(client: httpx.Client) -> None:
    headers = _bearer(KEY_A)
    assert client.get("/pacs/a/dicomweb/studies", headers=headers).status_code == 503
    assert client.get("/dicomweb/studies", headers=headers).status_code == 503  # default: a
    for url in ("/pacs/b/dicomweb/studies", "/pacs/b/echo", "/pacs/b/dicomweb/studies/1.2.3"):
        resp = client.get(url, headers=headers)
        assert resp.status_code == 403, url
        assert resp.json()["error"] == "Forbidden"
        assert "'b'" in resp.json()["message"]


def test_unknown_node_is_403_for_a_key_limited_to_some_nodes(client: httpx.Client) -> None:
    # No probing for node names: the answer does not depend on whether it exists.
    resp = client.get("/pacs/secret-node/dicomweb/studies", headers=_bearer(KEY_A))
    assert resp.status_code == 403
    assert "known nodes" not in resp.text
    resp = client.get("/pacs/secret-node/dicomweb/studies", headers=_bearer(KEY_ALL))
    assert resp.status_code == 404


def test_x_api_key_header_is_accepted(client: httpx.Client) -> None:
    assert client.get("/pacs/a/echo", headers={"X-API-Key": KEY_A}).status_code == 503
    assert client.get("/pacs/b/echo", headers={"X-API-Key": KEY_A}).status_code == 403


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer dgw_not-a-key"},
        {"X-API-Key": KEY_A + "x"},
        {"Authorization": f"Basic {KEY_A}"},
        {"Authorization": "Bearer"},
    ],
)
def test_wrong_credentials_are_401_invalid_token(
    client: httpx.Client, headers: dict[str, str]
) -> None:
    resp = client.get("/pacs/a/dicomweb/studies", headers=headers)
    assert resp.status_code == 401
    challenge = resp.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="dimse-gateway", error="invalid_token"')


def test_node_list_shows_only_the_nodes_a_caller_may_use(client: httpx.Client) -> None:
    assert [n["name"] for n in client.get("/pacs", headers=_bearer(KEY_A)).json()] == ["a"]
    names = [n["name"] for n in client.get("/pacs", headers=_bearer(KEY_ALL)).json()]
    assert names == ["a", "b"]


# -- OIDC bearer tokens --------------------------------------------------------------


def test_token_with_nodes_claim(
    client: httpx.Client, idp: JwksServer, signing_key: SigningKey
) -> None:
    token = idp.token(signing_key, dicom_nodes=["a"])
    assert client.get("/pacs/a/dicomweb/studies", headers=_bearer(token)).status_code == 503
    assert client.get("/pacs/b/dicomweb/studies", headers=_bearer(token)).status_code == 403


def test_token_with_node_scope(
    client: httpx.Client, idp: JwksServer, signing_key: SigningKey
) -> None:
    token = idp.token(signing_key, scope="openid pacs:b")
    assert client.get("/pacs/b/dicomweb/studies", headers=_bearer(token)).status_code == 503
    assert client.get("/pacs/a/dicomweb/studies", headers=_bearer(token)).status_code == 403
    names = [n["name"] for n in client.get("/pacs", headers=_bearer(token)).json()]
    assert names == ["b"]


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        ({"lifetime": -120}, "expired"),
        ({"aud": "another-service"}, "another audience"),
        ({"iss": "https://evil.test/"}, "another issuer"),
        ({"exp": None}, "'exp'"),
        ({"aud": None}, "'aud'"),
        ({"nbf": 4102444800}, "not valid yet"),
    ],
)
def test_bad_tokens_are_401_with_the_reason(
    client: httpx.Client,
    idp: JwksServer,
    signing_key: SigningKey,
    claims: dict[str, object],
    why: str,
) -> None:
    lifetime = claims.pop("lifetime", 300)
    token = idp.token(signing_key, lifetime=float(lifetime), dicom_nodes="*", **claims)  # type: ignore[arg-type]
    resp = client.get("/pacs/a/dicomweb/studies", headers=_bearer(token))
    assert resp.status_code == 401, resp.text
    assert why in resp.json()["message"]
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]


def test_token_signed_by_a_stranger_is_refused(client: httpx.Client, idp: JwksServer) -> None:
    # Same kid as the issuer's key, different private key.
    token = idp.token(SigningKey("k1"), dicom_nodes="*")
    resp = client.get("/pacs/a/dicomweb/studies", headers=_bearer(token))
    assert resp.status_code == 401
    assert "signature" in resp.json()["message"]


def test_unsigned_and_hmac_tokens_are_refused(
    client: httpx.Client, idp: JwksServer, signing_key: SigningKey
) -> None:
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "mallory",
        "exp": 4102444800,
        "dicom_nodes": "*",
    }
    unsigned = unsigned_token(claims)
    resp = client.get("/pacs/a/dicomweb/studies", headers=_bearer(unsigned))
    assert resp.status_code == 401
    assert "'none'" in resp.json()["message"]
    # The classic confusion: HS256 "signed" with the issuer's public key as the secret.
    public_jwk = str(signing_key.jwk)
    hmac_token = hs256_token(claims, public_jwk, kid="k1")
    resp = client.get("/pacs/a/dicomweb/studies", headers=_bearer(hmac_token))
    assert resp.status_code == 401
    assert "HS256" in resp.json()["message"]


def test_rotated_key_is_fetched_on_first_sight(
    client: httpx.Client, idp: JwksServer, signing_key: SigningKey
) -> None:
    client.get("/pacs/a/echo", headers=_bearer(idp.token(signing_key, dicom_nodes="*")))
    before = idp.fetches
    new_key = SigningKey("k2", alg="ES256")
    idp.keys.append(new_key)
    token = idp.token(new_key, dicom_nodes="*")
    assert client.get("/pacs/a/echo", headers=_bearer(token)).status_code == 503
    assert idp.fetches == before + 1
    # Known now: no more fetches.
    assert client.get("/pacs/a/echo", headers=_bearer(token)).status_code == 503
    assert idp.fetches == before + 1


def test_issuer_unreachable_is_503_not_401(tmp_path: Path) -> None:
    dead_url = f"http://127.0.0.1:{_closed_port()}/certs"
    with GatewayServer(_settings(tmp_path, dead_url)) as gw:
        token = JwksServer([]).token(SigningKey("k1"), dicom_nodes="*")
        resp = httpx.get(f"{gw.url}/pacs/a/echo", headers=_bearer(token), timeout=10)
    assert resp.status_code == 503
    assert resp.json()["error"] == "IdentityProviderUnavailable"
    assert resp.headers["retry-after"]


def test_api_keys_still_work_without_oidc(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "http://127.0.0.1:1/").model_copy(update={"oidc": None})
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:
        assert c.get("/pacs/a/echo", headers=_bearer(KEY_A)).status_code == 503
        token = JwksServer([]).token(SigningKey("k1"), dicom_nodes="*")
        resp = c.get("/pacs/a/echo", headers=_bearer(token))
        assert resp.status_code == 401
        assert "no OIDC issuer" in resp.json()["message"]


def test_auth_is_off_without_keys_or_issuer(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "http://127.0.0.1:1/").model_copy(
        update={"oidc": None, "api_keys": []}
    )
    assert not settings.auth_enabled
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:
        assert c.get("/pacs/b/dicomweb/studies").status_code == 503
        assert [n["name"] for n in c.get("/pacs").json()] == ["a", "b"]


# -- helpers: tokens PyJWT itself refuses to make -----------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(claims: dict[str, object]) -> str:
    header = _b64(json.dumps({"alg": "none", "kid": "k1"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


def hs256_token(claims: dict[str, object], secret: str, *, kid: str) -> str:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = _b64(json.dumps(claims).encode())
    mac = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(mac)}"


def test_cors_preflight_needs_no_credentials(client: httpx.Client) -> None:
    # Browsers send preflights without the Authorization header they ask about.
    resp = client.options(
        "/pacs/a/dicomweb/studies",
        headers={
            "Origin": "https://viewer.example.org",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert resp.status_code == 200
    assert "authorization" in resp.headers["access-control-allow-headers"].lower()
    resp = client.get("/pacs/a/dicomweb/studies", headers={"Origin": "https://viewer.example.org"})
    assert resp.status_code == 401
    # The viewer can read why: the challenge is exposed to scripts.
    assert "www-authenticate" in resp.headers["access-control-expose-headers"].lower()


def test_jobs_are_seen_only_by_those_who_may_use_their_node(
    client: httpx.Client, idp: JwksServer, signing_key: SigningKey
) -> None:
    created = client.post("/pacs/a/dicomweb/jobs", json={"study": "1.2.3"}, headers=_bearer(KEY_A))
    assert created.status_code == 202, created.text
    job = created.headers["location"]
    assert client.get(job, headers=_bearer(KEY_A)).status_code == 200
    assert client.get(job).status_code == 401
    only_b = _bearer(idp.token(signing_key, scope="pacs:b"))
    # As if it did not exist, for a caller without node a.
    assert client.get(job, headers=only_b).status_code == 404
    assert client.delete(job, headers=only_b).status_code == 404
    assert client.get(f"{job}/result", headers=only_b).status_code == 404
    listed = [j["id"] for j in client.get("/jobs", headers=only_b).json()]
    assert job.rsplit("/", 1)[1] not in listed
    listed = [j["id"] for j in client.get("/jobs", headers=_bearer(KEY_A)).json()]
    assert job.rsplit("/", 1)[1] in listed
    # Nor can it start one there.
    resp = client.post("/pacs/a/dicomweb/jobs", json={"study": "1.2.3"}, headers=only_b)
    assert resp.status_code == 403


def test_command_line_client_sends_its_key(gateway: GatewayServer) -> None:
    with GatewayClient(gateway.url, "a", api_key=KEY_A) as c:
        assert [n["name"] for n in c.http.get("/pacs").json()] == ["a"]
    with GatewayClient(gateway.url, "a") as c:
        assert c.http.get("/pacs").status_code == 401
