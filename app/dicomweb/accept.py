"""Media type negotiation for WADO-RS (PS3.18 2024c §8.7, Table 10.4.4-1).

``negotiate(resource, accept_header, accept_params)`` picks the one
representation the response will use, or raises ``NotAcceptable`` (406) naming
what was asked and what is offered.

Rules, with their sources:

- The ``accept`` query parameter, when present (repeated, or a comma list),
  replaces the Accept header (§8.7.8, §8.3.3.1).
- Media ranges are tried by descending q-value, ties in the order given
  (§8.7.8); q=0 means "not acceptable" (RFC 9110 §12.4.2) and also removes that
  exact type from what a wildcard may stand for.
- A missing or empty Accept, and ``*/*``, select the resource's default
  (§8.7.5, §8.7.8; a missing Accept is treated as ``*/*``).
- Quotes around parameter values are optional (§8.7.1); parameter names and
  types are case-insensitive (RFC 9110 §8.3.1); a repeated parameter is
  tolerated (OHIF may send ``transfer-syntax`` twice): "*" wins, then Explicit
  VR Little Endian, then the first value.
- Without a ``transfer-syntax`` parameter, pixel data and instances are sent in
  Explicit VR Little Endian (§8.7.3.4, §8.7.3.5.2); ``transfer-syntax=*`` means
  "any": as stored, no transcoding (§8.7.3.5.2). Implicit VR Little Endian and
  Explicit VR Big Endian shall not be used (§8.7.3.5.2), so asking for them
  explicitly is not acceptable. Any other transfer syntax UID is carried through:
  whether a given stored instance can be delivered in it is decided per
  instance by ``app.dicomweb.instances``.

Offered (CONFORMANCE-NOTES §3.2):

=========  ===================================================  ===================
resource   media type                                           transfer syntax
=========  ===================================================  ===================
INSTANCES  ``multipart/related; type="application/dicom"``      default EVRLE, ``*``
           ``application/dicom`` (only with ``single=True``)
METADATA   ``application/dicom+json``, ``application/json``     none
SEARCH     (as METADATA)
FRAMES     ``multipart/related; type="application/octet-stream"``  default EVRLE, ``*``
           ``application/octet-stream`` (only with ``single=True``)
           ``multipart/related; type="image/jpeg"`` (and jls, jp2,  as stored, see below
           jpx, jphc, dicom-rle; single-part with ``single=True``)
BULKDATA   ``multipart/related; type="application/octet-stream"``  default EVRLE, ``*``
           ``application/octet-stream``
RENDERED   ``image/jpeg`` (default), ``image/png``, ``image/gif``  none
           (``negotiate_rendered``)
=========  ===================================================  ===================

Frames in a compressed media type (Table 8.7.3-5) are the stored codestream:
the gateway does not compress.  Without a ``transfer-syntax`` parameter the
choice is recorded as ``"*"`` and any stored syntax of that media type will
do; with one, it must be the stored syntax.  The route checks the instance.

Not offered (yet), hence 406 unless something else asked for is offered:
``multipart/related; type="application/dicom+xml"`` for metadata, the
``video/*`` types and compressed types for bulk data, and
``multipart/related; type="application/octet-stream"`` for whole instances.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from app.dicomweb.query import valid_uid
from app.errors import InvalidRequest, NotAcceptable

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
ANY_TRANSFER_SYNTAX = "*"

# PS3.18 §8.7.3.5.2: these "shall not be used" in DICOMweb responses.
_FORBIDDEN_SYNTAXES = {
    IMPLICIT_VR_LITTLE_ENDIAN: "Implicit VR Little Endian",
    EXPLICIT_VR_BIG_ENDIAN: "Explicit VR Big Endian",
}

# PS3.18 Table 8.7.3-5: the media types of compressed pixel data, and the
# transfer syntaxes each may carry (the first is the type's default).
COMPRESSED_FRAME_TYPES: dict[str, tuple[str, ...]] = {
    "image/jpeg": (
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
    ),
    "image/dicom-rle": ("1.2.840.10008.1.2.5",),
    "image/jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/jp2": ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"),
    "image/jpx": ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
    "image/jphc": (
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    ),
}

_DICOM = "application/dicom"
_OCTET_STREAM = "application/octet-stream"
_DICOM_JSON = "application/dicom+json"
_JSON = "application/json"
_MULTIPART = "multipart/related"

# Longest echo of the client's Accept value in an error message.
_MAX_ECHO = 300


class ResourceKind(enum.Enum):
    """What a WADO-RS request retrieves (PS3.18 Table 10.4.1-1 and §10.4.1.1), or a
    QIDO-RS search, whose results negotiate as metadata does."""

    INSTANCES = "instances"  # study, series or instance: DICOM Part 10 instances
    METADATA = "metadata"  # DICOM JSON of study, series or instance
    SEARCH = "search"  # QIDO-RS results: DICOM JSON too (PS3.18 Table 10.6.4-1)
    FRAMES = "frames"  # pixel data of some frames of one instance
    BULKDATA = "bulkdata"  # one bulk data value, or the pixel data of an instance


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The representation chosen for a response.

    ``media_type`` is the response Content-Type without the boundary, e.g.
    ``multipart/related; type="application/dicom"``; ``part_type`` is the bare
    media type of each part (or of the whole body when not multipart);
    ``transfer_syntax`` is a UID, ``"*"`` (as stored) or ``None`` (no transfer
    syntax applies: metadata).
    """

    media_type: str
    part_type: str
    transfer_syntax: str | None

    @property
    def multipart(self) -> bool:
        return self.media_type.startswith(_MULTIPART)


