"""The one place where gateway errors become HTTP responses."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.audit import note
from app.api.deps import ClientGone
from app.dimse.status import is_out_of_resources, meaning
from app.errors import (
    AssociationAborted,
    AssociationRejected,
    ConversionError,
    DimseTimeout,
    Forbidden,
    GatewayError,
    IdentityProviderUnavailable,
    InvalidQuery,
    InvalidRequest,
    JobNotReady,
    NotAcceptable,
    NotFound,
    PacsError,
    PacsFailureStatus,
    PacsUnavailable,
    PoolExhausted,
    TooManyJobs,
    Unauthenticated,
)

log = logging.getLogger(__name__)


def _status_of(exc: GatewayError) -> int:
    if isinstance(exc, InvalidRequest):
        return 400
    if isinstance(exc, Unauthenticated):
        return 401
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, NotAcceptable):
        return 406
    if isinstance(exc, ConversionError):
        return 422
    if isinstance(exc, JobNotReady):
        return 409
    if isinstance(exc, PoolExhausted | PacsUnavailable | TooManyJobs | IdentityProviderUnavailable):
        return 503
    if isinstance(exc, AssociationRejected) and exc.transient:
        return 503
    if isinstance(exc, DimseTimeout):
        return 504
    if isinstance(exc, PacsFailureStatus):
        return 503 if is_out_of_resources(exc.status) else 502
    if isinstance(exc, AssociationRejected | AssociationAborted | PacsError):
        return 502
    return 500


def error_body(exc: GatewayError) -> dict[str, Any]:
    body: dict[str, Any] = {"error": type(exc).__name__, "message": exc.message}
    parameter = getattr(exc, "parameter", None)
    if parameter is not None:
        body["parameter"] = parameter
    if isinstance(exc, PacsError):
        body["node"] = exc.node
    if isinstance(exc, PacsFailureStatus):
        body["dimse_status"] = f"0x{exc.status:04X}"
        body["dimse_meaning"] = meaning(exc.status)
        if exc.comment:
            body["error_comment"] = exc.comment
    return body


def route_of(request: Request) -> str:
    """The route template (``/patients/{patient_id}/studies``), never the path itself:
    a path can carry a Patient ID, and patient identity stays out of the log."""
    route = request.scope.get("route")
    return str(getattr(route, "path", None) or "(no route)")


def _challenge(exc: Unauthenticated) -> str:
    # RFC 6750 §3: the scheme, and why when a credential was presented but failed.
    if not exc.invalid:
        return 'Bearer realm="dimse-gateway"'
    reason = exc.message.replace("\\", "").replace('"', "'")
    return f'Bearer realm="dimse-gateway", error="invalid_token", error_description="{reason}"'


async def _gateway_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    status = _status_of(exc)
    headers = {}
    if isinstance(exc, PoolExhausted | TooManyJobs):
        headers["Retry-After"] = str(exc.retry_after)
    elif status == 503:
        headers["Retry-After"] = "5"
    elif isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = _challenge(exc)
    note(request, error=type(exc).__name__)
    if status >= 500:
        log.warning("%s %s -> %d %s", request.method, route_of(request), status, exc.message)
    else:
        # Client mistakes: the message may quote a query value (a birth date, a name).
        log.info(
            "%s %s -> %d %s%s",
            request.method,
            route_of(request),
            status,
            type(exc).__name__,
            f" ({exc.parameter})" if isinstance(exc, InvalidQuery) else "",
        )
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return JSONResponse(
        {"error": "InvalidRequest", "message": "; ".join(problems) or "invalid request"},
        status_code=400,
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(
        {"error": "HTTPError", "message": str(exc.detail)},
        status_code=exc.status_code,
        headers=dict(exc.headers or {}),
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    note(request, error="InternalError")
    log.exception("unexpected error on %s %s", request.method, route_of(request))
    return JSONResponse(
        {"error": "InternalError", "message": "the gateway hit an unexpected error; see its log"},
        status_code=500,
    )


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody reads it; nginx's 499 makes the access log say what happened.
    note(request, error="ClientGone")
    return Response(status_code=499)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
