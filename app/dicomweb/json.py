"""DICOM JSON Model encoder (PS3.18 Annex F).

Written here rather than taken from ``Dataset.to_json_dict`` because that one
keeps insertion order and group lengths, passes SpecificCharacterSet through,
turns IS "1.5" into 1 and DS "NaN" into bare NaN, and raises on invalid values
(CONFORMANCE-NOTES §6).

Elements that pydicom has not converted yet (``RawDataElement``, which is what a
C-FIND response identifier holds) are decoded here straight from their bytes:
it keeps IS/DS in their original form, never triggers pydicom's validation
warnings, and is several times faster than converting through pydicom, which
matters for search results with thousands of objects. Elements that are
already converted (a dataset built in code, or one whose keys were read while
matching) are encoded from their Python values.
"""

from __future__ import annotations

import array
import base64
import json
import logging
import math
import re
import struct
from collections.abc import Callable, Collection, Sequence
from decimal import Decimal
from functools import lru_cache
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

BulkDataUriFactory = Callable[[tuple[int, ...]], str | None]

_SPECIFIC_CHARACTER_SET = 0x00080005
_BITS_ALLOCATED = 0x00280100
_PIXEL_REPRESENTATION = 0x00280103
_WAVEFORM_BITS_ALLOCATED = 0x54001004
_PIXEL_DATA = 0x7FE00010

_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")

# Text VRs whose Value Field may hold several backslash-separated values; in
# LT, ST, UR and UT a backslash is an ordinary character (PS3.5 Table 6.2-1).
_MULTI_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI"}
)
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_NUMBER_FORMATS = {
    "US": "H",
    "SS": "h",
    "UL": "I",
    "SL": "i",
    "FL": "f",
    "FD": "d",
    "SV": "q",
    "UV": "Q",
}
_NUMBER_VRS = frozenset(_NUMBER_FORMATS)
# Word size of the binary VRs, for the byte swap of a big endian source.
_WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}

# Characters after which an ISO 2022 code extension returns to the initial
# character set (PS3.5 6.1.2.5.3): control characters for every text VR, the
# value delimiter for multi-valued ones, and the PN group and component delimiters.
_CONTROL_DELIMS = frozenset({0x09, 0x0A, 0x0C, 0x0D})
_MULTI_DELIMS = _CONTROL_DELIMS | {0x5C}
_PN_DELIMS = _MULTI_DELIMS | {0x3D, 0x5E}

# JSON numbers beyond 2**53 do not survive a JavaScript (or any IEEE double)
# reader; I-JSON (RFC 7493 §2.2) advises against them. Such IS, DS, SV and UV
# values are sent as strings, which Table F.2.3-1 allows for these VRs.
_MAX_SAFE_INTEGER = 2**53 - 1

_IS_RE = re.compile(r"[+-]?[0-9]+")
_DS_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")

_DEFAULT_ENCODINGS: tuple[str, ...] = (default_encoding,)


