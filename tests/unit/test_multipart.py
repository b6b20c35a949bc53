"""multipart/related encoder: RFC 2046 syntax, PS3.18 §8.6.1.2 headers, what real parsers read."""

from __future__ import annotations

import email.parser
import email.policy
import io
import re
from collections.abc import Iterator

import pytest
import requests
from dicomweb_client.web import DICOMwebClient

from app.dicomweb.multipart import closing, content_type, new_boundary, part_header, part_trailer

BCHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]*[0-9A-Za-z'()+_,\-./:=?]")


def body(boundary: str, parts: list[tuple[str, str | None, bytes]]) -> bytes:
    out = b""
    for ctype, location, data in parts:
        out += part_header(boundary, ctype, location, len(data)) + data + part_trailer()
    return out + closing(boundary)


PARTS = [
    (
        "application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
        "http://gw/studies/1/series/2/instances/3",
        b"DICM" + bytes(range(256)) * 3,
    ),
    # Data that looks like a delimiter without being one, and CRLFs at the edges.
    ("application/octet-stream", None, b"\r\n--not-the-boundary\r\n\r\n"),
    # A part's transfer syntax is the one delivered, never "*".
    ("application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.80", "http://gw/f/3", b""),
]


# -- boundary ---------------------------------------------------------------------------------


def test_boundaries_are_unique_short_bchars() -> None:
    seen = {new_boundary() for _ in range(1000)}

    assert len(seen) == 1000
    for boundary in seen:
        assert 1 <= len(boundary) <= 70
        assert BCHARS.fullmatch(boundary)


@pytest.mark.parametrize("bad", ["", "x" * 71, "ends with space ", "semi;colon", 'q"uote', "é"])
def test_invalid_boundaries_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="boundary"):
        part_header(bad, "application/dicom", None, None)
    with pytest.raises(ValueError, match="boundary"):
        closing(bad)


# -- header and framing ---------------------------------------------------------------------


def test_content_type_header_value() -> None:
    assert (
        content_type("abc123", "application/dicom")
        == 'multipart/related; type="application/dicom"; boundary=abc123'
    )
    # A boundary that is not a token is quoted (RFC 2046 §5.1.1).
    assert content_type("a b:c", "application/octet-stream").endswith('boundary="a b:c"')


def test_content_type_refuses_parameters_in_type() -> None:
    # RFC 2387 §3.1: the type parameter is a bare media type.
    with pytest.raises(ValueError, match="bare"):
        content_type("b", "application/dicom; transfer-syntax=*")


def test_part_header_exact_bytes() -> None:
    header = part_header("b0", "application/dicom", "http://gw/x", 12)

    assert header == (
        b"--b0\r\nContent-Type: application/dicom\r\nContent-Location: http://gw/x\r\n"
        b"Content-Length: 12\r\n\r\n"
    )
    assert part_header("b0", "application/octet-stream", None, None) == (
        b"--b0\r\nContent-Type: application/octet-stream\r\n\r\n"
    )


def test_body_starts_with_the_boundary_and_ends_with_the_close_delimiter() -> None:
    # cornerstone and the JS dicomweb-client read the boundary from the first line.
    boundary = new_boundary()
    data = body(boundary, PARTS)

    assert data.startswith(f"--{boundary}\r\nContent-Type: ".encode())
    assert data.endswith(f"\r\n--{boundary}--\r\n".encode())
    # Header names are spelt exactly as cornerstone matches them.
    assert data.count(f"--{boundary}\r\nContent-Type: ".encode()) == len(PARTS)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Content-Type", "a/b\r\nX-Evil: 1"),
        ("Content-Location", "http://x/\n"),
        ("Content-Location", "http://x/é"),
    ],
)
def test_header_injection_is_refused(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        if name == "Content-Type":
            part_header("b", value, None, None)
        else:
            part_header("b", "a/b", value, None)


def test_negative_length_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        part_header("b", "a/b", None, -1)


# -- what parsers read ------------------------------------------------------------------------


def test_python_email_parser_reads_every_part() -> None:
    boundary = new_boundary()
    message = (
        f"Content-Type: {content_type(boundary, 'application/dicom')}\r\n\r\n".encode()
        + body(boundary, PARTS)
    )

    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(message)

    assert parsed.get_content_type() == "multipart/related"
    assert parsed.get_param("type") == "application/dicom"
    assert not parsed.defects
    parts = list(parsed.iter_parts())
    assert [p.get_payload(decode=True) for p in parts] == [data for _, _, data in PARTS]
    # The email package re-renders header values: compare what it understood.
    assert [p.get_content_type() for p in parts] == [c.split(";")[0] for c, _, _ in PARTS]
    assert [p.get_param("transfer-syntax") for p in parts] == [
        "1.2.840.10008.1.2.1",
        None,
        "1.2.840.10008.1.2.4.80",
    ]
    assert [p["Content-Location"] for p in parts] == [loc for _, loc, _ in PARTS]
    assert [int(p["Content-Length"]) for p in parts] == [len(data) for _, _, data in PARTS]
    assert parsed.preamble in (None, "")


def hand_parse(data: bytes, boundary: str) -> Iterator[tuple[dict[str, str], bytes]]:
    """Split as RFC 2046 §5.1.1 says: each delimiter is CRLF--boundary, the first
    one may lack the CRLF at the very start of the body."""
    assert data.startswith(b"--" + boundary.encode())
    segments = (b"\r\n" + data).split(b"\r\n--" + boundary.encode())
    assert segments[0] == b""
    assert segments[-1] == b"--\r\n"
    for segment in segments[1:-1]:
        assert segment.startswith(b"\r\n")
        head, _, payload = segment[2:].partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode("ascii").split("\r\n"))
        yield fields, payload


def test_hand_parser_and_content_length_agree() -> None:
    boundary = new_boundary()

    parsed = list(hand_parse(body(boundary, PARTS), boundary))

    assert [payload for _, payload in parsed] == [data for _, _, data in PARTS]
    for fields, payload in parsed:
        assert int(fields["Content-Length"]) == len(payload)


class _Raw(io.BytesIO):
    """A urllib3-less raw stream: requests reads it with read(chunk_size)."""


def _response(data: bytes, header: str) -> requests.Response:
    response = requests.Response()
    response.status_code = 200
    response.headers["content-type"] = header
    response.raw = _Raw(data)
    return response


@pytest.mark.parametrize("chunk_size", [7, 64, 10**6])
@pytest.mark.parametrize("stream", [False, True])
def test_dicomweb_client_decodes_our_parts(chunk_size: int, stream: bool) -> None:
    # The client's own decoder, fed in chunks that split delimiters.
    boundary = new_boundary()
    header = content_type(boundary, "application/octet-stream")
    client = DICOMwebClient(url="http://127.0.0.1:9/dicomweb", chunk_size=chunk_size)
    try:
        response = _response(body(boundary, PARTS), header)
        decoded = list(client._decode_multipart_message(response, stream=stream))
    finally:
        client._session.close()

    assert decoded == [data for _, _, data in PARTS]
