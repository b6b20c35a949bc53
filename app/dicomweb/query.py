"""QIDO-RS query parameters parsed into a query model (PS3.18 §8.3.4, Table 8.3.4-1).

The model is framework-free: routers hand over the resource level, the UIDs from
the path and the raw ``(name, value)`` pairs; everything else is decided here,
and every refusal names the parameter at fault.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_has_tag, tag_for_keyword

from app.dicomweb.attributes import (
    ALL_RETURN,
    DEFAULT_RETURN,
    QUERY_CONTROL,
    UNIQUE_KEY,
    Level,
    keyword,
    level_of,
    vr_of,
)
from app.errors import InvalidQuery, InvalidRequest

# \Z, not $: "$" also matches before a trailing newline. ASCII: \d is any script's digit.
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z", re.ASCII)
_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}\Z", re.ASCII)
_IS = re.compile(r"^[+-]?\d{1,12}\Z", re.ASCII)
_DS = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\Z", re.ASCII)
_DATE = re.compile(r"^\d{8}\Z", re.ASCII)
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?\Z", re.ASCII)
_DATETIME = re.compile(
    r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?\Z", re.ASCII
)

# Parameters that are not attribute matches.  accept/charset steer the response
# (PS3.18 §8.3.3); emptyvaluematching/multiplevaluematching are acknowledged with
# a Warning when asked for, as §8.3.4.5-6 require of a server without them.
_CONTROL_PARAMS = {
    "includefield",
    "fuzzymatching",
    "limit",
    "offset",
    "accept",
    "charset",
    "emptyvaluematching",
    "multiplevaluematching",
}

# VRs for which "*" and "?" are wild cards (PS3.4 C.2.2.2.4).
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
RANGE_VRS = frozenset({"DA", "TM", "DT"})
# The VRs a C-FIND key may carry a value for; binary and numeric VRs, AT and
# the item delimiters (VR "NONE") have no string form to match against.
_MATCHABLE_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "SQ", "ST", "TM"}
    | {"UC", "UI", "UR", "UT"}
)
# Maximum value lengths in characters (PS3.5 Table 6.2-1); PN per component group.
_MAX_CHARS = {
    "AE": 16,
    "CS": 16,
    "DS": 16,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
}
_AS = re.compile(r"^\d{3}[DWMY]\Z", re.ASCII)
# Control characters are refused in every key; LT, ST and UT values may hold
# TAB, LF, FF and CR (PS3.5 6.1.3), the other text VRs none.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_IN_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_IS_RANGE = range(-(2**31), 2**31)
# Only these VRs take characters beyond ASCII (SpecificCharacterSet, PS3.5
# 6.1.2.3); the others are limited to the default repertoire.
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})


def valid_uid(value: str) -> bool:
    """A UID is dot-separated numbers without leading zeros, at most 64 chars (PS3.5 9.1)."""
    return 0 < len(value) <= 64 and UID_RE.match(value) is not None


def check_uid(parameter: str, value: str) -> str:
    """Return *value* if it is a valid UID, else raise InvalidQuery naming *parameter*."""
    if not valid_uid(value):
        raise InvalidQuery(parameter, f"{value[:80]!r} is not a valid DICOM UID")
    return value


def check_patient_id(value: str) -> str:
    """A Patient ID in a path is one literal LO value (PS3.5 6.2): no wildcards, no
    backslash, no control characters, at most 64 characters."""
    if not value.strip():
        raise InvalidQuery("patient_id", "must not be empty")
    if len(value) > 64:
        raise InvalidQuery("patient_id", "a Patient ID has at most 64 characters")
    if any(c in "*?\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidQuery(
            "patient_id", "must be one literal Patient ID (no wildcards, backslash or controls)"
        )
    return value


@dataclass(frozen=True)
class MatchKey:
    """One attribute match, with the value already in C-FIND syntax.

    ``path`` is the tag path: one tag for a top-level attribute, two for a
    sequence item attribute (``RequestAttributesSequence.ScheduledProcedureStepID``).
    """

    path: tuple[int, ...]
    vr: str
    value: str
    level: Level
    parameter: str

    @property
    def tag(self) -> int:
        return self.path[0]

    @property
    def is_universal(self) -> bool:
        return self.value == ""

    @property
    def has_wildcard(self) -> bool:
        return self.vr in WILDCARD_VRS and ("*" in self.value or "?" in self.value)


@dataclass
class QidoQuery:
    """A parsed QIDO-RS search."""

    level: Level
    matches: list[MatchKey] = field(default_factory=list)
    includefields: set[int] = field(default_factory=set)
    include_all: bool = False
    fuzzymatching: bool = False
    limit: int | None = None
    offset: int = 0
    warnings: list[str] = field(default_factory=list)
    # A match key contradicts a UID in the URL: the answer is empty by definition.
    contradictory: bool = False
    # Set when the node's max_limit cut the client's limit (said in a Warning).
    limit_note: str | None = None

    @property
    def filters(self) -> bool:
        """Whether any key narrows the search (a value that is not empty or only ``*``)."""
        return any(k.value and k.value.strip("*") for k in self.matches)

    def match(self, tag: int) -> MatchKey | None:
        for key in self.matches:
            if key.path == (tag,):
                return key
        return None

    def return_tags(self, level: Level) -> set[int]:
        """Tags the answer at *level* carries: defaults, includefields and match keys."""
        tags = set(DEFAULT_RETURN[level])
        if self.include_all:
            tags |= ALL_RETURN[level]
        tags |= {t for t in self.includefields if level_of(t) is level}
        tags |= {k.tag for k in self.matches if k.level is level}
        tags.add(UNIQUE_KEY[level])
        return tags

    def result_tags(self) -> set[int]:
        """Every tag a result object may hold: the query level and, for relational
        resources, the levels above it that the resource adds (PS3.18 §10.6.3.3)."""
        tags = self.return_tags(self.level)
        for lvl in self.context_levels:
            tags |= self.return_tags(lvl)
        return tags

    @property
    def context_levels(self) -> list[Level]:
        """Upper levels whose attributes a result object also carries."""
        return list(self._context_levels)

    _context_levels: tuple[Level, ...] = ()


def _parse_attribute(name: str, parameter: str | None = None) -> tuple[int, ...]:
    """The tag path of an attribute ID (PS3.18 §8.3.4.1); errors name *parameter*
    (default: *name* itself), e.g. ``includefield`` for one of its entries."""
    parameter = parameter or name
    where = "" if parameter == name else f"{name[:80]!r}: "
    parts = name.split(".")
    if len(parts) > 2 or not all(parts):
        raise InvalidQuery(
            parameter, f"{where}only one sequence level is supported (Sequence.Attribute)"
        )
    path: list[int] = []
    for part in parts:
        if _HEX_TAG.match(part):
            tag = int(part, 16)
            if tag & 0x00010000:
                raise InvalidQuery(parameter, f"{where}private attributes cannot be searched")
            if not dictionary_has_tag(tag):
                raise InvalidQuery(
                    parameter, f"{where}{part} is not a DICOM attribute this gateway knows"
                )
        else:
            found = tag_for_keyword(part)
            if found is None:
                raise InvalidQuery(
                    parameter, f"{where}{part[:80]!r} is not a DICOM attribute keyword"
                )
            tag = int(found)
        if tag >> 16 in (0x0000, 0x0002, 0xFFFE) or not tag & 0xFFFF:
            # Command and File Meta elements, group lengths and item delimiters
            # are not data set attributes; in an Identifier they would corrupt it.
            raise InvalidQuery(parameter, f"{where}{keyword(tag)} is not a data set attribute")
        path.append(tag)
    if len(path) == 2 and vr_of(path[0]) != "SQ":
        raise InvalidQuery(parameter, f"{where}{keyword(path[0])} is not a sequence")
    return tuple(path)


def _bool(name: str, value: str) -> bool:
    low = value.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no", ""):
        return False
    raise InvalidQuery(name, f"expected true or false, got {value[:40]!r}")


def _non_negative(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InvalidQuery(name, f"expected a whole number, got {value[:40]!r}") from None
    if number < 0:
        raise InvalidQuery(name, "must not be negative")
    return number


def _check_range(name: str, vr: str, value: str) -> str:
    """Validate a DA/TM/DT single value or range (PS3.4 C.2.2.2.5)."""
    pattern = {"DA": _DATE, "TM": _TIME, "DT": _DATETIME}[vr]
    if vr == "TM":
        value = value.replace(":", "")
    if pattern.match(value):
        # A DT such as 20240105103000-0500 is one value with a UTC offset, not a range.
        _check_calendar(name, vr, value)
        return value
    for i, char in enumerate(value):
        if char != "-":
            continue
        low, high = value[:i], value[i + 1 :]
        if (low or high) and all(not end or pattern.match(end) for end in (low, high)):
            break
    else:
        raise InvalidQuery(name, f"{value[:40]!r} is not a valid {vr} value or range")
    for end in (low, high):
        if end:
            _check_calendar(name, vr, end)
    if low and high and vr != "DT" and _lower_bound(vr, low) > _upper_bound(vr, high):
        raise InvalidQuery(name, "the range starts after it ends")
    return f"{low}-{high}"


def _lower_bound(vr: str, value: str) -> str:
    # A value stands for its whole precision: TM "09" is 09:00:00 to 09:59:59.
    return value.split(".")[0].ljust(8 if vr == "DA" else 6, "0")


def _upper_bound(vr: str, value: str) -> str:
    return value.split(".")[0].ljust(8 if vr == "DA" else 6, "9")


def _check_calendar(name: str, vr: str, value: str) -> None:
    if vr == "DA":
        month, day = int(value[4:6]), int(value[6:8])
        if not (1 <= month <= 12 and 1 <= day <= 31):
            raise InvalidQuery(name, f"{value!r} is not a calendar date")
    elif vr == "TM":
        parts = [int(value[i : i + 2]) for i in range(0, min(len(value), 6), 2)]
        if any(p >= limit for p, limit in zip(parts, (24, 60, 61), strict=False)):
            raise InvalidQuery(name, f"{value!r} is not a time of day")


def _match_value(name: str, path: tuple[int, ...], raw: str) -> tuple[str, str]:
    tag = path[-1]
    vr = vr_of(tag)
    if vr not in _MATCHABLE_VRS:
        raise InvalidQuery(name, f"attributes of VR {vr} cannot be matched")
    if vr == "SQ":
        if raw:
            raise InvalidQuery(name, "a sequence can only be asked for, not matched directly")
        return vr, ""
    value = raw
    if vr == "UI" and value:
        # PS3.18 separates UID lists with commas; OHIF sends backslashes.
        uids = [u.strip() for u in re.split(r"[,\\]", value)]
        for uid in uids:
            check_uid(name, uid)
        value = "\\".join(uids)
    elif vr in RANGE_VRS and value:
        value = _check_range(name, vr, value)
    elif vr in ("IS", "DS") and value and not (_IS if vr == "IS" else _DS).match(value):
        raise InvalidQuery(name, f"{value[:40]!r} is not a valid {vr} number")
    elif vr == "IS" and value and int(value) not in _IS_RANGE:
        raise InvalidQuery(name, f"{value[:40]!r} is out of the range of an IS value")
    elif vr == "AS" and value and not _AS.match(value):
        raise InvalidQuery(name, f"{value[:40]!r} is not an age such as 045Y")
    if vr == "CS" and ("," in value or "\\" in value):
        # A comma is not a CS character (PS3.5 Table 6.2-1): the only reading is
        # a list, as for UIDs (OHIF's modality filter sends ModalitiesInStudy=CT,MR).
        codes = [code.strip() for code in re.split(r"[,\\]", value)]
        if not all(codes):
            raise InvalidQuery(name, "a list of codes has an empty entry")
        for code in codes:
            _check_code(name, code)
        return vr, "\\".join(codes)
    if "\\" in value and vr != "UI":
        raise InvalidQuery(name, "lists of values are only supported for UIDs and codes (CS)")
    if (_CONTROL_IN_TEXT if vr in ("LT", "ST", "UT") else _CONTROL).search(value):
        raise InvalidQuery(name, "control characters are not allowed in a value")
    if vr not in _CHARSET_VRS and not value.isascii():
        raise InvalidQuery(name, f"a {vr} value holds ASCII characters only")
    if len(value) > 1024:
        raise InvalidQuery(name, "value is too long")
    if vr == "PN":
        value = _short_name(value)
    _check_length(name, vr, value)
    return vr, value


def _short_name(value: str) -> str:
    """A PN key without trailing empty components and groups (PS3.5 6.2.1.1):
    ``Doe^John^^`` is ``Doe^John``, which is what a PACS comparing keys
    literally (Orthanc) finds."""
    short = "=".join(group.rstrip("^") for group in value.split("=")).rstrip("=")
    return short or value


def _check_code(name: str, code: str) -> None:
    if _CONTROL.search(code) or not code.isascii():
        raise InvalidQuery(name, f"{code[:40]!r} is not a code string")
    _check_length(name, "CS", code)


def _check_length(name: str, vr: str, value: str) -> None:
    """Keys longer than the VR allows are not valid in an Identifier (PS3.5 Table 6.2-1)."""
    limit = _MAX_CHARS.get(vr)
    if limit is None:
        return
    if vr == "PN":
        groups = value.split("=")
        if len(groups) > 3:
            raise InvalidQuery(name, "a person name has at most three component groups")
        if any(len(group) > limit for group in groups):
            raise InvalidQuery(name, f"a person name group is longer than {limit} characters")
    elif len(value) > limit:
        raise InvalidQuery(name, f"longer than the {limit} characters a {vr} value may have")


def parse_qido(
    level: Level,
    params: Iterable[tuple[str, str]],
    *,
    path_uids: dict[int, str] | None = None,
    context_levels: Iterable[Level] = (),
    study_root: bool = True,
) -> QidoQuery:
    """Parse QIDO-RS query parameters for a search at *level*.

    *path_uids* holds the UIDs given in the URL (``/studies/{study}/series``):
    they become single-value matches that a query parameter may not contradict.
    *context_levels* lists the upper levels whose default attributes the resource
    also returns (``/series`` returns study attributes, PS3.18 §10.6.3.3.2).
    """
    query = QidoQuery(level=level)
    query._context_levels = tuple(context_levels)
    seen: set[tuple[int, ...]] = set()
    for raw_name, raw_value in params:
        name = raw_name.strip()
        value = raw_value.strip()
        low = name.lower()
        if low in _CONTROL_PARAMS:
            _apply_control(query, low, name, value)
            continue
        path = _parse_attribute(name)
        if path[0] in QUERY_CONTROL:
            raise InvalidQuery(name, "is set by the gateway and cannot be matched")
        if path in seen:
            raise InvalidQuery(name, "given more than once; use a comma-separated UID list")
        seen.add(path)
        if path[0] == 0x00081190:  # RetrieveURL is computed here, never matched
            raise InvalidQuery(name, "RetrieveURL cannot be matched")
        vr, cvalue = _match_value(name, path, value)
        tag_level = level_of(path[0], study_root=study_root)
        if tag_level.depth > level.depth and level is Level.PATIENT:
            raise InvalidQuery(name, "patient searches match patient attributes only")
        query.matches.append(MatchKey(path, vr, cvalue, tag_level, name))
    for tag, uid in (path_uids or {}).items():
        check_uid(keyword(tag), uid)
        existing = query.match(tag)
        if existing is not None:
            if existing.value and uid not in existing.value.split("\\"):
                # Contradicts the path: nothing can match, which is an honest answer.
                query.contradictory = True
            query.matches.remove(existing)
        query.matches.append(
            MatchKey((tag,), "UI", uid, level_of(tag, study_root=study_root), keyword(tag))
        )
    return query


def apply_limits(query: QidoQuery, *, max_limit: int | None, refuse_unfiltered: bool) -> None:
    """Apply a node's search policy: refuse match-everything searches where the node
    forbids them, and cut ``limit`` to the node's maximum (PS3.18 §8.3.4.4 lets a
    server return fewer results than asked, saying so in a Warning)."""
    if refuse_unfiltered and not query.filters:
        raise InvalidRequest(
            "this node refuses searches that match everything: give at least one match key "
            "(e.g. PatientID, StudyDate, AccessionNumber) with a value other than '*'"
        )
    if max_limit is None:
        return
    if query.limit is None or query.limit > max_limit:
        if query.limit is not None:
            query.limit_note = (
                f"The limit {query.limit} exceeds this node's maximum of {max_limit}; "
                f"at most {max_limit} results are returned."
            )
        query.limit = max_limit


def _apply_control(query: QidoQuery, low: str, name: str, value: str) -> None:
    if low == "includefield":
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item.lower() == "all":
                query.include_all = True
                continue
            path = _parse_attribute(item, name)
            # Sequence members are returned with their sequence.
            query.includefields.add(path[0])
    elif low == "fuzzymatching":
        query.fuzzymatching = _bool(name, value)
    elif low == "limit":
        # 0 asks for no limit, as Orthanc's plugin reads it; PS3.18 gives 0 no meaning
        # of its own, and an always-empty answer would help no client.
        query.limit = _non_negative(name, value) or None
    elif low == "offset":
        query.offset = _non_negative(name, value)
    elif low in ("emptyvaluematching", "multiplevaluematching") and _bool(name, value):
        query.warnings.append(
            f"The {low} parameter is not supported. Only literal matching has been performed."
        )