def dataset_to_json(
    ds: Dataset,
    *,
    tags: Collection[int] | None = None,
    bulk_data_uri: BulkDataUriFactory | None = None,
    inline_threshold: int = 0,
) -> dict[str, Any]:
    """Encode *ds* as one DICOM JSON Model object (PS3.18 F.2).

    - Attributes are keyed by 8 uppercase hex digits in ascending order; group
      lengths, File Meta (0002) and command (0000) elements are left out (F.2.2),
      and so is SpecificCharacterSet: every string is decoded with the data
      set's character set (inherited by sequence items, PS3.5 6.1.2.5.1) and
      the output is UTF-8 (F.2).
    - *tags* restricts the top-level attributes; sequence items are kept whole.
    - A zero-length attribute keeps only its ``vr``; an empty value inside a
      multi-valued attribute is ``null`` (F.2.5).
    - PN values are objects holding the non-empty component groups (F.2.2).
    - IS, DS, SV and UV are JSON numbers when the number denotes exactly the
      stored value, else the original string (Table F.2.3-1 and its note).
    - FL and FD are numbers; NaN and the infinities, which JSON cannot hold,
      become the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``: a
      ``null`` would claim an empty value (F.2.5), and these are the spellings
      that JavaScript's ``Number()``, Python's ``float()`` and .NET's named
      floating point literals read back.
    - Binary VRs (OB OD OF OL OV OW UN) get a ``BulkDataURI`` (F.2.6) when
      *bulk_data_uri* returns one for the element's path, else ``InlineBinary``
      (F.2.7) if no factory is given or the value is at most *inline_threshold*
      bytes long; a longer value without a URI is left out with a warning.
      The path is ``(tag,)`` at the top level and ``(sequence tag, item index,
      tag)`` below it, the item index counting from 0.
    - Ambiguous dictionary VRs (``US or SS``, ``OB or OW``, ...) are resolved as
      PS3.5 Annex A and PS3.3 C.7.6.3.1 do, from PixelRepresentation and
      BitsAllocated of the data set or its parents.

    An element that cannot be encoded is left out with a logged warning; this
    function does not raise for bad element values.
    """
    encoder = _Encoder(bulk_data_uri, inline_threshold)
    return encoder.dataset(ds, tags, (), _DEFAULT_ENCODINGS, ())


def dumps(objs: list[dict[str, Any]]) -> bytes:
    """Serialise DICOM JSON Model objects as one compact UTF-8 JSON array (PS3.18 F.2.1).

    ``allow_nan=False`` guards the JSON grammar: ``dataset_to_json`` never
    produces NaN, so a ValueError here is a programming error, not bad data.
    """
    return json.dumps(objs, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
        "utf-8"
    )


