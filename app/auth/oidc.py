"""OAuth2/OIDC bearer tokens: JWTs verified with PyJWT against the issuer's JWKS.

Checked: the signature with a key from the issuer's key set (chosen by ``kid``),
an algorithm from the configured allow-list that matches that key, ``iss``,
``aud``, ``exp`` (all three required) and ``nbf``/``iat`` when present, with
the configured clock leeway.  The key set is cached for ``jwks_cache_seconds``
and re-read at most once per ``jwks_refresh_cooldown`` when a token names an
unknown ``kid`` (key rotation), so forged ``kid`` values cannot make the
gateway hammer the issuer.  All of it is PyJWT's ``PyJWKClient``; nothing here
does cryptography by hand.

The calls block (HTTP to the issuer, signature checks): run them on a thread.
"""

from __future__ import annotations

from typing import Any

import jwt

from app.config import OidcSettings
from app.errors import IdentityProviderUnavailable, Unauthenticated


class TokenVerifier:
    """Verifies bearer JWTs for one issuer."""

    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        self._jwks = jwt.PyJWKClient(
            settings.jwks_url,
            cache_jwk_set=True,
            lifespan=settings.jwks_cache_seconds,
            cooldown_duration=settings.jwks_refresh_cooldown,
            timeout=settings.jwks_timeout,
        )

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or Unauthenticated(invalid=True) saying what is wrong."""
        cfg = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("the bearer token is not a JWT", invalid=True) from None
        alg = header.get("alg")
        if alg not in cfg.algorithms:
            raise Unauthenticated(
                f"token algorithm {str(alg)[:20]!r} is not accepted "
                f"(allowed: {', '.join(cfg.algorithms)})",
                invalid=True,
            )
        try:
            key = self._jwks.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError as exc:
            raise IdentityProviderUnavailable(
                f"cannot read the token issuer's keys from {cfg.jwks_url}: {exc}"
            ) from exc
        except jwt.PyJWKClientError:
            raise Unauthenticated(
                "the token was not signed by a key of the configured issuer", invalid=True
            ) from None
        except jwt.PyJWTError:
            raise Unauthenticated("the token header is malformed", invalid=True) from None
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(cfg.algorithms),
                audience=cfg.audience,
                issuer=cfg.issuer,
                leeway=cfg.leeway,
                options={"require": ["exp", "iss", "aud"], "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired", invalid=True) from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the token is not valid yet", invalid=True) from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("the token is for another audience", invalid=True) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the token is from another issuer", invalid=True) from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(
                f"the token lacks the {exc.claim!r} claim", invalid=True
            ) from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the token signature does not verify", invalid=True) from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the token is invalid: {exc}", invalid=True) from None
        return claims


def claim_names(value: Any) -> frozenset[str]:
    """A claim holding names: a JSON list, or one space- or comma-separated string."""
    if isinstance(value, str):
        return frozenset(v for v in value.replace(",", " ").split() if v)
    if isinstance(value, list):
        return frozenset(str(v) for v in value if isinstance(v, str | int) and str(v))
    return frozenset()


def token_scopes(claims: dict[str, Any]) -> frozenset[str]:
    """OAuth2 scopes: ``scope`` (RFC 8693 §4.2, space-separated) or ``scp`` (Azure, Okta)."""
    return claim_names(claims.get("scope")) | claim_names(claims.get("scp"))
