"""The rendering query parameters of PS3.18 §8.3.5.1: ``window``, ``viewport``, ``quality``.

Unknown parameters are ignored, as PS3.18 §8.3 asks; ``annotation`` and
``iccprofile`` are checked (a supported parameter with an invalid value is
400, §8.3) and not applied (no burned-in text, no ICC profile), which the
conformance statement says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from app.errors import InvalidQuery

DEFAULT_QUALITY = 90


class VoiFunction(StrEnum):
    """VOI LUT Function (0028,1056), PS3.3 C.11.2.1.3; lower case in the query."""

    LINEAR = "LINEAR"
    LINEAR_EXACT = "LINEAR_EXACT"
    SIGMOID = "SIGMOID"


@dataclass(frozen=True, slots=True)
class Window:
    center: float
    width: float
    function: VoiFunction = VoiFunction.LINEAR


@dataclass(frozen=True, slots=True)
class Viewport:
    """``vw,vh[,sx,sy,sw,sh]`` (PS3.18 §8.3.5.1.3).

    The source region starts at (``sx``, ``sy``) and spans ``sw`` x ``sh``
    pixels (None: to the image's edge); a negative ``sw`` or ``sh`` flips
    that axis.  The region is scaled to fit ``vw`` x ``vh``, aspect ratio kept.
    """

    width: int
    height: int
    sx: int = 0
    sy: int = 0
    sw: int | None = None
    sh: int | None = None
    # Thumbnails fit a small image into the box without enlarging it.
    enlarge: bool = True


@dataclass(frozen=True, slots=True)
class RenderParams:
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int = DEFAULT_QUALITY


def _number(parameter: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidQuery(parameter, f"{text[:30]!r} is not a number") from None
    if not math.isfinite(value):
        raise InvalidQuery(parameter, f"{text[:30]!r} is not a finite number")
    return value


def parse_window(text: str) -> Window:
    """``center,width[,function]``; function ``linear`` (default), ``linear-exact``
    or ``sigmoid`` (PS3.18 §8.3.5.1.4, PS3.3 C.11.2.1.2-3)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise InvalidQuery("window", "expected center,width[,linear|linear-exact|sigmoid]")
    center = _number("window", parts[0])
    width = _number("window", parts[1])
    name = parts[2].lower() if len(parts) == 3 and parts[2] else "linear"
    try:
        function = VoiFunction(name.upper().replace("-", "_"))
    except ValueError:
        raise InvalidQuery(
            "window", f"function {name[:20]!r} is not linear, linear-exact or sigmoid"
        ) from None
    # PS3.3 C.11.2.1.2.1: width >= 1 for LINEAR; > 0 for the other two.
    if (function is VoiFunction.LINEAR and width < 1) or width <= 0:
        raise InvalidQuery("window", f"width {parts[1]} is too small for {name}")
    return Window(center, width, function)


def parse_viewport(text: str) -> Viewport:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 6):
        raise InvalidQuery("viewport", "expected vw,vh or vw,vh,sx,sy,sw,sh")

    def integer(index: int, *, positive: bool = False) -> int | None:
        if not parts[index]:
            return None
        value = _number("viewport", parts[index])
        if value != int(value):
            raise InvalidQuery("viewport", f"{parts[index]!r} is not a whole number of pixels")
        if positive and value < 1:
            raise InvalidQuery("viewport", f"{parts[index]!r} must be at least 1")
        return int(value)

    width, height = integer(0, positive=True), integer(1, positive=True)
    if width is None or height is None:
        raise InvalidQuery("viewport", "vw and vh are required")
    if max(width, height) > 8192:
        raise InvalidQuery("viewport", "vw and vh are limited to 8192 pixels")
    if len(parts) == 2:
        return Viewport(width, height)
    sx, sy = integer(2) or 0, integer(3) or 0
    if sx < 0 or sy < 0:
        raise InvalidQuery("viewport", "sx and sy cannot be negative")
    sw, sh = integer(4), integer(5)
    if sw == 0 or sh == 0:
        raise InvalidQuery("viewport", "sw and sh cannot be zero")
    return Viewport(width, height, sx, sy, sw, sh)


def parse_quality(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise InvalidQuery("quality", f"{text[:20]!r} is not a whole number") from None
    if not 1 <= value <= 100:
        raise InvalidQuery("quality", "must be between 1 and 100")
    return value


# PS3.18 §8.3.5.1.1 and §8.3.5.1.5.
ANNOTATIONS = ("patient", "technique")
ICC_PROFILES = ("no", "yes", "srgb", "adobergb", "rommrgb")


def check_annotation(text: str) -> None:
    """``annotation=patient,technique`` (either or both)."""
    for item in text.split(","):
        if item.strip().lower() not in ANNOTATIONS:
            raise InvalidQuery("annotation", f"{item.strip()[:30]!r} is not patient or technique")


def check_iccprofile(text: str) -> None:
    if text.strip().lower() not in ICC_PROFILES:
        raise InvalidQuery("iccprofile", f"{text[:30]!r} is not one of {', '.join(ICC_PROFILES)}")


def parse(
    window: str | None, viewport: str | None, quality: str | None, *, default_viewport: int = 0
) -> RenderParams:
    """The parameters of one request; *default_viewport* (thumbnails) bounds the
    output size when no viewport is given."""
    vp = parse_viewport(viewport) if viewport else None
    if vp is None and default_viewport:
        vp = Viewport(default_viewport, default_viewport, enlarge=False)
    return RenderParams(
        window=parse_window(window) if window else None,
        viewport=vp,
        quality=parse_quality(quality) if quality else DEFAULT_QUALITY,
    )
