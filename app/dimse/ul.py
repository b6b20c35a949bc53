"""The DICOM upper layer (PS3.8 §9.3) and DIMSE command sets (PS3.7 §6.3, §9.3),
as bytes: the PDUs and items both our acceptor (the storage SCP) and our requestor
(query/retrieve associations) build and parse, with no objects per PDU.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import Final

#: Our implementation identification (PS3.7 D.3.3.2), also written into every file meta.
IMPLEMENTATION_CLASS_UID: Final = "2.25.170694004349033104265090731841606743686"
IMPLEMENTATION_VERSION_NAME: Final = "DIMSEGW_SCP_1"


APPLICATION_CONTEXT: Final = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1


# PDU types (PS3.8 §9.3)
A_ASSOCIATE_RQ: Final = 0x01
A_ASSOCIATE_AC: Final = 0x02
A_ASSOCIATE_RJ: Final = 0x03
P_DATA_TF: Final = 0x04
A_RELEASE_RQ: Final = 0x05
A_RELEASE_RP: Final = 0x06
A_ABORT: Final = 0x07
# A-ABORT source/reason (PS3.8 Table 9-26)
ABORT_SOURCE_USER: Final = 0
ABORT_SOURCE_PROVIDER: Final = 2
ABORT_REASON_NOT_SPECIFIED: Final = 0
ABORT_UNRECOGNIZED_PDU: Final = 1
ABORT_UNEXPECTED_PDU: Final = 2
ABORT_INVALID_PARAMETER: Final = 6
# A-ASSOCIATE-RJ result/source/reason (PS3.8 Table 9-21)
RJ_PERMANENT: Final = 1
RJ_TRANSIENT: Final = 2
RJ_SOURCE_USER: Final = 1
RJ_SOURCE_ACSE: Final = 2
RJ_SOURCE_PRESENTATION: Final = 3
# Presentation context results (PS3.8 Table 9-18)
PC_ACCEPTANCE: Final = 0
PC_USER_REJECTION: Final = 1
PC_ABSTRACT_SYNTAX_NOT_SUPPORTED: Final = 3
PC_TRANSFER_SYNTAXES_NOT_SUPPORTED: Final = 4
# DIMSE command fields (PS3.7 Annex E)
C_STORE_RQ: Final = 0x0001
C_STORE_RSP: Final = 0x8001
C_ECHO_RQ: Final = 0x0030
C_ECHO_RSP: Final = 0x8030
C_CANCEL_RQ: Final = 0x0FFF
C_FIND_RQ: Final = 0x0020
C_FIND_RSP: Final = 0x8020
C_GET_RQ: Final = 0x0010
C_GET_RSP: Final = 0x8010
C_MOVE_RQ: Final = 0x0021
C_MOVE_RSP: Final = 0x8021
NO_DATA_SET: Final = 0x0101
DATA_SET_PRESENT: Final = 0x0001  # any value but 0101H (PS3.7 Table E.1-1)

# Command set elements (PS3.7 Annex E), as the element numbers of group 0000
AFFECTED_SOP_CLASS_UID: Final = 0x0002
COMMAND_FIELD: Final = 0x0100
MESSAGE_ID: Final = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO: Final = 0x0120
MOVE_DESTINATION: Final = 0x0600
PRIORITY: Final = 0x0700
COMMAND_DATA_SET_TYPE: Final = 0x0800
STATUS: Final = 0x0900
ERROR_COMMENT: Final = 0x0902
AFFECTED_SOP_INSTANCE_UID: Final = 0x1000
REMAINING: Final = 0x1020
COMPLETED: Final = 0x1021
FAILED: Final = 0x1022
WARNING: Final = 0x1023
UID_CHARS = re.compile(r"[0-9.]{1,64}")
PDU_HEADER = struct.Struct(">BBI")
PDV_HEADER = struct.Struct(">IBB")
ITEM_HEADER = struct.Struct(">BBH")
ELEMENT_HEADER = struct.Struct("<HHI")
US = struct.Struct("<H")
UL = struct.Struct("<I")


def pad_uid(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def pad_text(text: str) -> bytes:
    raw = text.encode("latin-1", "replace")
    return raw + b" " if len(raw) % 2 else raw


def item(item_type: int, value: bytes) -> bytes:
    return ITEM_HEADER.pack(item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    return PDU_HEADER.pack(pdu_type, 0, len(body)) + body


def a_associate_rj(result: int, source: int, reason: int) -> bytes:
    return pdu(A_ASSOCIATE_RJ, bytes((0, result, source, reason)))


def a_abort(source: int, reason: int) -> bytes:
    return pdu(A_ABORT, bytes((0, 0, source, reason)))


A_RELEASE_RP_PDU: Final = pdu(A_RELEASE_RP, b"\x00\x00\x00\x00")


def encode_command(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """An Implicit VR Little Endian group 0000 command set with its group length."""
    body = b"".join(ELEMENT_HEADER.pack(0, elem, len(value)) + value for elem, value in elements)
    return ELEMENT_HEADER.pack(0, 0x0000, 4) + UL.pack(len(body)) + body


def response(
    command_field: int,
    message_id: int,
    status: int,
    sop_class_uid: str | None,
    sop_instance_uid: str | None,
) -> bytes:
    """A DIMSE-C response command set (PS3.7 §9.3), elements in ascending tag order."""
    elements: list[tuple[int, bytes]] = []
    if sop_class_uid:
        elements.append((AFFECTED_SOP_CLASS_UID, pad_uid(sop_class_uid)))
    elements += [
        (COMMAND_FIELD, US.pack(command_field)),
        (MESSAGE_ID_BEING_RESPONDED_TO, US.pack(message_id)),
        (COMMAND_DATA_SET_TYPE, US.pack(NO_DATA_SET)),
        (STATUS, US.pack(status)),
    ]
    if sop_instance_uid:
        elements.append((AFFECTED_SOP_INSTANCE_UID, pad_uid(sop_instance_uid)))
    return encode_command(elements)


class ProtocolError(Exception):
    """The peer broke PS3.8/PS3.7: answer with an A-ABORT carrying ``reason``."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