class _Encoder:
    __slots__ = ("bulk_data_uri", "inline_threshold")

    def __init__(self, bulk_data_uri: BulkDataUriFactory | None, inline_threshold: int) -> None:
        self.bulk_data_uri = bulk_data_uri
        self.inline_threshold = inline_threshold

    def dataset(
        self,
        ds: Dataset,
        tags: Collection[int] | None,
        prefix: tuple[int, ...],
        parent_encodings: tuple[str, ...],
        ancestors: tuple[Dataset, ...],
    ) -> dict[str, Any]:
        encodings = _encodings_of(ds, parent_encodings)
        elements: list[tuple[int, DataElement | RawDataElement]]
        if tags is None:
            # Plain ints: BaseTag compares in Python, which dominated the sort.
            elements = sorted((int(tag), elem) for tag, elem in ds.items())
        else:
            # Matching asks for a few tags of every answer: look them up, no sort of all.
            elements = []
            for tag in sorted({int(t) for t in tags}):
                found: DataElement | RawDataElement | None = ds.get_item(tag)
                if found is not None:
                    elements.append((tag, found))
        out: dict[str, Any] = {}
        for tag, elem in elements:
            # Command (0000) and File Meta (0002) groups, group lengths and the
            # character set never appear in DICOM JSON (PS3.18 F.2, F.2.2).
            if tag < 0x00030000 or not tag & 0xFFFF or tag == _SPECIFIC_CHARACTER_SET:
                continue
            attr: dict[str, Any] | None
            try:
                if isinstance(elem, RawDataElement):
                    # The common case, a text element, is kept free of calls.
                    vr = elem.VR or _public_vr(tag)
                    value = elem.value
                    formatter = _TEXT_FORMATTERS.get(vr) if vr is not None else None
                    if formatter is not None and value is not None and vr is not None:
                        try:
                            if b"\x1b" in value:
                                text = _decode(value, encodings, vr)
                            else:
                                text = value.decode(encodings[0])
                        except (UnicodeDecodeError, LookupError):
                            text = _decode_lenient(value, encodings, vr)
                        attr = formatter(vr, text)
                    else:
                        attr = self.raw(elem, ds, prefix, encodings, ancestors)
                else:
                    attr = self.converted(elem, ds, prefix, encodings, ancestors)
            except Exception as exc:
                # The exception text may quote the value, which may identify a
                # patient: it goes to DEBUG only.
                where = _path_text((*prefix, tag))
                logger.warning("%s left out of the DICOM JSON: %s", where, type(exc).__name__)
                logger.debug("%s could not be encoded", where, exc_info=True)
                continue
            if attr is not None:
                out[_KEYS.get(tag) or _key(tag)] = attr
        return out

    def raw(
        self,
        elem: RawDataElement,
        ds: Dataset,
        prefix: tuple[int, ...],
        encodings: tuple[str, ...],
        ancestors: tuple[Dataset, ...],
    ) -> dict[str, Any] | None:
        tag = int(elem.tag)
        vr = elem.VR
        value = elem.value
        little = elem.is_little_endian
        if vr is None or vr == "UN":
            known = _public_vr(tag)
            if known is not None:
                # UN holds the Implicit VR Little Endian encoding (PS3.5 6.2.2),
                # so a public attribute sent as UN is read with its real VR.
                if vr == "UN":
                    little = True
                vr = known
            elif vr is None:
                # Implicit VR private element: pydicom knows the private dictionaries.
                return self.converted(ds[tag], ds, prefix, encodings, ancestors)
            else:
                vr = "UN"
        if vr == "SQ" or value is None:
            # Sequences are parsed by pydicom; the items come back as raw data sets.
            return self.converted(ds[tag], ds, prefix, encodings, ancestors)
        if " or " in vr:
            vr = resolve_ambiguous_vr(
                vr, tag, len(value), elem.is_implicit_VR, elem.length == 0xFFFFFFFF, ds, ancestors
            )
        if not value:
            return {"vr": vr}
        formatter = _TEXT_FORMATTERS.get(vr)
        if formatter is not None:
            return formatter(vr, _decode(value, encodings, vr))
        if vr in _BINARY_VRS:
            return self.binary(vr, value, little, (*prefix, tag))
        if vr in _NUMBER_VRS:
            return _number_attribute(vr, _unpack(vr, value, little))
        if vr == "AT":
            return _tag_attribute(vr, _unpack_tags(value, little))
        raise ValueError(f"unknown VR {vr!r}")

    def converted(
        self,
        elem: DataElement,
        ds: Dataset,
        prefix: tuple[int, ...],
        encodings: tuple[str, ...],
        ancestors: tuple[Dataset, ...],
    ) -> dict[str, Any] | None:
        tag = int(elem.tag)
        vr = str(elem.VR)
        value = elem.value
        if " or " in vr:
            size = len(value) if isinstance(value, bytes | bytearray) else 2
            vr = resolve_ambiguous_vr(vr, tag, size, False, elem.is_undefined_length, ds, ancestors)
        if value is None or (isinstance(value, str | bytes | bytearray) and not value):
            return {"vr": vr}
        if vr == "SQ":
            path = (*prefix, tag)
            nested = (*ancestors, ds)
            items = [
                self.dataset(item, None, (*path, index), encodings, nested)
                for index, item in enumerate(value)
            ]
            return {"vr": vr, "Value": items} if items else {"vr": vr}
        formatter = _TEXT_FORMATTERS.get(vr)
        if formatter is not None:
            if isinstance(value, bytes | bytearray):
                return formatter(vr, _decode(bytes(value), encodings, vr))
            if isinstance(value, str):
                return formatter(vr, value)
            # pydicom's own values (MultiValue, PersonName, IS, DSfloat) print
            # as their original strings; joining them takes the raw path's rules.
            values = _as_list(value)
            if not values:
                return {"vr": vr}
            if vr not in _MULTI_TEXT_VRS:
                return formatter(vr, str(values[0]))
            return formatter(vr, "\\".join("" if v is None else str(v) for v in values))
        if vr in _BINARY_VRS:
            if not isinstance(value, bytes | bytearray):
                raise TypeError(f"{vr} value is {type(value).__name__}, not bytes")
            return self.binary(vr, bytes(value), True, (*prefix, tag))
        if vr in _NUMBER_VRS:
            if isinstance(value, bytes | bytearray):
                return _number_attribute(vr, _unpack(vr, bytes(value), True))
            values = _as_list(value)
            return _number_attribute(vr, values) if values else {"vr": vr}
        if vr == "AT":
            values = _as_list(value)
            return _tag_attribute(vr, [int(v) for v in values]) if values else {"vr": vr}
        raise ValueError(f"unknown VR {vr!r}")

    def binary(
        self, vr: str, data: bytes, little: bool, path: tuple[int, ...]
    ) -> dict[str, Any] | None:
        if self.bulk_data_uri is not None:
            uri = self.bulk_data_uri(path)
            if uri is not None:
                return {"vr": vr, "BulkDataURI": uri}
            if len(data) > self.inline_threshold:
                logger.warning(
                    "%s left out of the DICOM JSON: %d bytes of %s, no bulk data URI",
                    _path_text(path),
                    len(data),
                    vr,
                )
                return None
        if not little and vr in _WORD_SIZE:
            # InlineBinary carries little endian words, whatever the source (F.2.7).
            data = _swap(data, _WORD_SIZE[vr])
        return {"vr": vr, "InlineBinary": base64.b64encode(data).decode("ascii")}


