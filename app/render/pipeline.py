"""One frame of a DICOM instance to 8-bit display pixels (PS3.4 N.2).

Grayscale: stored values -> modality LUT (Rescale Slope/Intercept, or a Modality
LUT Sequence) -> VOI LUT (a window from the request, else the first Window
Center/Width of the header with its VOI LUT Function, else a VOI LUT Sequence,
else the frame's own minimum to maximum) -> presentation (MONOCHROME1 is
inverted).  Enhanced multi-frame objects keep rescale and window per frame in
their functional groups (PS3.3 C.7.6.16.2.9, C.7.6.16.2.10); those are used
for the selected frame.

Colour: RGB as stored, YBR converted to RGB (pydicom), PALETTE COLOR through
its palette; no window applies (PS3.4 N.2.2 has none for colour).

Then the viewport's source region is cut out, flipped where its width or height
is negative, and scaled to fit the viewport with its aspect ratio kept
(PS3.18 §8.3.5.1.3); the result is at least 1 x 1 pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.pixels.utils import pixel_array

from app.errors import InvalidRequest, NotFound
from app.render.params import RenderParams, Viewport, VoiFunction, Window

Array = np.ndarray[Any, Any]

_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"}


@dataclass(frozen=True, slots=True)
class Rendered:
    """Display pixels: (rows, columns) for grayscale, (rows, columns, 3) for RGB."""

    pixels: Array
    window: Window | None  # the window applied, if any (None: colour or LUT)

    @property
    def mode(self) -> str:
        return "L" if self.pixels.ndim == 2 else "RGB"


def render(path: Path, frame: int, params: RenderParams) -> Rendered:
    """Render frame *frame* (1-based) of the Part 10 file at *path*."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError) as exc:
        raise NotFound(f"the cached instance cannot be read: {exc}") from exc
    if "Rows" not in ds or "Columns" not in ds:
        raise NotFound("the instance holds no image to render")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= frames:
        raise NotFound(
            f"frame {frame} does not exist: the instance has {frames} "
            f"frame{'s' if frames != 1 else ''}"
        )
    try:
        stored = pixel_array(path, index=frame - 1)
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        raise NotFound(f"the instance's pixel data cannot be decoded: {exc}") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric in _COLOUR or stored.ndim == 3:
        out: Array = _colour(stored, ds, photometric)
        window = None
    else:
        values = _modality(stored, ds, frame - 1)
        out, window = _voi(values, ds, frame - 1, params.window)
        if photometric == "MONOCHROME1":
            out = 255 - out
    return Rendered(_viewport(out, params.viewport), window)


# -- modality LUT ------------------------------------------------------------------


