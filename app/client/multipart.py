"""An incremental ``multipart/related`` reader (RFC 2046 §5.1.1) for WADO-RS bodies.

Parts are handed out one at a time and their bodies streamed in pieces, so a
study of any size passes through in bounded memory.  A part with a
``Content-Length`` is read by count; one without is read up to the next
delimiter.  ``complete`` tells whether the closing delimiter arrived: a gateway
that could not deliver everything leaves it out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

_CRLF = b"\r\n"


class MultipartError(ValueError):
    """The body is not the multipart message its Content-Type announced."""


@dataclass
class Part:
    headers: dict[str, str]
    _reader: MultipartReader = field(repr=False)
    _consumed: bool = False

    def chunks(self) -> Iterator[bytes]:
        """The body in pieces; read it whole before asking for the next part."""
        if self._consumed:
            raise MultipartError("a part's body can be read only once")
        self._consumed = True
        yield from self._reader._body(self.headers)


class MultipartReader:
    def __init__(self, chunks: Iterable[bytes], boundary: str) -> None:
        self._chunks = iter(chunks)
        self._buf = bytearray()
        self._delimiter = b"--" + boundary.encode("ascii")
        self.complete = False

    def _fill(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._buf += chunk
                return True
        return False

    def _need(self, n: int) -> bool:
        while len(self._buf) < n:
            if not self._fill():
                return False
        return True

    def _find(self, needle: bytes, start: int = 0) -> int:
        while True:
            at = self._buf.find(needle, start)
            if at >= 0:
                return at
            start = max(start, len(self._buf) - len(needle) + 1)
            if not self._fill():
                return -1

    def parts(self) -> Iterator[Part]:
        at = self._find(self._delimiter)
        if at < 0:
            return
        del self._buf[: at + len(self._delimiter)]
        while True:
            if not self._need(2):
                return
            if self._buf[:2] == b"--":
                self.complete = True
                return
            # Transport padding (linear white space) may follow a delimiter.
            end = self._find(_CRLF)
            if end < 0:
                return
            del self._buf[: end + 2]
            if not self._need(2):
                return
            if self._buf[:2] == _CRLF:  # a part without headers
                head = b""
                del self._buf[:2]
            else:
                head_end = self._find(_CRLF * 2)
                if head_end < 0:
                    return
                head = bytes(self._buf[:head_end])
                del self._buf[: head_end + 4]
            part = Part(_parse_headers(head), self)
            yield part
            if not part._consumed:
                for _ in part.chunks():
                    pass
            if not self._at_delimiter():
                return

    def _body(self, headers: dict[str, str]) -> Iterator[bytes]:
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit():
            left = int(length)
            while left > 0:
                if not self._buf and not self._fill():
                    raise MultipartError("the body ended inside a part")
                take = bytes(self._buf[:left])
                del self._buf[: len(take)]
                left -= len(take)
                yield take
            if not self._need(2) or self._buf[:2] != _CRLF:
                raise MultipartError("a part is longer than its Content-Length")
            return
        separator = _CRLF + self._delimiter
        while True:
            at = self._buf.find(separator)
            if at >= 0:
                if at:
                    yield bytes(self._buf[:at])
                del self._buf[:at]
                return
            # Keep what could be the start of the separator for the next round.
            safe = len(self._buf) - len(separator) + 1
            if safe > 0:
                yield bytes(self._buf[:safe])
                del self._buf[:safe]
            if not self._fill():
                raise MultipartError("the body ended inside a part")

    def _at_delimiter(self) -> bool:
        """Step over CRLF and the delimiter that follow a body."""
        separator = _CRLF + self._delimiter
        if not self._need(len(separator)):
            return False
        if bytes(self._buf[: len(separator)]) != separator:
            raise MultipartError("a part is not followed by the boundary")
        del self._buf[: len(separator)]
        return True


def _parse_headers(head: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise MultipartError(f"malformed part header {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


def boundary_of(content_type: str) -> str:
    """The ``boundary`` parameter of a Content-Type value."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"')
    raise MultipartError(f"no boundary in Content-Type {content_type!r}")
