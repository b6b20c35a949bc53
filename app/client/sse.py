"""A Server-Sent Events reader (HTML Living Standard §9.2.6, "Interpreting an event stream")."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class SseEvent:
    event: str
    data: str
    id: str | None


def iter_sse(lines: Iterable[str]) -> Iterator[SseEvent]:
    """Events from the lines of a stream (line breaks already removed).

    Comment lines (heartbeats) are skipped; a message without data is not an
    event, as the standard says.
    """
    event, data, last_id = "", list[str](), None
    for line in lines:
        if not line:
            if data:
                yield SseEvent(event or "message", "\n".join(data), last_id)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