@dataclass(frozen=True, slots=True)
class _Range:
    """One media range of an Accept value."""

    type: str  # "multipart/related", "application/*", "*/*", ...
    params: dict[str, list[str]]  # lower-case names, unquoted values, before q
    q: float
    text: str  # as sent, for messages


def negotiate(
    resource: ResourceKind,
    accept_header: str | None,
    accept_params: Sequence[str],
    *,
    single: bool = False,
    stored_syntax: str | None = None,
) -> Negotiated:
    """Choose the response representation for *resource* (PS3.18 §8.7.8).

    *accept_params* are the values of the ``accept`` query parameter (each may be
    a comma list); when there are any, *accept_header* is ignored. *single* says
    the response holds exactly one item (one instance, one frame), which allows
    the single-part types ``application/dicom`` and ``application/octet-stream``
    (Table 10.4.4-1 note 3; single-part bulk data is always allowed).
    *stored_syntax*, once the instance is known: compressed frame types the
    instance is not stored in are passed over for the client's next choice.

    Raises ``InvalidRequest`` for a malformed media range or q-value, and
    ``NotAcceptable`` when nothing asked for is offered.
    """
    values = [p for p in accept_params if p.strip()]
    source = "accept query parameter" if values else "Accept header"
    if not values:
        values = [accept_header] if accept_header and accept_header.strip() else []
    ranges = [r for value in values for r in _parse(value, source)]
    if not ranges:
        return _default(resource)

    excluded = {_exclusion_key(r) for r in ranges if r.q == 0}
    reasons: list[str] = []
    # sorted() is stable: equal q-values keep the client's order.
    for rng in sorted((r for r in ranges if r.q > 0), key=lambda r: -r.q):
        chosen = _match(resource, rng, single, reasons, stored_syntax)
        if chosen is not None and (chosen.media_type, chosen.part_type) not in excluded:
            return chosen
    asked = ", ".join(r.text for r in ranges)
    if len(asked) > _MAX_ECHO:
        asked = asked[:_MAX_ECHO] + "..."
    offered = "; or ".join(_offers(resource, single))
    because = f" Refused: {'; '.join(dict.fromkeys(reasons))}." if reasons else ""
    raise NotAcceptable(
        f"none of the media types asked for can be produced for the {resource.value} "
        f"resource. Asked: {asked}.{because} Offered: {offered}."
    )


RENDERED_TYPES = ("image/jpeg", "image/png", "image/gif")


def negotiate_rendered(accept_header: str | None, accept_params: Sequence[str]) -> str:
    """The rendered media type to produce (PS3.18 §8.7.4, Table 8.7.4-1).

    ``image/jpeg`` is the default (missing Accept, ``*/*``, ``image/*``);
    ``image/png`` and ``image/gif`` when asked for.  A ``multipart/related``
    range selects its ``type`` (JPEG without one): resources with several
    images are multipart whatever was asked, single images never are.
    """
    values = [p for p in accept_params if p.strip()]
    source = "accept query parameter" if values else "Accept header"
    if not values:
        values = [accept_header] if accept_header and accept_header.strip() else []
    ranges = [r for value in values for r in _parse(value, source)]
    excluded = {r.type for r in ranges if r.q == 0}
    for rng in sorted((r for r in ranges if r.q > 0), key=lambda r: -r.q):
        asked = rng.type
        if asked in (_MULTIPART, "multipart/*"):
            asked = _first(rng, "type") or RENDERED_TYPES[0]
        if asked in ("*/*", "image/*"):
            chosen = next((t for t in RENDERED_TYPES if t not in excluded), None)
            if chosen is not None:
                return chosen
        elif asked in RENDERED_TYPES and asked not in excluded:
            return asked
    if not ranges:
        return RENDERED_TYPES[0]
    asked_text = ", ".join(r.text for r in ranges)[:_MAX_ECHO]
    raise NotAcceptable(
        f"none of the media types asked for can be produced for a rendered resource. "
        f"Asked: {asked_text}. Offered: {', '.join(RENDERED_TYPES)}."
    )


