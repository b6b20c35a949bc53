"""The audit log: one JSON line per search, retrieve, NIfTI and job request.

Each line says when (UTC), who (principal, client address), where (node), what
(kind, level, resource, the UIDs in the path, the query keys) and how it ended
(HTTP status, count of matches or instances, bytes sent, whether the body was
sent whole, the error class) and how long it took, measured to the last byte
of the body.  Query *values* may name patients, so they are left out unless
``audit_query_values`` is set; a Patient ID from the path likewise.

Handlers and dependencies add what only they know through ``note``; the
middleware writes the line just before the last body message is sent (so a
client holding its whole answer finds the line written), or when the request
ends any other way (client gone, error).
Lines are appended with one ``write`` on an ``O_APPEND`` descriptor, so they
never interleave and ``logrotate``'s ``copytruncate`` works.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_KEY = "dimse_gateway.audit"
_KINDS = {
    "app.api.search": "search",
    "app.api.retrieve": "retrieve",
    "app.api.rendered": "retrieve",
    "app.api.nifti": "nifti",
    "app.api.jobs": "job",
}
_SEARCH_LEVELS = {"patients": "patient", "studies": "study", "series": "series"}
_SEARCH_LEVELS["instances"] = "instance"
_UID_PARAMS = ("study", "series", "instance")
_QUERY_UIDS = {
    "studyinstanceuid": "study",
    "0020000d": "study",
    "seriesinstanceuid": "series",
    "0020000e": "series",
    "sopinstanceuid": "instance",
    "00080018": "instance",
}


def note(request: Request, **fields: Any) -> None:
    """Add *fields* to this request's audit record (nothing when auditing is off)."""
    record = request.scope.get(_KEY)
    if record is not None:
        record.update(fields)


def add_count(request: Request, n: int = 1) -> None:
    """Count matches or instances delivered (streamed bodies count as they go)."""
    record = request.scope.get(_KEY)
    if record is not None:
        record["count"] = record.get("count", 0) + n


class AuditLog:
    """The audit file, opened for appending while the app runs."""

    def __init__(self, path: Path, *, query_values: bool = False) -> None:
        self.path = path
        self.query_values = query_values
        self._fd: int | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Readable by the owner and its group only: it says who looked at what.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            return
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True) + "\n"
        os.write(self._fd, line.encode("ascii"))


def _where(scope: Scope) -> tuple[str, str, str] | None:
    """(kind, level, resource) of an audited route, None for the others."""
    route = scope.get("route")
    endpoint = getattr(route, "endpoint", None)
    kind = _KINDS.get(getattr(endpoint, "__module__", ""))
    if kind is None or route is None:
        return None
    template: str = getattr(route, "path", "")
    parts = [p for p in template.split("/") if p]
    parts = parts[parts.index("dicomweb") + 1 :] if "dicomweb" in parts else parts
    literals = [p for p in parts if not p.startswith("{")]
    if kind == "search":
        return kind, _SEARCH_LEVELS.get(literals[-1], literals[-1]), "search"
    if kind == "nifti":
        return kind, "series", literals[-1]
    if kind == "job":
        return kind, "job", literals[-1]
    params = [p.strip("{}") for p in parts if p.startswith("{")]
    level = next((p for p in reversed(params) if p in _UID_PARAMS), "study")
    last = parts[-1]
    if last.startswith("{"):
        resource = {"{frames}": "frames", "{tag_path:path}": "bulkdata"}.get(last, "instances")
    else:
        resource = last  # metadata, rendered, thumbnail
    return kind, level, resource


class AuditMiddleware:
    """Pure ASGI, so streamed bodies pass through untouched and are timed to the end."""

    def __init__(self, app: ASGIApp, log: AuditLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "principal": None,
            "client": (scope.get("client") or ("?",))[0],
        }
        scope[_KEY] = record
        outcome: dict[str, Any] = {"status": None, "bytes": 0, "complete": False}
        written = False

        def write() -> None:
            nonlocal written
            where = _where(scope)
            if where is not None and not written:
                written = True
                self._write(scope, record, outcome, where, time.monotonic() - started)

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
            elif message["type"] == "http.response.body":
                outcome["bytes"] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    outcome["complete"] = True
                    # Before the last bytes leave: a client that has its whole
                    # answer finds the line already written.
                    write()
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            # Answered by the outermost error handler (500), after this point.
            if outcome["status"] is None:
                outcome["status"] = 500
            raise
        finally:
            write()

    def _write(
        self,
        scope: Scope,
        record: dict[str, Any],
        outcome: dict[str, Any],
        where: tuple[str, str, str],
        elapsed: float,
    ) -> None:
        kind, level, resource = where
        params = scope.get("path_params", {})
        line: dict[str, Any] = {
            "time": record.pop("time"),
            "principal": record.pop("principal"),
            "client": record.pop("client"),
            "node": record.pop("node", None),
            "kind": kind,
            "level": level,
            "resource": resource,
        }
        uids = {name: params[name] for name in _UID_PARAMS if name in params}
        query = Request(scope).query_params.multi_items()
        for name, value in query:
            which = _QUERY_UIDS.get(name.lower())
            if which and which not in uids:
                uids[which] = value
        uids.update(record.pop("uids", {}))
        line.update({f"{name}_uid": uid for name, uid in uids.items()})
        if query:
            if self.log.query_values:
                line["query"] = [[name, value] for name, value in query]
            else:
                line["query_keys"] = sorted({name for name, _ in query})
        if self.log.query_values and "patient_id" in params:
            line["patient_id"] = params["patient_id"]
        line["status"] = outcome["status"]
        line.update(record)
        line["bytes"] = outcome["bytes"]
        line["complete"] = outcome["complete"]
        line["duration_ms"] = round(elapsed * 1000, 1)
        self.log.write(line)
