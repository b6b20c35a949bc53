"""C-FIND attribute matching (PS3.4 C.2.2.2), applied by the gateway to PACS answers.

A PACS silently ignores match keys it does not support and answers as if they
were universal (CONFORMANCE-NOTES §1.3), so the gateway checks every answer
against every key itself. The rules are those of an SCP without Extended
Negotiation: no combined date-time matching, literal matching of everything
but PN unless the client asked for fuzzy matching.

Stored values are read as ``dataset_to_json`` sends them to the client:
decoded with the data set's SpecificCharacterSet, without padding, and without
converting (or warning about) anything pydicom would find invalid.
"""

from __future__ import annotations

import calendar
import dataclasses
import functools
import re
import unicodedata
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from pydicom.dataset import Dataset

from app.dicomweb.json import dataset_to_json
from app.dicomweb.query import WILDCARD_VRS, MatchKey

_TIMEZONE_OFFSET_FROM_UTC = 0x00080201

# A stored value's text -> does it match? Built once per key.
_Matcher = Callable[[str], bool]


def matches(ds: Dataset, key: MatchKey, *, fuzzy: bool = False) -> bool | None:
    """Whether *ds* matches *key*; None if the attribute at ``key.path`` is absent.

    An attribute that cannot be decoded counts as absent (``dataset_to_json``
    leaves it out and logs it), so the caller decides for both alike.

    - Universal matching (an empty key, PS3.4 C.2.2.2.3) and a key of only
      ``*`` (C.2.2.2.4: ``*`` also matches a zero-length value) are True even
      when the attribute is absent: no value could make them fail.
    - A present attribute with no value fails every other key (C.2.2.2.1).
    - A multi-valued attribute (``ModalitiesInStudy`` ``CT\\MR``) matches if
      any of its values does; a sequence key (path of two tags) matches if the
      attribute matches in any item (C.2.2.2.6). An empty sequence counts as
      an empty value; items lacking the attribute are not judged, and if no
      item has it the result is None.
    - Single values are compared exactly and case-sensitively, PN excepted
      (C.2.2.2.1); ``*`` and ``?`` are wild cards for AE CS LO LT PN SH ST UC
      UR UT (C.2.2.2.4) and plain characters for every other VR.
    - PN is matched without regard to case, against the whole value and
      against each component group on its own (so ``山田^太郎`` finds the
      ideographic group); trailing empty components are insignificant (PS3.5
      6.2.1.1), so ``Doe^John`` equals ``Doe^John^^``.
    - ``fuzzy=True`` (QIDO ``fuzzymatching``, PS3.18 §8.3.4.2, whose semantics
      PS3.4 C.2.2.2.1 leaves to the implementation) also matches a PN when the
      key, compared without regard to case or accents, is the beginning of any
      single name component (``joh`` finds ``Doe^John``); a key with several
      ``^``-separated components must begin the component in the same position
      (``do^j`` finds ``Doe^John``). Other VRs ignore it.
    - UI keys with several values (``1.2\\1.3``) match any of them (C.2.2.2.2),
      and so do CS keys (``CT\\MR``, each value may hold wild cards).
    - DA, TM and DT take single values and ranges ``A-B``, ``-B``, ``A-``
      (C.2.2.2.5). Values are compared as instants, not strings, so a stored
      TM ``0930`` is 09:30:00 and falls inside ``0900-093000``. A key value is
      taken at its precision: the upper end ``10`` includes 10:59:59.999999
      and a single value ``0930`` matches any time within that minute. DT
      offsets are honoured when both sides have one (the stored side may take
      it from TimezoneOffsetFromUTC); otherwise wall-clock times are compared.
    - IS and DS compare as numbers (``1.50`` equals ``1.5``).
    """
    if _always(key):
        return True
    return _judge(_encode(ds, [key]), key, fuzzy)


def matches_all(
    ds: Dataset, keys: Iterable[MatchKey], *, fuzzy: bool = False
) -> tuple[bool, list[MatchKey]]:
    """Match *ds* against every key: (all judged keys match, keys whose attribute is absent).

    Every key is judged, also after one has failed, so the second element
    does not depend on the order of *keys*.
    """
    judged = [key for key in keys if not _always(key)]
    answer = _encode(ds, judged) if judged else {}
    ok = True
    absent: list[MatchKey] = []
    for key in judged:
        result = _judge(answer, key, fuzzy)
        if result is None:
            absent.append(key)
        elif not result:
            ok = False
    return ok, absent


