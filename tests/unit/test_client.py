"""The command-line client's readers: multipart/related in pieces, Server-Sent Events, tables."""

from __future__ import annotations

import pytest

from app.api.jobs import SSE_HEARTBEAT, sse_message
from app.client.commands import cell, columns_for, format_table, parse_keys
from app.client.multipart import MultipartError, MultipartReader, boundary_of
from app.client.sse import SseEvent, iter_sse
from app.dicomweb import multipart

BOUNDARY = "b0undary"


def _message(parts: list[tuple[bytes, bool]], *, close: bool = True) -> bytes:
    """A body as the gateway writes it (with or without Content-Length per part)."""
    out = b""
    for index, (payload, with_length) in enumerate(parts):
        location = f"http://gw/studies/1/series/2/instances/1.{index}"
        if with_length:
            out += multipart.part_header(BOUNDARY, "application/dicom", location, len(payload))
        else:
            head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n"
            out += f"{head}Content-Location: {location}\r\n\r\n".encode()
        out += payload + multipart.part_trailer()
    return out + (multipart.closing(BOUNDARY) if close else b"")


def _read(body: bytes, size: int) -> tuple[list[tuple[dict[str, str], bytes]], bool]:
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    reader = MultipartReader(chunks, BOUNDARY)
    parts = [(p.headers, b"".join(p.chunks())) for p in reader.parts()]
    return parts, reader.complete


# Payloads that look like delimiters, or end where a delimiter might start.
PAYLOADS = [b"DICM" * 50, b"\r\n--b0undar", b"--b0undary", b"", b"x\r\n", bytes(range(256)) * 9]


@pytest.mark.parametrize("size", [1, 2, 7, 64, 4096])
@pytest.mark.parametrize("with_length", [True, False])
def test_multipart_parts_come_out_whole_whatever_the_chunking(size: int, with_length: bool) -> None:
    body = b"preamble to ignore\r\n" + _message([(p, with_length) for p in PAYLOADS])
    if not with_length:
        # Without a length a payload may not contain CRLF + delimiter (RFC 2046 5.1.1).
        body = body.replace(b"\r\n--b0undar\r\n--", b"\r\n--b0undax\r\n--")
    parts, complete = _read(body, size)
    assert complete
    expected = [p if p != b"\r\n--b0undar" or with_length else b"\r\n--b0undax" for p in PAYLOADS]
    assert [payload for _, payload in parts] == expected
    assert parts[1][0]["content-location"].endswith("/instances/1.1")


def test_multipart_without_closing_delimiter_is_incomplete() -> None:
    parts, complete = _read(_message([(b"one", True), (b"two", True)], close=False), 5)
    assert [p for _, p in parts] == [b"one", b"two"]
    assert not complete


def test_multipart_cut_inside_a_part_is_an_error() -> None:
    body = _message([(b"0123456789", True)])[:-20]  # 6 bytes of the payload remain
    reader = MultipartReader([body], BOUNDARY)
    part = next(reader.parts())
    with pytest.raises(MultipartError, match="ended inside a part"):
        b"".join(part.chunks())


def test_unread_parts_are_skipped() -> None:
    reader = MultipartReader([_message([(b"a" * 100, True), (b"b", False)])], BOUNDARY)
    headers = [p.headers for p in reader.parts()]
    assert len(headers) == 2 and reader.complete


def test_boundary_of_quoted_and_bare() -> None:
    assert boundary_of('multipart/related; type="application/dicom"; boundary="a b"') == "a b"
    assert boundary_of("multipart/related; boundary=xyz") == "xyz"
    with pytest.raises(MultipartError):
        boundary_of("application/dicom")


def test_sse_messages_round_trip_through_the_reader() -> None:
    stream = (
        sse_message('{"a":1}', event="progress", event_id=1)
        + SSE_HEARTBEAT
        + sse_message("line one\nline two", event="end", event_id=2)
        + b": comment only\n\n"
    )
    lines = stream.decode().split("\n")
    assert list(iter_sse(lines)) == [
        SseEvent("progress", '{"a":1}', "1"),
        SseEvent("end", "line one\nline two", "2"),
    ]
    # Each message ends with one blank line; no field runs over a line break.
    assert stream.count(b"\n\n") == 4
    assert sse_message("x") == b"data: x\n\n"


def test_cells_and_tables() -> None:
    name = {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen", "Ideographic": "x"}]}
    assert cell(name) == "Müller^Jürgen"
    assert cell({"vr": "CS", "Value": ["CT", "MR"]}) == "CT\\MR"
    assert cell({"vr": "IS", "Value": [3]}) == "3"
    assert cell({"vr": "LO"}) == "" and cell(None) == ""
    columns = columns_for("series", [("includefield", "BodyPartExamined,all"), ("00080070", "X")])
    assert columns[-2:] == [("BodyPartExamined", "00180015"), ("00080070", "00080070")]
    table = format_table(
        [{"00080060": {"vr": "CS", "Value": ["CT"]}, "0020000E": {"vr": "UI", "Value": ["1.2"]}}],
        columns_for("series", []),
    )
    head, row = table.splitlines()
    assert head.split() == ["Modality", "SeriesNumber", "SeriesDescription", "Instances",
                            "SeriesInstanceUID", "StudyInstanceUID"]  # fmt: skip
    assert row.split() == ["CT", "1.2"]
    assert head.index("SeriesInstanceUID") == row.index("1.2"), "columns line up"


def test_keys_must_be_key_value() -> None:
    assert parse_keys(["PatientName=DOE*", "StudyDate="]) == [
        ("PatientName", "DOE*"),
        ("StudyDate", ""),
    ]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_keys(["PatientName"])