# Text formatters take the whole decoded Value Field: splitting after decoding
# keeps multi-byte characters whole (a JIS X 0208 or GBK character may contain
# the byte 0x5C), and a single value, the usual case, needs no list work.


def _strings_both(vr: str, text: str) -> dict[str, Any]:
    if "\\" not in text:
        text = text.strip(" \x00")
        return {"vr": vr, "Value": [text]} if text else {"vr": vr}
    return {"vr": vr, "Value": [v.strip(" \x00") or None for v in text.split("\\")]}


def _strings_trailing(vr: str, text: str) -> dict[str, Any]:
    if "\\" not in text:
        text = text.rstrip(" \x00")
        return {"vr": vr, "Value": [text]} if text else {"vr": vr}
    return {"vr": vr, "Value": [v.rstrip(" \x00") or None for v in text.split("\\")]}


def _single_text(vr: str, text: str) -> dict[str, Any]:
    text = text.rstrip(" \x00")
    return {"vr": vr, "Value": [text]} if text else {"vr": vr}


def _person_names(vr: str, text: str) -> dict[str, Any]:
    values = [_person_name(v) for v in text.split("\\")]
    if len(values) == 1 and values[0] is None:
        return {"vr": vr}
    return {"vr": vr, "Value": values}


def _person_name(text: str) -> dict[str, str] | None:
    """PN value object: the non-empty component groups, by name (PS3.18 F.2.2)."""
    name: dict[str, str] = {}
    for group, part in zip(_PN_GROUPS, text.split("="), strict=False):
        part = part.rstrip(" \x00")
        if part:
            name[group] = part
    return name or None


def _integer_strings(vr: str, text: str) -> dict[str, Any]:
    values = [_integer_string(v.strip(" \x00")) for v in text.split("\\")]
    if len(values) == 1 and values[0] is None:
        return {"vr": vr}
    return {"vr": vr, "Value": values}


def _decimal_strings(vr: str, text: str) -> dict[str, Any]:
    values = [_decimal_string(v.strip(" \x00")) for v in text.split("\\")]
    if len(values) == 1 and values[0] is None:
        return {"vr": vr}
    return {"vr": vr, "Value": values}


_TEXT_FORMATTERS: dict[str, Callable[[str, str], dict[str, Any]]] = {
    **dict.fromkeys(("AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UI"), _strings_both),
    "UC": _strings_trailing,
    **dict.fromkeys(("LT", "ST", "UR", "UT"), _single_text),
    "PN": _person_names,
    "IS": _integer_strings,
    "DS": _decimal_strings,
}


