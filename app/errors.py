"""The gateway's exceptions: one tree, free of HTTP, mapped to responses once in ``app.api.errors``.

::

    GatewayError
    ├── InvalidRequest            the client asked for something malformed (400)
    │   └── InvalidQuery          a QIDO parameter is wrong; names the parameter
    ├── Unauthenticated           no credentials, or ones that do not verify (401)
    ├── Forbidden                 the principal may not use that node (403)
    ├── IdentityProviderUnavailable  the token issuer's keys cannot be read (503)
    ├── NotAcceptable             no representation the client accepts (406)
    ├── NotFound                  nothing there (404)
    │   └── UnknownNode           no PACS configured under that name
    ├── PoolExhausted             no association free within the wait limit (503)
    ├── TooManyJobs               every job slot holds a queued or running job (503)
    ├── JobNotReady               a job's result was asked for before it exists (409)
    ├── PacsError                 the PACS did not do what was asked
    │   ├── PacsUnavailable       cannot connect (503)
    │   ├── AssociationRejected   A-ASSOCIATE-RJ (502; 503 when the PACS says transient)
    │   ├── TlsHandshakeFailed    DICOM TLS refused: certificate, CA, protocol (502)
    │   ├── AssociationAborted    A-ABORT or connection lost mid-operation (502)
    │   ├── DimseTimeout          no answer within the configured time (504)
    │   ├── PacsFailureStatus     a DIMSE failure status; keeps code and comment (502)
    │   └── RetrieveIncomplete    instances announced or asked for did not all arrive (502)
    └── ConversionError           no honest single volume (NIfTI); keeps the reason (422)
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(GatewayError):
    """The request itself is malformed."""


class InvalidQuery(InvalidRequest):
    """A query parameter is malformed or unsupported."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"query parameter {parameter!r}: {message}")
        self.parameter = parameter


class Unauthenticated(GatewayError):
    """No credentials, or credentials that do not verify.

    ``invalid`` tells a missing credential (the client should authenticate) from
    a bad one (RFC 6750 §3.1 ``invalid_token``).
    """

    def __init__(self, message: str, *, invalid: bool = False) -> None:
        super().__init__(message)
        self.invalid = invalid


class Forbidden(GatewayError):
    """The authenticated principal may not use that node."""


class IdentityProviderUnavailable(GatewayError):
    """The token issuer's key set cannot be fetched: not the client's fault."""


class NotAcceptable(GatewayError):
    """None of the media types the client accepts can be produced (PS3.18 §8.7.7)."""


class NotFound(GatewayError):
    """The requested resource does not exist."""


class UnknownNode(NotFound):
    """No PACS node is configured under that name."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"no PACS node named {name!r} is configured; known nodes: {', '.join(known) or 'none'}"
        )
        self.name = name


class PoolExhausted(GatewayError):
    """Every association to the node stayed busy for longer than the wait limit."""

    def __init__(self, node: str, waited: float, retry_after: int = 1) -> None:
        super().__init__(
            f"PACS node {node!r} is busy: no association became free within {waited:.1f} s"
        )
        self.node = node
        self.retry_after = retry_after


class TooManyJobs(GatewayError):
    """Every job slot holds a job that has not finished yet."""

    def __init__(self, limit: int, retry_after: int = 5) -> None:
        super().__init__(
            f"the gateway already holds {limit} unfinished jobs (jobs_max); "
            "retry when one has finished"
        )
        self.retry_after = retry_after


class JobNotReady(GatewayError):
    """The job has no result (yet): it is still running, failed, or was not a NIfTI job."""


class PacsError(GatewayError):
    """The PACS did not perform the operation."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"PACS node {node!r}: {message}")
        self.node = node


class PacsUnavailable(PacsError):
    """The PACS cannot be reached (connection refused, unreachable, DNS)."""


class AssociationRejected(PacsError):
    """The PACS rejected the association (A-ASSOCIATE-RJ), e.g. unknown AE title.

    ``transient`` is the A-ASSOCIATE-RJ result "rejected-transient" (PS3.8 Table
    9-21, e.g. the PACS is at its association limit): trying later may work.
    """

    def __init__(self, node: str, message: str, *, transient: bool = False) -> None:
        super().__init__(node, message)
        self.transient = transient


class TlsHandshakeFailed(PacsError):
    """The TLS connection to the PACS could not be set up (certificate not trusted,
    client certificate refused, no TLS on that port): a configuration problem, so
    502 rather than a 503 that invites retrying."""


class AssociationAborted(PacsError):
    """The association was aborted or the connection dropped during an operation."""


class DimseTimeout(PacsError):
    """The PACS did not answer within the configured time."""


class PacsFailureStatus(PacsError):
    """The PACS answered with a DIMSE failure status (PS3.7 Annex C)."""

    def __init__(self, node: str, operation: str, status: int, comment: str | None) -> None:
        text = f"{operation} failed with status 0x{status:04X}"
        if comment:
            text += f" ({comment})"
        super().__init__(node, text)
        self.operation = operation
        self.status = status
        self.comment = comment


class ConversionError(GatewayError):
    """The series cannot be converted into one honest volume (NIfTI); ``reason`` says why.

    Raised for what a converter must not paper over: mixed orientations, matrix
    sizes, echoes or image types, missing or unevenly spaced slices, gantry tilt
    (sheared geometry), non-image objects and layouts that are not supported.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot convert the series to one volume: {reason}")
        self.reason = reason


class RetrieveIncomplete(PacsError):
    """A retrieve ended without every instance of what was asked (502 where it matters)."""

    def __init__(self, message: str, node: str = "") -> None:
        super().__init__(node or "?", message)