_JSON_KINDS = (ResourceKind.METADATA, ResourceKind.SEARCH)


def _default(resource: ResourceKind) -> Negotiated:
    if resource in _JSON_KINDS:
        return Negotiated(_DICOM_JSON, _DICOM_JSON, None)
    part = _DICOM if resource is ResourceKind.INSTANCES else _OCTET_STREAM
    return Negotiated(_multipart(part), part, EXPLICIT_VR_LITTLE_ENDIAN)


def _multipart(part_type: str) -> str:
    return f'{_MULTIPART}; type="{part_type}"'


def _offers(resource: ResourceKind, single: bool) -> list[str]:
    if resource in _JSON_KINDS:
        return [_DICOM_JSON, _JSON]
    part = _DICOM if resource is ResourceKind.INSTANCES else _OCTET_STREAM
    syntaxes = f"transfer-syntax {EXPLICIT_VR_LITTLE_ENDIAN} (default) or *"
    offers = [f"{_multipart(part)} with {syntaxes}"]
    if single or resource is ResourceKind.BULKDATA:
        offers.append(f"{part} with {syntaxes}")
    if resource is ResourceKind.FRAMES:
        offers.append(
            f"{_multipart('image/jpeg')} (or {', '.join(list(COMPRESSED_FRAME_TYPES)[1:])}) "
            "for frames stored in that compression"
        )
    return offers


def _match(
    resource: ResourceKind,
    rng: _Range,
    single: bool,
    reasons: list[str],
    stored_syntax: str | None = None,
) -> Negotiated | None:
    """The offer *rng* selects, or None (with the reason appended when it is not obvious)."""
    if rng.type == "*/*":
        return _default(resource)
    if resource in _JSON_KINDS:
        if rng.type in (_DICOM_JSON, _JSON):
            return Negotiated(rng.type, rng.type, None)
        if rng.type == "application/*":
            return _default(resource)
        if rng.type == _MULTIPART and _first(rng, "type") == "application/dicom+xml":
            reasons.append("multipart/related; type=application/dicom+xml is not offered")
        return None

    part = _DICOM if resource is ResourceKind.INSTANCES else _OCTET_STREAM
    if rng.type in (_MULTIPART, "multipart/*"):
        # A multipart range without a type parameter stands for the resource's
        # own part type, as Orthanc and dcm4chee read it.
        asked_part = _first(rng, "type") or part
        if resource is ResourceKind.FRAMES and asked_part.lower() in COMPRESSED_FRAME_TYPES:
            image = asked_part.lower()
            syntax = _compressed_syntax(rng, image, reasons, stored_syntax)
            return None if syntax is None else Negotiated(_multipart(image), image, syntax)
        if not _type_matches(asked_part, part):
            reasons.append(f"part type {asked_part} is not offered")
            return None
        syntax = _transfer_syntax(rng, reasons)
        return None if syntax is None else Negotiated(_multipart(part), part, syntax)

    single_ok = single or resource is ResourceKind.BULKDATA
    if rng.type == part or (rng.type == "application/*" and single_ok):
        if not single_ok:
            reasons.append(f"single-part {part} needs a single item")
            return None
        syntax = _transfer_syntax(rng, reasons)
        return None if syntax is None else Negotiated(part, part, syntax)
    if resource is ResourceKind.FRAMES and rng.type in COMPRESSED_FRAME_TYPES:
        if not single:
            reasons.append(f"single-part {rng.type} needs a single frame")
            return None
        syntax = _compressed_syntax(rng, rng.type, reasons, stored_syntax)
        return None if syntax is None else Negotiated(rng.type, rng.type, syntax)
    if rng.type.startswith(("image/", "video/")):
        reasons.append(f"{rng.type} is not offered")
    return None