def uid(raw: bytes | memoryview) -> str:
    try:
        return bytes(raw).decode("ascii").rstrip("\x00 ").lstrip(" ")
    except UnicodeDecodeError:
        raise ProtocolError("non-ASCII UID in a PDU item") from None


def ae(raw: bytes) -> str:
    return raw.decode("latin-1").strip(" \x00")


def items(data: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    """Split a run of ``type, reserved, length(2), value`` items."""
    found = []
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise ProtocolError("truncated PDU item header")
        item_type, _, length = ITEM_HEADER.unpack_from(data, pos)
        pos += 4
        if pos + length > end:
            raise ProtocolError(f"PDU item 0x{item_type:02X} overruns its PDU")
        found.append((item_type, data[pos : pos + length]))
        pos += length
    return found


def parse_command(data: bytes) -> dict[int, bytes]:
    """The elements of an Implicit VR Little Endian command set (PS3.7 §6.3.1)."""
    elements: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise ProtocolError("truncated command set element")
        group, elem, length = ELEMENT_HEADER.unpack_from(data, pos)
        pos += 8
        if length > end - pos:
            raise ProtocolError("command set element overruns the command set")
        if group == 0x0000:
            elements[elem] = data[pos : pos + length]
        pos += length
    return elements


def us(elements: dict[int, bytes], elem: int) -> int | None:
    raw = elements.get(elem)
    if raw is None or len(raw) == 0:
        return None
    if len(raw) != 2:
        raise ProtocolError(f"command element (0000,{elem:04X}) is not a US value")
    value: int = US.unpack(raw)[0]
    return value


def valid_uid(value: str | None) -> str | None:
    """``value`` if it has the form of a UID (digits and dots, at most 64), else None."""
    return value if value and UID_CHARS.fullmatch(value) else None


def text(elements: dict[int, bytes], elem: int) -> str | None:
    raw = elements.get(elem)
    if raw is None:
        return None
    return raw.decode("latin-1").strip(" \x00") or None
