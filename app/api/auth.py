"""Credentials out of the request: ``Authorization: Bearer`` or ``X-API-Key``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.api.audit import note
from app.auth import Authenticator, Principal
from app.errors import Unauthenticated


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            "the Authorization header must be 'Bearer <key or token>'", invalid=True
        )
    return token.strip()


async def get_principal(request: Request) -> Principal:
    """The caller; raises Unauthenticated (401) when authentication is on and fails."""
    authenticator: Authenticator = request.app.state.authenticator
    api_key = request.headers.get("x-api-key")
    principal = await authenticator.authenticate(
        _bearer(request), api_key.strip() if api_key is not None else None
    )
    note(request, principal=principal.name)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