def _integer_string(text: str) -> int | str | None:
    if not text:
        return None
    if _IS_RE.fullmatch(text):
        number = int(text)
        if abs(number) <= _MAX_SAFE_INTEGER:
            return number
    return text


def _decimal_string(text: str) -> int | float | str | None:
    if not text:
        return None
    if not _DS_RE.fullmatch(text):
        return text
    if "." not in text and "e" not in text and "E" not in text:
        return _integer_string(text)
    number = float(text)
    if not math.isfinite(number):
        return text
    shortest = repr(number)
    # The JSON text of a float is its shortest repr; it must denote the very
    # decimal value the DS holds ("0.1" does, "0.10000000000000000001" does not).
    if shortest == text or Decimal(shortest) == Decimal(text):
        return number
    return text


def _number_attribute(vr: str, values: Sequence[Any]) -> dict[str, Any]:
    out: list[Any] = []
    for value in values:
        if value is None:
            out.append(None)
        elif vr in ("FL", "FD"):
            number = float(value)
            if math.isfinite(number):
                out.append(number)
            elif math.isnan(number):
                out.append("NaN")
            else:
                out.append("Infinity" if number > 0 else "-Infinity")
        else:
            integer = int(value)
            out.append(integer if abs(integer) <= _MAX_SAFE_INTEGER else str(integer))
    return {"vr": vr, "Value": out}


def _tag_attribute(vr: str, tags: list[int]) -> dict[str, Any]:
    return {"vr": vr, "Value": [f"{tag:08X}" for tag in tags]}


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str | bytes | bytearray) or not isinstance(value, Sequence):
        return [value]
    return list(value)


def _unpack(vr: str, data: bytes, little: bool) -> tuple[Any, ...]:
    code = _NUMBER_FORMATS[vr]
    size = struct.calcsize(code)
    if len(data) % size:
        raise ValueError(f"{len(data)} bytes is not a whole number of {vr} values")
    return struct.unpack(f"{'<' if little else '>'}{len(data) // size}{code}", data)


def _unpack_tags(data: bytes, little: bool) -> list[int]:
    """AT values: (group, element) pairs of 16-bit words (PS3.5 6.2)."""
    if len(data) % 4:
        raise ValueError(f"{len(data)} bytes is not a whole number of AT values")
    words = struct.unpack(f"{'<' if little else '>'}{len(data) // 2}H", data)
    return [(words[i] << 16) | words[i + 1] for i in range(0, len(words), 2)]


def _swap(data: bytes, size: int) -> bytes:
    words = array.array({2: "H", 4: "I", 8: "Q"}[size])
    if words.itemsize != size or len(data) % size:
        return data
    words.frombytes(data)
    words.byteswap()
    return words.tobytes()


def _decode(value: bytes, encodings: tuple[str, ...], vr: str) -> str:
    """Decode a text value with the data set's character set (PS3.5 6.1)."""
    if b"\x1b" not in value:
        try:
            return value.decode(encodings[0])
        except (UnicodeDecodeError, LookupError):
            return _decode_lenient(value, encodings, vr)
    if vr == "PN":
        delimiters = _PN_DELIMS
    elif vr in _MULTI_TEXT_VRS:
        delimiters = _MULTI_DELIMS
    else:
        delimiters = _CONTROL_DELIMS
    try:
        return decode_bytes(value, list(encodings), set(delimiters))
    except Exception:
        # decode_bytes warns (an error under strict warning filters) or raises
        # in RAISE mode; either way the value is kept, with replacement characters.
        return _decode_lenient(value, encodings, vr)


def _decode_lenient(value: bytes, encodings: tuple[str, ...], vr: str) -> str:
    logger.warning("a %s value is not valid in %s; undecodable bytes replaced", vr, encodings)
    try:
        return value.decode(encodings[0], errors="replace")
    except LookupError:
        return value.decode("latin-1")


