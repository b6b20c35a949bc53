"""Find the Study and Series Instance UIDs of a just-received data set, fast.

Every arrival is checked against the retrieve it claims to belong to before it
is kept.  Reading the file back with pydicom costs about 0.8 ms per instance,
a quarter of the receive budget; the two UIDs sit near the start of the data
set, so a walk over the element headers (skipping values) finds them in a few
microseconds.  Little-endian syntaxes only; anything unusual returns None and
the caller falls back to pydicom.
"""

from __future__ import annotations

import contextlib
import os
import struct

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Explicit VRs whose length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2).
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"SV",
    b"UV",
}


class _Stop(Exception):
    pass


def part10_study_series(head: bytes, transfer_syntax: str) -> tuple[str, str] | None:
    """As ``study_series_uids`` for the first bytes of a Part 10 file."""
    if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        return None
    # The file meta starts with its group length (PS3.10 7.1), explicit VR LE.
    (meta_length,) = struct.unpack_from("<I", head, 140)
    return study_series_uids(head[144 + meta_length :], transfer_syntax)


def study_series_uids(data: bytes, transfer_syntax: str) -> tuple[str, str] | None:
    """The two UIDs from the start of an encoded data set (no preamble, no file meta).

    Returns None when they are not both found before group 0020 ends, or the
    encoding is one this walker does not read (big endian, deflate).
    """
    if transfer_syntax.startswith("1.2.840.10008.1.2.1.99") or transfer_syntax == (
        "1.2.840.10008.1.2.2"
    ):
        return None
    implicit = transfer_syntax == IMPLICIT_VR_LE
    found: dict[int, str] = {}
    with contextlib.suppress(_Stop, struct.error, IndexError):
        _walk(data, 0, len(data), implicit, found, top=True)
    if _STUDY_UID in found and _SERIES_UID in found:
        return found[_STUDY_UID], found[_SERIES_UID]
    return None


def _header(data: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, offset of the value)."""
    group, elem = struct.unpack_from("<HH", data, pos)
    tag = (group << 16) | elem
    if group == 0xFFFE or implicit:
        (length,) = struct.unpack_from("<I", data, pos + 4)
        return tag, None, length, pos + 8
    vr = data[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        (length,) = struct.unpack_from("<I", data, pos + 8)
        return tag, vr, length, pos + 12
    (length,) = struct.unpack_from("<H", data, pos + 6)
    return tag, vr, length, pos + 8


def _walk(
    data: bytes, pos: int, end: int, implicit: bool, found: dict[int, str], *, top: bool
) -> int:
    """Walk elements from *pos*; return the offset after the last one read."""
    while pos < end:
        tag, _vr, length, value = _header(data, pos, implicit)
        if tag in (_ITEM_END, _SEQ_END):
            return value
        if top and tag > _SERIES_UID:
            raise _Stop
        if top and tag in (_STUDY_UID, _SERIES_UID):
            found[tag] = data[value : value + length].decode("ascii").rstrip("\0 ")
            if len(found) == 2:
                raise _Stop
        if length == _UNDEFINED:
            # A sequence (or encapsulated data) of undefined length: walk its
            # items to find where it ends.
            pos = _skip_undefined(data, value, implicit)
            continue
        pos = value + length
    return pos


def _skip_undefined(data: bytes, pos: int, implicit: bool) -> int:
    while True:
        tag, _vr, length, value = _header(data, pos, implicit)
        if tag == _SEQ_END:
            return value
        if tag != _ITEM:
            raise _Stop  # not a sequence layout we understand
        if length == _UNDEFINED:
            pos = _walk(data, value, len(data), implicit, {}, top=False)
        else:
            pos = value + length


def file_study_series(
    path: str | os.PathLike[str], transfer_syntax: str, *, head: bytes | None = None
) -> tuple[str, str]:
    """The Study and Series Instance UIDs a just-written Part 10 file declares: the
    header walk, or pydicom when the walk cannot tell (raises OSError/ValueError
    when neither can).  ``head``: the file's first bytes, if already read."""
    if head is None:
        with open(path, "rb") as f:
            head = f.read(65536)
    found = part10_study_series(head, transfer_syntax)
    if found is not None:
        return found
    from pydicom import dcmread

    ds = dcmread(
        path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"]
    )
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
