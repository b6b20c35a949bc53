"""Logging set-up: text or JSON lines, each with the request id of the request it serves.

The request id lives in a context variable set by the HTTP middleware.  Tasks
inherit it, and the association pool runs DIMSE work with a copy of the
caller's context, so the C-FIND/C-MOVE log lines of a request carry its id.
Lines from threads no request started (the storage SCP, pynetdicom) have none.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

LogFormat = Literal["text", "json"]

_TEXT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class RequestIdFilter(logging.Filter):
    """Puts ``request_id`` on every record ("-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, thread."""

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": None if rid in (None, "-") else rid,
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: LogFormat = "text") -> None:
    """Replace the root logger's handlers with one stderr handler in *fmt*."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO; our own DIMSE lines say what matters.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