def _always(key: MatchKey) -> bool:
    """Universal matching, or a key of only ``*``: no stored value can fail it."""
    return key.is_universal or (key.vr in WILDCARD_VRS and key.value.strip("*") == "")


def _judge(answer: dict[str, Any], key: MatchKey, fuzzy: bool) -> bool | None:
    values = _values_at(answer, key.path)
    if values is None:
        return None
    if not values:
        return False
    if key.vr == "DT":
        offset = _answer_offset(answer)
        return any(_dt_match(key.value, value, offset) for value in values)
    match = _matcher(key, fuzzy)
    return any(match(value) for value in values)


# -- Reading stored values -------------------------------------------------------------------


def _encode(ds: Dataset, keys: list[MatchKey]) -> dict[str, Any]:
    """The attributes the keys need, as the client will see them."""
    tags = {key.path[0] for key in keys}
    if any(key.vr == "DT" for key in keys):
        tags.add(_TIMEZONE_OFFSET_FROM_UTC)
    return dataset_to_json(ds, tags=tags)


def _values_at(answer: dict[str, Any], path: tuple[int, ...]) -> list[str] | None:
    """The non-empty stored values at *path* as text; None if absent or unreadable."""
    attribute = answer.get(f"{path[0]:08X}")
    if attribute is None:
        return None
    if len(path) == 1:
        return _texts(attribute)
    if attribute["vr"] != "SQ":
        return None
    items: list[dict[str, Any]] = attribute.get("Value", [])
    found: list[str] | None = [] if not items else None
    name = f"{path[1]:08X}"
    for item in items:
        values = _texts(item[name]) if name in item else None
        if values is not None:
            found = (found or []) + values
    return found


def _texts(attribute: dict[str, Any]) -> list[str] | None:
    if "Value" not in attribute:
        # Binary content (query.py refuses such keys) cannot be judged; else zero-length.
        return None if len(attribute) > 1 else []
    out: list[str] = []
    for value in attribute["Value"]:
        if isinstance(value, dict):  # PN: back to its PS3.5 form
            groups = (value.get(group, "") for group in ("Alphabetic", "Ideographic", "Phonetic"))
            out.append("=".join(groups).rstrip("="))
        elif isinstance(value, str):
            out.append(value)
        elif value is not None:  # IS and DS numbers
            out.append(repr(value))
    return out


# -- Building matchers -----------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _matcher(key: MatchKey, fuzzy: bool) -> _Matcher:
    vr = key.vr
    value = key.value
    if vr == "PN":
        return _pn_matcher(value, fuzzy)
    if vr == "UI":
        uids = frozenset(value.split("\\"))
        return uids.__contains__
    if vr == "CS" and "\\" in value:
        codes = [
            _matcher(dataclasses.replace(key, value=code), fuzzy) for code in value.split("\\")
        ]
        return lambda stored: any(match(stored) for match in codes)
    if vr == "DA":
        return _range_matcher(value, _da_bounds)
    if vr == "TM":
        return _range_matcher(value, _tm_bounds)
    if vr in ("IS", "DS"):
        return _number_matcher(value)
    if key.has_wildcard:
        return functools.partial(_glob, value)
    return value.__eq__


def _pn_matcher(value: str, fuzzy: bool) -> _Matcher:
    groups = [_pn_normal(group).casefold() for group in value.split("=")]
    pattern = "=".join(groups).rstrip("=")
    wild = "*" in pattern or "?" in pattern
    test: _Matcher = functools.partial(_glob, pattern) if wild else pattern.__eq__
    first_group = next((group for group in groups if group), "")
    fuzzy_parts = _fold(first_group).split("^") if fuzzy else None

    def match(stored: str) -> bool:
        groups = [_pn_normal(group).casefold() for group in stored.split("=")]
        whole = "=".join(groups).rstrip("=")
        if test(whole) or any(test(group) for group in groups if group):
            return True
        if fuzzy_parts is None:
            return False
        return any(_fuzzy_group(fuzzy_parts, _fold(group)) for group in groups if group)

    return match


def _pn_normal(group: str) -> str:
    """One PN component group without spaces around components or trailing empty ones."""
    return "^".join(part.strip() for part in group.split("^")).rstrip("^")


