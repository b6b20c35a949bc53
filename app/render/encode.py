"""Display pixels to JPEG, PNG or GIF bytes (Pillow)."""

from __future__ import annotations

import io
from enum import StrEnum

from PIL import Image

from app.render.pipeline import Rendered


class RenderedType(StrEnum):
    """Rendered media types (PS3.18 Table 8.7.4-1): JPEG is the default."""

    JPEG = "image/jpeg"
    PNG = "image/png"
    GIF = "image/gif"


def encode(rendered: Rendered, media_type: RenderedType, quality: int) -> bytes:
    """PNG and GIF are lossless for grayscale; *quality* applies to JPEG only."""
    image = Image.fromarray(rendered.pixels, mode=None)
    out = io.BytesIO()
    if media_type is RenderedType.JPEG:
        image.save(out, "JPEG", quality=quality)
    elif media_type is RenderedType.PNG:
        image.save(out, "PNG", compress_level=4)
    else:
        image.save(out, "GIF")
    return out.getvalue()
