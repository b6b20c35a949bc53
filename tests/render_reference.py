"""Reference display pixels computed with pydicom's own pixel pipeline, for the rendering tests.

Independent of ``app.render``: pydicom applies the modality LUT and the window
(``apply_modality_lut``, ``apply_windowing``, PS3.3 C.11.2) into its own output
range, which is then mapped linearly onto 0-255.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_windowing

Array = np.ndarray[Any, Any]


def _flat(ds: Dataset, frame_index: int) -> Dataset:
    """A dataset with the frame's rescale and window at top level (enhanced objects)."""
    flat = Dataset()
    for keyword in ("PhotometricInterpretation", "BitsStored", "PixelRepresentation"):
        setattr(flat, keyword, ds[keyword].value)
    for keyword in (
        "RescaleSlope",
        "RescaleIntercept",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
    ):
        if keyword in ds:
            setattr(flat, keyword, ds[keyword].value)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        item = per_frame[frame_index]
        for seq in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if seq in item:
                for elem in item[seq][0]:
                    if elem.keyword in (
                        "RescaleSlope",
                        "RescaleIntercept",
                        "WindowCenter",
                        "WindowWidth",
                        "VOILUTFunction",
                    ):
                        setattr(flat, elem.keyword, elem.value)
    return flat


def reference(path: Path, frame: int = 1, window: tuple[float, float, str] | None = None) -> Array:
    """8-bit display pixels of frame *frame* (1-based) of a grayscale file."""
    ds = dcmread(path, force=True)
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[frame - 1]
    flat = _flat(ds, frame - 1)
    if window is not None:
        flat.WindowCenter, flat.WindowWidth, flat.VOILUTFunction = window
    values = apply_modality_lut(pixels, flat) if "RescaleSlope" in flat else pixels
    # pydicom's output range for this data set: where -inf and +inf land.
    with np.errstate(over="ignore"):  # the sigmoid's exp at the far ends
        low, high = apply_windowing(np.array([-1e12, 1e12]), flat)
        windowed = apply_windowing(values.astype(np.float64), flat)
    out = (windowed - low) / (high - low) * 255.0
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        out = 255 - out
    return out
