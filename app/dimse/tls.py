"""DICOM TLS: the SSL contexts of the gateway's associations and its storage SCP.

PS3.15 Annex B describes the secure transport connection profiles; the BCP 195
profiles (B.9, B.10) ask for TLS 1.2 or later with certificates on both sides,
which is what these contexts enforce (Python's defaults exclude the weak
ciphers BCP 195 forbids).  Orthanc (``DicomTlsEnabled``) and DCMTK (``+tls``)
speak it; both verify the certificate chain and neither checks host names.

A TLS failure is a misconfiguration far more often than an outage, and
pynetdicom only logs it: :class:`ClientContext` remembers the last handshake
failure of its node so that the pool can say "certificate verify failed:
unable to get local issuer certificate" instead of "cannot open an association".

Plain ``ssl`` only: no pynetdicom here, so the configuration can check
certificates and keys when it is read.
"""

from __future__ import annotations

import os
import re
import ssl
import time
from pathlib import Path
from typing import Any

__all__ = [
    "ClientContext",
    "TlsConfigError",
    "check_readable",
    "client_context",
    "describe_tls_error",
    "peer_certificate_subject",
    "server_context",
    "tls_error_text",
]

_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)$")

# What a TLS failure usually means on a DICOM link, by OpenSSL's reason code.
_HINTS = (
    ("CERTIFICATE_REQUIRED", "the PACS wants a client certificate: tls_cert_file, tls_key_file"),
    ("UNKNOWN_CA", "the PACS does not trust the gateway's client certificate"),
    ("BAD_CERTIFICATE", "the PACS does not accept the gateway's client certificate"),
    ("CERTIFICATE_UNKNOWN", "the PACS does not accept the gateway's client certificate"),
    ("WRONG_VERSION_NUMBER", "does the PACS speak TLS on this port?"),
    ("UNEXPECTED_EOF", "the PACS closed the connection: does it speak TLS on this port?"),
    ("PROTOCOL_VERSION", "the PACS offers no TLS version the gateway accepts (1.2 or later)"),
)


# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = frozenset({62, 64})
_NAME_HINT = "it does not name the node's host; see tls_verify_hostname"
_CA_HINT = "is it signed by a CA in tls_ca_file?"


class TlsConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names it."""


def check_readable(path: Path, what: str) -> None:
    """Refuse a missing or unreadable file with a message naming the setting."""
    if not path.is_file():
        raise TlsConfigError(f"{what} {path} does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise TlsConfigError(f"{what} {path} is not readable by this user")


class ClientContext(ssl.SSLContext):
    """An SSL context for one PACS node that remembers its last handshake failure."""

    _failure: tuple[float, str] | None = None

    def record_failure(self, exc: BaseException) -> None:
        self._failure = (time.monotonic(), describe_tls_error(exc))

    def failure_since(self, started: float) -> str | None:
        """The last TLS failure, if one happened at or after ``started`` (monotonic)."""
        failure = self._failure
        if failure is not None and failure[0] >= started:
            return failure[1]
        return None


class _ReportingSocket(ssl.SSLSocket):
    """Records TLS failures on its :class:`ClientContext` before raising them.

    Under TLS 1.3 the client finishes its side of the handshake before the
    server has judged the client certificate: a refusal arrives as an alert on
    the first read, so reads report TLS errors too.  Only the connection set-up
    cares; later errors go to the same record, which nobody reads then.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:
            self._report(exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            self._report(exc)
            raise

    def _report(self, exc: OSError) -> None:
        context = self.context
        if isinstance(context, ClientContext):
            context.record_failure(exc)


ClientContext.sslsocket_class = _ReportingSocket


def describe_tls_error(exc: BaseException) -> str:
    """A one-line account of a TLS failure, with a hint where the reason is telling."""
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = _NAME_HINT if exc.verify_code in _NAME_MISMATCH else _CA_HINT
        return f"the PACS's certificate was refused: {exc.verify_message} ({hint})"
    text = _SSL_SOURCE.sub("", str(exc)) or type(exc).__name__
    reason = str(getattr(exc, "reason", "") or "")
    for key, hint in _HINTS:
        if key in reason or key in text.upper().replace(" ", "_"):
            return f"TLS handshake failed: {text} ({hint})"
    return f"TLS handshake failed: {text}"


def _load_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path, what: str) -> None:
    check_readable(cert_file, f"{what} certificate")
    check_readable(key_file, f"{what} private key")
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"{what} certificate {cert_file} and key {key_file} cannot be used together "
            f"(PEM files, unencrypted key matching the certificate): {_short(exc)}"
        ) from None


def _load_cas(context: ssl.SSLContext, ca_file: Path, what: str) -> None:
    check_readable(ca_file, what)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"{what} {ca_file} holds no usable PEM certificate: {_short(exc)}"
        ) from None
    if not context.get_ca_certs():
        raise TlsConfigError(f"{what} {ca_file} holds no CA certificate")


def _short(exc: ssl.SSLError) -> str:
    return _SSL_SOURCE.sub("", str(exc))


def tls_error_text(exc: BaseException) -> str:
    """The error without OpenSSL's source location."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    return _SSL_SOURCE.sub("", str(exc)) or type(exc).__name__


def client_context(
    *,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    verify_hostname: bool,
) -> ClientContext:
    """The context of the associations to one node: TLS 1.2+, the PACS's certificate
    verified against ``ca_file`` (the system's CAs when None), the host name checked
    unless ``verify_hostname`` is off, and our certificate for mutual TLS if given."""
    context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = verify_hostname
    if ca_file is not None:
        _load_cas(context, ca_file, "tls_ca_file")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None and key_file is not None:
        _load_chain(context, cert_file, key_file, "tls_cert_file/tls_key_file:")
    return context


def server_context(
    *,
    cert_file: Path,
    key_file: Path,
    ca_file: Path | None,
    require_client_cert: bool,
) -> ssl.SSLContext:
    """The storage SCP's context: TLS 1.2+, our certificate, and the PACS's client
    certificate verified against ``ca_file`` (required, or checked when offered)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert_file, key_file, "storage_tls_cert_file/storage_tls_key_file:")
    if ca_file is not None:
        _load_cas(context, ca_file, "storage_tls_ca_file")
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise TlsConfigError(
            "storage_tls_require_client_cert needs storage_tls_ca_file "
            "(the CAs that sign the PACS's certificates)"
        )
    return context


def peer_certificate_subject(sock: Any) -> str | None:
    """The common name of the peer's verified certificate, for the log."""
    get = getattr(sock, "getpeercert", None)
    cert = get() if get is not None else None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
