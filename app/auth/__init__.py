"""Who is asking, and which nodes they may use.

Framework-free: the HTTP layer (``app.api.auth``) pulls the credential out of
the request and hands it here.  Authentication is off unless API keys or an
OIDC issuer are configured; then every node resource needs a credential:

- an API key (``Authorization: Bearer <key>`` or ``X-API-Key: <key>``), whose
  ``nodes`` list says where it may go;
- an OIDC bearer JWT, which may go to the nodes its ``nodes_claim`` names and to
  every node whose ``scopes`` it holds one of.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from app.auth.keys import verify_key
from app.auth.oidc import TokenVerifier, claim_names, token_scopes
from app.config import ApiKey, PacsNode, Settings
from app.errors import Unauthenticated

ALL_NODES = "*"
# Longer than any API key or sane JWT: refused before any hashing.
_MAX_CREDENTIAL = 8192
# Wrong keys remembered, so a client repeating one does not cost a hash each time.
_REFUSED_MEMORY = 1024


@dataclass(frozen=True)
class Principal:
    """An authenticated caller (or the anonymous one when authentication is off)."""

    name: str
    method: Literal["anonymous", "api-key", "oidc"]
    nodes: frozenset[str]
    scopes: frozenset[str] = frozenset()

    def may_use_any(self) -> bool:
        """Whether every node, configured or not, is open to this principal."""
        return ALL_NODES in self.nodes

    def may_use(self, node: PacsNode) -> bool:
        if ALL_NODES in self.nodes or node.name in self.nodes:
            return True
        return not self.scopes.isdisjoint(node.scopes)


ANONYMOUS = Principal(name="anonymous", method="anonymous", nodes=frozenset({ALL_NODES}))


def _looks_like_jwt(token: str) -> bool:
    # Compact JWS: three base64url parts; generated API keys never hold a dot.
    return token.count(".") == 2


class Authenticator:
    """Turns a presented credential into a Principal, or raises Unauthenticated."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth_enabled
        self._keys = list(settings.api_keys)
        self._oidc = settings.oidc
        self._tokens = TokenVerifier(settings.oidc) if settings.oidc is not None else None
        # SHA-256 of keys already verified (or refused): the slow hash runs once per key.
        # Touched only on the event loop.
        self._known: dict[bytes, ApiKey] = {}
        self._refused: OrderedDict[bytes, None] = OrderedDict()

    async def authenticate(self, bearer: str | None, api_key: str | None) -> Principal:
        """The principal for a request's ``Authorization: Bearer`` or ``X-API-Key`` value."""
        if not self.enabled:
            return ANONYMOUS
        credential = bearer if bearer is not None else api_key
        if not credential:
            raise Unauthenticated(
                "this gateway needs credentials: an API key (Authorization: Bearer or "
                "X-API-Key) or an OIDC bearer token"
            )
        if len(credential) > _MAX_CREDENTIAL:
            raise Unauthenticated("the credential is too long", invalid=True)
        if bearer is not None and _looks_like_jwt(credential):
            return await self._token_principal(credential)
        return await self._key_principal(credential)

    async def _token_principal(self, token: str) -> Principal:
        if self._tokens is None or self._oidc is None:
            raise Unauthenticated(
                "bearer tokens (JWT) are not accepted here: no OIDC issuer is configured",
                invalid=True,
            )
        claims = await asyncio.to_thread(self._tokens.verify, token)
        name = claims.get(self._oidc.principal_claim) or claims.get("sub") or "unnamed token"
        return Principal(
            name=str(name)[:128],
            method="oidc",
            nodes=claim_names(claims.get(self._oidc.nodes_claim)),
            scopes=token_scopes(claims),
        )

    async def _key_principal(self, key: str) -> Principal:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        entry = self._known.get(digest)
        if entry is None:
            if not self._keys or digest in self._refused:
                raise Unauthenticated("the API key is not valid", invalid=True)
            entry = await asyncio.to_thread(self._find_key, key)
            if entry is None:
                self._refused[digest] = None
                while len(self._refused) > _REFUSED_MEMORY:
                    self._refused.popitem(last=False)
                raise Unauthenticated("the API key is not valid", invalid=True)
            self._known[digest] = entry
        return Principal(name=entry.name, method="api-key", nodes=frozenset(entry.nodes))

    def _find_key(self, key: str) -> ApiKey | None:
        found = None
        # Every entry is checked, found or not: the time taken says nothing about which.
        for entry in self._keys:
            if verify_key(key, entry.hash) and found is None:
                found = entry
        return found
