"""Static API keys: generated at random, stored only as a hash, compared in constant time.

Two stored forms:

``scrypt$N$r$p$SALT$HASH``
    salted scrypt (hashlib), what ``dimse-gateway hash-key`` writes.  Slow on
    purpose (about 80 ms at N=2**14), so a leaked configuration does not give
    the keys away even if someone chose a weak one; the gateway remembers keys it
    has verified, so a client pays that once per process.
``sha256:HEX``
    plain SHA-256, acceptable only for long random keys (those ``hash-key``
    generates carry 256 bits): fast, for configurations written by other tools.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets

KEY_PREFIX = "dgw_"
# N=2**14, r=8: 16 MiB and ~80 ms per check on one core of the reference machine.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_DKLEN = 32
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")


def generate_key() -> str:
    """A new random key (256 bits, URL-safe, no dots so it never looks like a JWT)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(key: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # maxmem above the 128*n*r bytes scrypt needs, or hashlib refuses large N.
    return hashlib.scrypt(
        key.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + 2**20, dklen=_DKLEN
    )


def hash_key(key: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """The stored form of *key*: salted scrypt."""
    if not key:
        raise ValueError("an API key must not be empty")
    salt = secrets.token_bytes(16)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(_scrypt(key, salt, n, r, p))}"


def sha256_hash(key: str) -> str:
    """The fast stored form, for long random keys only."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def _scrypt_parts(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("expected scrypt$N$r$p$salt$hash")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except (ValueError, binascii.Error):
        raise ValueError("scrypt parameters are not numbers or salt/hash not base64") from None
    if n < 2**10 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16 or n * r > 2**22:
        raise ValueError("scrypt parameters out of range (N a power of two >= 1024)")
    if len(salt) < 8 or len(digest) != _DKLEN:
        raise ValueError("scrypt salt too short or hash of the wrong length")
    return n, r, p, salt, digest


def check_hash_format(stored: str) -> str:
    """Return *stored* if it is a hash this module can verify, else raise ValueError."""
    stored = stored.strip()
    if _SHA256.match(stored):
        return stored
    if stored.startswith("scrypt$"):
        _scrypt_parts(stored)
        return stored
    raise ValueError(
        "an API key hash is 'scrypt$...' or 'sha256:<64 hex digits>' "
        "(make one with: dimse-gateway hash-key)"
    )


def verify_key(key: str, stored: str) -> bool:
    """Whether *key* hashes to *stored* (constant-time comparison)."""
    if stored.startswith("sha256:"):
        return hmac.compare_digest(sha256_hash(key), stored)
    n, r, p, salt, digest = _scrypt_parts(stored)
    return hmac.compare_digest(_scrypt(key, salt, n, r, p), digest)