def _compressed_syntax(
    rng: _Range, media_type: str, reasons: list[str], stored: str | None
) -> str | None:
    """``"*"`` (any stored syntax of *media_type*), the one asked for, or None.

    With *stored* known, None unless the instance is stored in what was asked:
    the gateway sends compressed frames as stored, it does not compress.
    """
    values = [v.strip() for v in rng.params.get("transfer-syntax", []) if v.strip()]
    family = COMPRESSED_FRAME_TYPES[media_type]
    if not values or ANY_TRANSFER_SYNTAX in values:
        syntax = ANY_TRANSFER_SYNTAX
    else:
        fitting = [v for v in values if v in family]
        if not fitting:
            reasons.append(
                f"transfer syntax {values[0]} is not one of {media_type} ({', '.join(family)})"
            )
            return None
        syntax = fitting[0]
    allowed = family if syntax == ANY_TRANSFER_SYNTAX else (syntax,)
    if stored is not None and stored not in allowed:
        reasons.append(
            f"{media_type} frames are sent as stored, and this instance is stored in "
            f"{stored}, not in {' or '.join(allowed)}"
        )
        return None
    return syntax


def _transfer_syntax(rng: _Range, reasons: list[str]) -> str | None:
    """The transfer syntax a range asks for (§8.7.3.5.2); None if it cannot be served."""
    values = [v.strip() for v in rng.params.get("transfer-syntax", []) if v.strip()]
    if not values:
        return EXPLICIT_VR_LITTLE_ENDIAN
    # A repeated parameter (OHIF) is read as the most permissive of its values.
    if ANY_TRANSFER_SYNTAX in values:
        return ANY_TRANSFER_SYNTAX
    if EXPLICIT_VR_LITTLE_ENDIAN in values:
        return EXPLICIT_VR_LITTLE_ENDIAN
    syntax = values[0]
    forbidden = _FORBIDDEN_SYNTAXES.get(syntax)
    if forbidden is not None:
        reasons.append(
            f"transfer syntax {syntax} ({forbidden}) shall not be used in DICOMweb "
            "responses (PS3.18 §8.7.3.5.2)"
        )
        return None
    if not valid_uid(syntax):
        reasons.append(f"transfer syntax {syntax!r} is not a UID")
        return None
    return syntax


def _type_matches(asked: str, offered: str) -> bool:
    if asked in (offered, "*/*"):
        return True
    return asked.endswith("/*") and offered.startswith(asked[:-1])


def _first(rng: _Range, name: str) -> str | None:
    values = rng.params.get(name)
    return values[0] if values else None


def _exclusion_key(rng: _Range) -> tuple[str, str]:
    """The (media type, part type) a q=0 range rules out."""
    if rng.type == _MULTIPART:
        part = (_first(rng, "type") or "").lower()
        return (_multipart(part), part)
    return (rng.type, rng.type)


# -- parsing (RFC 9110 §12.5.1, §5.6.6) ------------------------------------------------------


def _parse(value: str, source: str) -> list[_Range]:
    ranges = []
    for item in _split(value, ","):
        item = item.strip()
        if item:
            ranges.append(_parse_range(item, source))
    return ranges


def _parse_range(text: str, source: str) -> _Range:
    pieces = list(_split(text, ";"))
    media = pieces[0].strip().lower()
    main, slash, sub = media.partition("/")
    if not slash or not main or not sub or "/" in sub or (main == "*" and sub != "*"):
        raise InvalidRequest(f"{source}: {text!r} is not a media range (type/subtype)")
    params: dict[str, list[str]] = {}
    q = 1.0
    for piece in pieces[1:]:
        name, eq, raw = piece.partition("=")
        name = name.strip().lower()
        if not name:
            continue
        if name == "q":
            q = _qvalue(raw.strip(), text, source)
            # Parameters after q are accept-extensions, not media type parameters.
            break
        value = _unquote(raw.strip()) if eq else ""
        if name == "type":
            value = value.lower()
        params.setdefault(name, []).append(value)
    return _Range(media, params, q, text)


def _qvalue(raw: str, text: str, source: str) -> float:
    try:
        q = float(raw)
    except ValueError:
        q = -1.0
    if not 0.0 <= q <= 1.0:
        raise InvalidRequest(f"{source}: q-value in {text!r} must be between 0 and 1")
    return q


def _split(text: str, sep: str) -> Iterator[str]:
    """Split at *sep* outside double quotes (a quoted type may hold ';' or ',')."""
    start = 0
    quoted = False
    escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == sep and not quoted:
            yield text[start:i]
            start = i + 1
    yield text[start:]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        out = []
        escaped = False
        for char in inner:
            if escaped or char != "\\":
                out.append(char)
                escaped = False
            else:
                escaped = True
        return "".join(out)
    # An unbalanced quote (e.g. transfer-syntax="*) is read without it.
    return value.strip('"')
