"""API key hashes, the auth settings, ``dimse-gateway hash-key`` and the JWKS cache."""

from __future__ import annotations

import asyncio
import io
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.auth import Authenticator
from app.auth.keys import check_hash_format, generate_key, hash_key, sha256_hash, verify_key
from app.auth.oidc import TokenVerifier, token_scopes
from app.cli import main
from app.config import ApiKey, OidcSettings, PacsNode, Settings, load_settings
from app.errors import Unauthenticated
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, SigningKey


def test_scrypt_hash_verifies_only_its_key() -> None:
    key = generate_key()
    stored = hash_key(key, n=2**10)
    assert stored.startswith("scrypt$1024$8$1$")
    assert verify_key(key, stored)
    assert not verify_key(key + "x", stored)
    assert not verify_key("", stored)
    # Salted: the same key never hashes the same way twice.
    assert hash_key(key, n=2**10) != stored


def test_sha256_hash_verifies_only_its_key() -> None:
    key = generate_key()
    stored = sha256_hash(key)
    assert verify_key(key, stored)
    assert not verify_key(key.upper(), stored)


def test_generated_keys_are_long_random_and_never_look_like_jwts() -> None:
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(len(k) >= 40 and "." not in k for k in keys)


@pytest.mark.parametrize(
    "stored",
    [
        "plaintext-key",
        "sha256:abc",
        "sha256:" + "G" * 64,
        "scrypt$1000$8$1$c2FsdHNhbHQ$" + "A" * 43,  # N not a power of two
        "scrypt$16384$8$1$c2FsdA$" + "A" * 43,  # salt too short
        "scrypt$16384$8$1$c2FsdHNhbHQ$AAAA",  # hash too short
        "scrypt$16384$8$1$c2FsdHNhbHQ",
    ],
)
def test_malformed_hashes_are_refused_at_load(stored: str) -> None:
    with pytest.raises(ValueError):
        check_hash_format(stored)
    with pytest.raises(ValidationError):
        ApiKey(name="x", hash=stored, nodes=["*"])


def _node(name: str) -> PacsNode:
    return PacsNode(name=name, ae_title=name.upper(), host="127.0.0.1", port=104)


def test_settings_refuse_keys_for_unknown_nodes_and_duplicate_names() -> None:
    good = sha256_hash(generate_key())
    with pytest.raises(ValidationError, match="unknown nodes: c"):
        Settings(nodes=[_node("a")], api_keys=[ApiKey(name="k", hash=good, nodes=["a", "c"])])
    with pytest.raises(ValidationError, match="must be unique"):
        Settings(
            nodes=[_node("a")],
            api_keys=[ApiKey(name="k", hash=good, nodes=["a"])] * 2,
        )


@pytest.mark.parametrize(
    "changes",
    [
        {"algorithms": ["HS256"]},
        {"algorithms": ["none"]},
        {"algorithms": []},
        {"jwks_url": "file:///etc/passwd"},
        {"issuer": ""},
    ],
)
def test_oidc_settings_refuse_unsafe_choices(changes: dict[str, object]) -> None:
    base: dict[str, object] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_url": "https://idp.test/certs",
    }
    with pytest.raises(ValidationError):
        OidcSettings.model_validate({**base, **changes})


def test_toml_file_with_keys_and_issuer(tmp_path: Path) -> None:
    stored = hash_key("k", n=2**10)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[gateway]
audit_log = "{tmp_path / "audit.jsonl"}"

[[nodes]]
name = "a"
ae_title = "A"
host = "127.0.0.1"
port = 104
max_limit = 100
refuse_unfiltered_searches = true
scopes = ["pacs:a"]

[[api_keys]]
name = "viewer"
hash = "{stored}"
nodes = ["a"]

[oidc]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_url = "https://idp.test/certs"
""",
        encoding="utf-8",
    )
    settings = load_settings(config)
    assert settings.auth_enabled
    assert settings.api_keys[0].nodes == ["a"]
    assert settings.oidc is not None and settings.oidc.algorithms == ["RS256", "ES256"]
    assert settings.nodes[0].max_limit == 100
    assert settings.audit_log == tmp_path / "audit.jsonl"


def test_hash_key_command_prints_a_working_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash-key", "--name", 'viewer "one"', "--nodes", "a, b"]) == 0
    out = capsys.readouterr().out
    key = out.splitlines()[0].rsplit(" ", 1)[1]
    entry = tomllib.loads(out)["api_keys"][0]
    assert entry["name"] == 'viewer "one"'
    assert entry["nodes"] == ["a", "b"]
    assert entry["hash"].startswith("scrypt$")
    assert verify_key(key, entry["hash"])


def test_hash_key_command_reads_a_key_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("my-own-key\n"))
    assert main(["hash-key", "--stdin", "--sha256"]) == 0
    out = capsys.readouterr().out
    assert "my-own-key" not in out
    entry = tomllib.loads(out)["api_keys"][0]
    assert entry["hash"] == sha256_hash("my-own-key")
    assert entry["nodes"] == ["*"]


def test_scopes_come_from_scope_or_scp() -> None:
    assert token_scopes({"scope": "openid pacs:a"}) == {"openid", "pacs:a"}
    assert token_scopes({"scp": ["pacs:b"]}) == {"pacs:b"}
    assert token_scopes({"scope": 3}) == frozenset()


def test_forged_kids_do_not_make_the_gateway_hammer_the_issuer() -> None:
    key = SigningKey("k1")
    with JwksServer([key]) as idp:
        verifier = TokenVerifier(
            OidcSettings(
                issuer=ISSUER, audience=AUDIENCE, jwks_url=idp.url, jwks_refresh_cooldown=60
            )
        )
        assert verifier.verify(idp.token(key))["sub"] == "alice"
        assert idp.fetches == 1
        for i in range(5):
            stranger = SigningKey(f"forged-{i}")
            with pytest.raises(Unauthenticated, match="not signed by a key"):
                verifier.verify(idp.token(stranger))
        # Inside the cooldown after the first fetch: no forced refresh at all.
        assert idp.fetches == 1
        # The cached set still serves the real key.
        assert verifier.verify(idp.token(key))["sub"] == "alice"
        assert idp.fetches == 1


def test_a_wrong_key_costs_one_hash_however_often_it_is_sent() -> None:
    stored = hash_key("right", n=2**10)
    settings = Settings(nodes=[_node("a")], api_keys=[ApiKey(name="k", hash=stored, nodes=["a"])])
    auth = Authenticator(settings)
    calls: list[str] = []
    real = auth._find_key

    def counting(key: str) -> ApiKey | None:
        calls.append(key)
        return real(key)

    auth._find_key = counting  # type: ignore[method-assign]

    async def run() -> None:
        for _ in range(3):
            with pytest.raises(Unauthenticated):
                await auth.authenticate("wrong", None)
            assert (await auth.authenticate(None, "right")).name == "k"

    asyncio.run(run())
    assert calls == ["wrong", "right"]