def _fold(text: str) -> str:
    """Case- and accent-free form for fuzzy matching (``Müller`` -> ``muller``)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _fuzzy_group(parts: list[str], group: str) -> bool:
    components = group.split("^")
    if len(parts) == 1:
        return any(_glob(parts[0] + "*", component) for component in components if component)
    if len(parts) > len(components):
        return False
    return all(
        not part or _glob(part + "*", component)
        for part, component in zip(parts, components, strict=False)
    )


def _glob(pattern: str, text: str) -> bool:
    """``*`` and ``?`` wild card match of the whole *text* (PS3.4 C.2.2.2.4).

    The usual backtrack-to-the-last-star scan: O(len(pattern) * len(text)) at
    worst. A backtracking regular expression needs time of the order of
    len(text) ** stars for a key such as ``*a*a*a*a*b``, and keys come from
    clients while UT values can be long.
    """
    p = t = 0
    star = -1
    mark = 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] == "*":
            star = p
            mark = t
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            t = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def _number_matcher(value: str) -> _Matcher:
    try:
        wanted = Decimal(value)
    except InvalidOperation:
        return lambda stored: False

    def match(stored: str) -> bool:
        try:
            return Decimal(stored) == wanted
        except InvalidOperation:
            return False

    return match


# -- Ranges: DA and TM -----------------------------------------------------------------------

_Bounds = tuple[int, int]


def _range_matcher(value: str, bounds: Callable[[str], _Bounds | None]) -> _Matcher:
    """Single value or range (PS3.4 C.2.2.2.5); a stored value is the start of its precision."""
    low_text, dash, high_text = value.partition("-")
    low = bounds(low_text) if low_text else None
    high = bounds(high_text) if high_text else None
    if (low_text and low is None) or (high_text and high is None) or not (low or high):
        return lambda stored: False
    start = low[0] if low is not None else None
    end = high[1] if high is not None else None
    if not dash and low is not None:
        end = low[1]

    def match(stored: str) -> bool:
        point = bounds(stored)
        if point is None:
            return False
        return (start is None or start <= point[0]) and (end is None or point[0] <= end)

    return match


_DA_RE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})")
_TM_RE = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")


def _da_bounds(text: str) -> _Bounds | None:
    # "YYYY.MM.DD" is the ACR-NEMA 300 form that some old archives still hold.
    found = _DA_RE.fullmatch(text.strip().replace(".", ""))
    if found is None:
        return None
    day = int(found.group(0))
    return day, day


def _tm_bounds(text: str) -> _Bounds | None:
    """Microseconds since midnight of the first and last instant *text* denotes."""
    # "HH:MM:SS" is the ACR-NEMA 300 form.
    found = _TM_RE.fullmatch(text.strip().replace(":", ""))
    if found is None:
        return None
    hh, mm, ss, frac = found.groups()
    hours, minutes, seconds = int(hh), int(mm or 0), int(ss or 0)
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    start = ((hours * 60 + minutes) * 60 + seconds) * 1_000_000
    if frac:
        start += int(frac.ljust(6, "0"))
        unit = 10 ** (6 - len(frac))
    elif ss:
        unit = 1_000_000
    elif mm:
        unit = 60_000_000
    else:
        unit = 3_600_000_000
    return start, start + unit - 1


def time_key_for_pacs(value: str) -> str:
    """A TM key as a PACS comparing times as strings (Orthanc) still reads right.

    The gateway takes a key at its precision (``-1630`` ends at 16:30:59.999999,
    ``1630`` is that whole minute); Orthanc compares strings, so ``-1630`` misses
    a study at ``163000`` and ``133834`` one at ``133834.250000``. Each upper end
    is sent at full precision (``-163059.999999``), each lower end as its hour
    (a stored ``08`` sorts before ``0800``), and a single value as such a
    range; the gateway then matches the answers exactly.
    """
    low_text, dash, high_text = value.partition("-")
    end_text = high_text if dash else low_text
    high = ""
    if end_text:
        bounds = _tm_bounds(end_text)
        if bounds is None:
            return value
        seconds, micros = divmod(bounds[1], 1_000_000)
        minutes, ss = divmod(seconds, 60)
        hh, mm = divmod(minutes, 60)
        high = f"{hh:02d}{mm:02d}{ss:02d}.{micros:06d}"
    return f"{low_text[:2]}-{high}"


# -- Ranges: DT ------------------------------------------------------------------------------

_DT_RE = re.compile(
    r"([0-9]{4})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})"
    r"(?:\.([0-9]{1,6}))?)?)?)?)?)?([+-][0-9]{4})?"
)


class _Instant:
    """First and last moment a DT value denotes, with its UTC offset if it has one."""

    __slots__ = ("first", "last", "offset")

    def __init__(self, first: datetime, last: datetime, offset: timedelta | None) -> None:
        self.first = first
        self.last = last
        self.offset = offset


def _dt_instant(text: str) -> _Instant | None:
    found = _DT_RE.fullmatch(text.strip())
    if found is None:
        return None
    year, month, day, hour, minute, second, frac, zone = found.groups()
    try:
        offset = _offset(zone) if zone else None
        first = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            min(int(second or 0), 59),  # a leap second 60 is kept as :59
            int((frac or "0").ljust(6, "0")),
        )
    except ValueError:
        return None
    if frac:
        step = timedelta(microseconds=10 ** (6 - len(frac)))
    elif second:
        step = timedelta(seconds=1)
    elif minute:
        step = timedelta(minutes=1)
    elif hour:
        step = timedelta(hours=1)
    elif day:
        step = timedelta(days=1)
    elif month:
        step = timedelta(days=calendar.monthrange(first.year, first.month)[1])
    else:
        step = timedelta(days=366 if calendar.isleap(first.year) else 365)
    try:
        last = first + step - timedelta(microseconds=1)
    except OverflowError:
        last = datetime.max
    return _Instant(first, last, offset)


def _offset(zone: str) -> timedelta:
    """A ``&ZZXX`` suffix; PS3.5 Table 6.2-1 allows -1200 to +1400."""
    hours, minutes = int(zone[1:3]), int(zone[3:5])
    if hours > 14 or minutes > 59:
        raise ValueError(zone)
    delta = timedelta(hours=hours, minutes=minutes)
    return -delta if zone[0] == "-" else delta


@functools.lru_cache(maxsize=256)
def _dt_key(value: str) -> tuple[_Instant | None, _Instant | None] | None:
    """(low, high) of a DT key; a single value is low == high.

    A "-" is both the range separator and the sign of a UTC offset, so every
    split is tried: the first that yields valid ends in order is the range,
    else the whole value must be one DT (``20200101120000-0500``).
    """
    for index, char in enumerate(value):
        if char != "-":
            continue
        low_text, high_text = value[:index], value[index + 1 :]
        if not low_text and not high_text:
            continue
        low = _dt_instant(low_text) if low_text else None
        high = _dt_instant(high_text) if high_text else None
        if (low_text and low is None) or (high_text and high is None):
            continue
        if low is not None and high is not None and _after(low, high):
            continue
        return low, high
    single = _dt_instant(value)
    return None if single is None else (single, single)


def _after(low: _Instant, high: _Instant) -> bool:
    return not _not_before(high.last, high.offset, low.first, low.offset)


def _utc(moment: datetime, offset: timedelta) -> datetime:
    return moment.replace(tzinfo=timezone(offset))


def _dt_match(value: str, stored_text: str, dataset_offset: timedelta | None) -> bool:
    key = _dt_key(value)
    stored = _dt_instant(stored_text)
    if key is None or stored is None:
        return False
    low, high = key
    offset = stored.offset if stored.offset is not None else dataset_offset
    if low is not None and not _not_before(stored.first, offset, low.first, low.offset):
        return False
    return high is None or _not_before(high.last, high.offset, stored.first, offset)


def _not_before(
    moment: datetime, offset: timedelta | None, other: datetime, other_offset: timedelta | None
) -> bool:
    """moment >= other, in UTC when both carry an offset, else as wall-clock times."""
    if offset is not None and other_offset is not None:
        return _utc(moment, offset) >= _utc(other, other_offset)
    return moment >= other


def _answer_offset(answer: dict[str, Any]) -> timedelta | None:
    """TimezoneOffsetFromUTC (0008,0201): the zone of the answer's DT values without an offset."""
    values = _values_at(answer, (_TIMEZONE_OFFSET_FROM_UTC,))
    if not values or not re.fullmatch(r"[+-][0-9]{4}", values[0]):
        return None
    try:
        return _offset(values[0])
    except ValueError:
        return None