def _frame_item(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The item of functional group *sequence* for frame *index*: per-frame first,
    then shared (PS3.3 C.7.6.16)."""
    for groups, i in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items is not None and len(items) > i:
            inner = items[i].get(sequence)
            if inner:
                item: Dataset = inner[0]
                return item
    return None


def _modality(stored: Array, ds: Dataset, index: int) -> Array:
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    source = (
        ds if "RescaleSlope" in ds else _frame_item(ds, index, "PixelValueTransformationSequence")
    )
    slope, intercept = 1.0, 0.0
    if source is not None:
        slope = float(source.get("RescaleSlope", 1) or 1)
        intercept = float(source.get("RescaleIntercept", 0) or 0)
    return stored.astype(np.float64) * slope + intercept


# -- VOI LUT -----------------------------------------------------------------------


def _first(value: Any) -> float | None:
    """The first value of a DS that may be multi-valued (several windows)."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def header_window(ds: Dataset, index: int) -> Window | None:
    """The first window of the header, or of the frame's Frame VOI LUT functional group."""
    for source in (ds, _frame_item(ds, index, "FrameVOILUTSequence")):
        if source is None:
            continue
        center, width = _first(source.get("WindowCenter")), _first(source.get("WindowWidth"))
        if center is None or width is None or width <= 0:
            continue
        name = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        try:
            function = VoiFunction(name)
        except ValueError:
            function = VoiFunction.LINEAR
        if function is VoiFunction.LINEAR and width < 1:
            width = 1.0
        return Window(center, width, function)
    return None


def apply_window(values: Array, window: Window) -> Array:
    """PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.1 (SIGMOID), C.11.2.1.3.2 (LINEAR_EXACT),
    output range 0-255."""
    c, w = window.center, window.width
    if window.function is VoiFunction.SIGMOID:
        with np.errstate(over="ignore"):  # exp overflows to inf far below c: y = 0
            y = 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    elif window.function is VoiFunction.LINEAR_EXACT:
        y = np.where(
            values <= c - w / 2,
            0.0,
            np.where(values > c + w / 2, 255.0, ((values - c) / w + 0.5) * 255.0),
        )
    else:
        low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
        ramp = ((values - (c - 0.5)) / max(w - 1, 1e-9) + 0.5) * 255.0
        y = np.where(values <= low, 0.0, np.where(values > high, 255.0, ramp))
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _voi(
    values: Array, ds: Dataset, index: int, asked: Window | None
) -> tuple[Array, Window | None]:
    window = asked or header_window(ds, index)
    if window is not None:
        return apply_window(values, window), window
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2]) or 16
        lut = np.asarray(apply_voi(values.astype(np.int64), ds, index=0), dtype=np.float64)
        return np.clip(np.rint(lut * 255.0 / (2**bits - 1)), 0, 255).astype(np.uint8), None
    # No window anywhere: the frame's own range, as a LINEAR_EXACT window over it.
    low, high = float(values.min()), float(values.max())
    full = Window((low + high) / 2, max(high - low, 1e-9), VoiFunction.LINEAR_EXACT)
    return apply_window(values, full), full


# -- colour ------------------------------------------------------------------------


def _colour(stored: Array, ds: Dataset, photometric: str) -> Array:
    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(stored, ds))
        bits = 16 if rgb.dtype.itemsize > 1 else 8
    else:
        rgb = stored
        bits = int(ds.get("BitsStored", 8) or 8)
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=-1)
    if bits > 8:
        rgb = rgb.astype(np.float64) * 255.0 / (2**bits - 1)
        rgb = np.clip(np.rint(rgb), 0, 255)
    out: Array = rgb.astype(np.uint8)
    return out


# -- viewport ----------------------------------------------------------------------


def fitted_size(region: tuple[int, int], viewport: Viewport) -> tuple[int, int]:
    """(width, height) of a *region* (width, height) scaled to fit *viewport*."""
    width, height = region
    scale = min(viewport.width / width, viewport.height / height)
    if not viewport.enlarge:
        scale = min(scale, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _viewport(pixels: Array, viewport: Viewport | None) -> Array:
    if viewport is None:
        return pixels
    rows, columns = pixels.shape[:2]
    if viewport.sx >= columns or viewport.sy >= rows:
        raise InvalidRequest(
            f"viewport: the source region starts outside the {columns} x {rows} image"
        )
    sw = abs(viewport.sw) if viewport.sw is not None else columns - viewport.sx
    sh = abs(viewport.sh) if viewport.sh is not None else rows - viewport.sy
    region = pixels[viewport.sy : viewport.sy + sh, viewport.sx : viewport.sx + sw]
    if viewport.sw is not None and viewport.sw < 0:
        region = region[:, ::-1]
    if viewport.sh is not None and viewport.sh < 0:
        region = region[::-1, :]
    size = fitted_size((region.shape[1], region.shape[0]), viewport)
    if size == (region.shape[1], region.shape[0]):
        return np.ascontiguousarray(region)
    image = Image.fromarray(np.ascontiguousarray(region))
    resized: Array = np.asarray(image.resize(size, Image.Resampling.LANCZOS))
    return resized
