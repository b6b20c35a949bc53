"""DIMSE status codes (PS3.7 Annex C, PS3.4 C.4) and what they mean for a caller."""

from __future__ import annotations

from enum import Enum

SUCCESS = 0x0000
CANCEL = 0xFE00
PENDING = frozenset({0xFF00, 0xFF01})


class Category(Enum):
    SUCCESS = "success"
    PENDING = "pending"
    CANCEL = "cancel"
    WARNING = "warning"
    FAILURE = "failure"


# Meanings from PS3.4 C.4.1.1.4 (C-FIND), C.4.2.1.5 (C-MOVE), C.4.3.1.4 (C-GET).
_MEANINGS = {
    0x0000: "Success",
    0xFE00: "Cancelled",
    0xFF00: "Pending",
    0xFF01: "Pending (optional keys not supported)",
    0xB000: "Warning: sub-operations complete, one or more failures or warnings",
    0xB006: "Warning: elements discarded",
    0xB007: "Warning: data set does not match SOP class",
    0xA700: "Refused: out of resources",
    0xA701: "Refused: out of resources, unable to calculate number of matches",
    0xA702: "Refused: out of resources, unable to perform sub-operations",
    0xA801: "Refused: move destination unknown",
    0xA900: "Failed: identifier does not match SOP class",
    0x0122: "Refused: SOP class not supported",
    0x0124: "Refused: not authorized",
    0x0210: "Failed: duplicate invocation",
    0x0211: "Failed: unrecognized operation",
    0x0212: "Failed: mistyped argument",
}


def category(status: int) -> Category:
    if status == SUCCESS:
        return Category.SUCCESS
    if status in PENDING:
        return Category.PENDING
    if status == CANCEL:
        return Category.CANCEL
    if status == 0x0107 or status == 0x0116 or 0xB000 <= status <= 0xBFFF:
        return Category.WARNING
    return Category.FAILURE


def meaning(status: int) -> str:
    if status in _MEANINGS:
        return _MEANINGS[status]
    if 0xC000 <= status <= 0xCFFF:
        return "Failed: unable to process"
    if 0xA700 <= status <= 0xA7FF:
        return "Refused: out of resources"
    if category(status) is Category.WARNING:
        return "Warning"
    return "Unknown status"


def is_out_of_resources(status: int) -> bool:
    """A7xx: the PACS is overloaded; the request may succeed later (HTTP 503)."""
    return 0xA700 <= status <= 0xA7FF