def _encodings_of(ds: Dataset, parent: tuple[str, ...]) -> tuple[str, ...]:
    """Python codecs for the data set's SpecificCharacterSet; items inherit (PS3.5 6.1.2.5.1)."""
    elem: DataElement | RawDataElement | None = ds.get_item(_SPECIFIC_CHARACTER_SET)
    if elem is None:
        return parent
    terms: tuple[str, ...]
    if isinstance(elem, RawDataElement):
        raw = elem.value or b""
        terms = tuple(t.strip(" \x00") for t in raw.decode("latin-1").split("\\"))
    else:
        terms = tuple(str(t).strip() for t in _as_list(elem.value) if t is not None)
    if not any(terms):
        return parent
    return _python_encodings(terms)


@lru_cache(maxsize=64)
def _python_encodings(terms: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return tuple(convert_encodings(list(terms)))
    except Exception as exc:
        logger.warning("SpecificCharacterSet %s not understood (%s); using ASCII", terms, exc)
        return _DEFAULT_ENCODINGS


@lru_cache(maxsize=4096)
def _public_vr(tag: int) -> str | None:
    if tag >> 16 & 1:
        return None
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def resolve_ambiguous_vr(
    vr: str,
    tag: int,
    size: int,
    implicit: bool,
    undefined_length: bool,
    ds: Dataset,
    ancestors: tuple[Dataset, ...],
) -> str:
    """Pick the VR the standard prescribes for an attribute with an ambiguous dictionary VR.

    US/SS follows PixelRepresentation (PS3.3 C.7.6.3.1.1, 0 = unsigned); a
    US-or-OW LUT Data holding one value is US (PS3.3 C.11.1.1.1); Pixel Data is
    OB when encapsulated or of at most 8 bits allocated in an explicit VR
    encoding, else OW (PS3.5 A.1, A.2, A.4); waveform data follows
    WaveformBitsAllocated likewise (PS3.3 C.10.9.1); the rest is OW.
    """
    if vr == "US or SS":
        return "SS" if _find_us(_PIXEL_REPRESENTATION, ds, ancestors) == 1 else "US"
    if vr.startswith("US or "):  # "US or OW" LUT Data, "US or SS or OW" (retired)
        if size == 2:
            return resolve_ambiguous_vr("US or SS", tag, size, implicit, False, ds, ancestors)
        return "OW"
    if undefined_length:
        return "OB"
    if implicit:
        return "OW"
    if tag == _PIXEL_DATA:
        bits = _find_us(_BITS_ALLOCATED, ds, ancestors)
        return "OB" if bits is not None and bits <= 8 else "OW"
    if tag >> 16 == 0x5400:
        bits = _find_us(_WAVEFORM_BITS_ALLOCATED, ds, ())
        return "OB" if bits is not None and bits <= 8 else "OW"
    return "OW"


def _find_us(tag: int, ds: Dataset, ancestors: tuple[Dataset, ...]) -> int | None:
    """First value of a US attribute in *ds* or, nearest first, its ancestors."""
    for candidate in (ds, *reversed(ancestors)):
        elem: DataElement | RawDataElement | None = candidate.get_item(tag)
        if elem is None:
            continue
        try:
            if isinstance(elem, RawDataElement):
                if elem.value is not None and len(elem.value) >= 2:
                    number: int = _unpack("US", elem.value[:2], elem.is_little_endian)[0]
                    return number
            elif elem.value is not None and elem.value != "":
                return int(_as_list(elem.value)[0])
        except (TypeError, ValueError):
            pass
    return None


# Formatting the key is a tenth of the per-attribute cost; the memo is capped
# because a peer can send any number of distinct tags.
_KEYS: dict[int, str] = {}
_MAX_KEYS = 8192


def _key(tag: int) -> str:
    key = f"{tag:08X}"
    if len(_KEYS) < _MAX_KEYS:
        _KEYS[tag] = key
    return key


def _path_text(path: tuple[int, ...]) -> str:
    parts = [
        f"({t >> 16:04X},{t & 0xFFFF:04X})" if i % 2 == 0 else f"[{t}]" for i, t in enumerate(path)
    ]
    return "".join(parts)
