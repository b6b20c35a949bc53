"""multipart/related encoding of WADO-RS responses (PS3.18 §8.6.1.2, RFC 2046 §5.1, RFC 2387).

A response body is built as::

    part_header(b, ...) + data + part_trailer()     once per part
    closing(b)                                      once at the end

which gives ``--b CRLF headers CRLF CRLF data CRLF --b CRLF ... data CRLF --b-- CRLF``:
the CRLF after each part's data is the first half of the next delimiter
(RFC 2046 §5.1.1: the CRLF before a boundary belongs to the boundary).

Constraints from real clients (CONFORMANCE-NOTES §3.3):

- the body starts with ``--boundary``, without a preamble: cornerstone's and the
  JavaScript dicomweb-client's parsers take the boundary from the first line of
  the body (the latter looks only at the first 1000 bytes);
- part header names are spelt exactly ``Content-Type``, ``Content-Location`` and
  ``Content-Length``: cornerstone looks for ``Content-Type:`` case-sensitively.

The functions return ``bytes`` ready to send; they do not copy part data, so a
caller streaming files sends the header, the file and the trailer as separate
messages (PEERS.md, "Streaming a cached series over HTTP").
"""

from __future__ import annotations

import re
import uuid

# RFC 2046 §5.1.1: boundary := 0*69<bchars> bcharsnospace, at most 70 characters.
_MAX_BOUNDARY = 70
_BCHARS_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
# RFC 9110 §5.6.2 token characters: a boundary made of these needs no quotes.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# type "/" subtype, without parameters (RFC 2387 §3.1: type is a bare media type).
_MEDIA_TYPE_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+/[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_TRAILER = b"\r\n"


def new_boundary() -> str:
    """A fresh boundary: 32 lowercase hex digits of a random UUID.

    Hex digits are bchars and tokens, so the boundary needs no quoting in the
    Content-Type header (RFC 2046 §5.1.1) and cannot occur by chance in a part
    (2**-122 per position).
    """
    return uuid.uuid4().hex


def content_type(boundary: str, part_type: str) -> str:
    """The response's Content-Type header value (PS3.18 §8.6.1.2, RFC 2387 §3).

    ``content_type(b, "application/dicom")`` is
    ``multipart/related; type="application/dicom"; boundary=b``. *part_type* is
    a bare ``type/subtype``: RFC 2387 §3.1 allows no parameters in ``type``
    (per-part parameters such as ``transfer-syntax`` go into each part's header).
    The type is always quoted, which every client reads (quotes are optional,
    PS3.18 §8.7.1); the boundary is quoted only if it is not a token.
    """
    _check_boundary(boundary)
    if not _MEDIA_TYPE_RE.fullmatch(part_type):
        raise ValueError(f"part type must be a bare type/subtype, not {part_type!r}")
    shown = boundary if _TOKEN_RE.fullmatch(boundary) else f'"{boundary}"'
    return f'multipart/related; type="{part_type}"; boundary={shown}'


def part_header(
    boundary: str,
    content_type: str,
    content_location: str | None,
    content_length: int | None,
) -> bytes:
    """The delimiter and header fields that open one part (PS3.18 §8.6.1.2, Table 8.6.1-1).

    ``--boundary CRLF Content-Type: ... CRLF [Content-Location: ... CRLF]
    [Content-Length: N CRLF] CRLF``. Send the part's data and ``part_trailer()``
    after it. The first part's header is the first thing in the body.
    Content-Location carries the URL of the instance, frame or bulk data
    (Table 8.6.1-1); Content-Length lets a client allocate once.
    """
    _check_boundary(boundary)
    lines = [f"--{boundary}", f"Content-Type: {_header_value('Content-Type', content_type)}"]
    if content_location is not None:
        lines.append(f"Content-Location: {_header_value('Content-Location', content_location)}")
    if content_length is not None:
        if content_length < 0:
            raise ValueError(f"Content-Length cannot be negative: {content_length}")
        lines.append(f"Content-Length: {content_length}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("ascii")


def part_trailer() -> bytes:
    """The CRLF that ends a part's data; it is the first half of the next delimiter."""
    return _TRAILER


def closing(boundary: str) -> bytes:
    """The close delimiter that ends the body: ``--boundary-- CRLF`` (RFC 2046 §5.1.1).

    It follows the last part's ``part_trailer()``. A body needs at least one part
    (RFC 2046 §5.1.1); an empty result is the caller's 404, not an empty multipart.
    """
    _check_boundary(boundary)
    return f"--{boundary}--\r\n".encode("ascii")


def _check_boundary(boundary: str) -> None:
    if len(boundary) > _MAX_BOUNDARY or not _BCHARS_RE.fullmatch(boundary):
        raise ValueError(f"not a valid multipart boundary (1-70 bchars): {boundary!r}")


def _header_value(name: str, value: str) -> str:
    # A CR or LF would end the header early and let the value inject fields or
    # a fake part; header values are ASCII (URLs are percent-encoded).
    if "\r" in value or "\n" in value or not value.isascii():
        raise ValueError(f"{name} value must be ASCII on one line: {value!r}")
    return value
