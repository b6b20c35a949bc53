"""Rendering without a PACS: parameters, media types, the pixel pipeline and encoding.

Grayscale references come from pydicom's own modality LUT and windowing
(``tests.render_reference``); colour ones from pydicom's colour conversion and
palette lookup.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.processing import apply_color_lut, convert_color_space
from pydicom.pixels.utils import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from app.dicomweb.accept import negotiate_rendered
from app.errors import InvalidQuery, InvalidRequest, NotAcceptable, NotFound
from app.render.encode import RenderedType, encode
from app.render.params import Viewport, VoiFunction, Window, parse, parse_viewport, parse_window
from app.render.pipeline import fitted_size, render
from tests.render_reference import reference


def _write(
    tmp_path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
    **attributes: object,
) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12 if not signed else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# -- parameters --------------------------------------------------------------------------


def test_window_parameter_forms() -> None:
    assert parse_window("40,400") == Window(40, 400, VoiFunction.LINEAR)
    assert parse_window("40.5,400,linear-exact") == Window(40.5, 400, VoiFunction.LINEAR_EXACT)
    assert parse_window("0,1,SIGMOID").function is VoiFunction.SIGMOID
    assert parse_window("0,0.5,sigmoid").width == 0.5  # > 0 is enough but for LINEAR
    for bad in ("40", "40,400,cubic", "x,400", "40,0.5", "40,nan", "1,2,3,4"):
        with pytest.raises(InvalidQuery) as caught:
            parse_window(bad)
        assert caught.value.parameter == "window"


def test_viewport_parameter_forms() -> None:
    assert parse_viewport("256,256") == Viewport(256, 256)
    assert parse_viewport("100,50,10,20,-30,40") == Viewport(100, 50, 10, 20, -30, 40)
    assert parse_viewport("100,50,,,,") == Viewport(100, 50, 0, 0, None, None)
    for bad in ("256", "0,10", "10,10,-1,0,5,5", "10,10,0,0,0,5", "1.5,2", "9000,10"):
        with pytest.raises(InvalidQuery):
            parse_viewport(bad)


def test_thumbnail_default_box_does_not_enlarge() -> None:
    params = parse(None, None, None, default_viewport=256)
    assert params.viewport == Viewport(256, 256, enlarge=False)
    assert params.quality == 90
    assert fitted_size((64, 32), params.viewport) == (64, 32)
    assert fitted_size((512, 384), params.viewport) == (256, 192)
    assert fitted_size((512, 384), Viewport(100, 100)) == (100, 75)
    assert fitted_size((10, 10), Viewport(30, 40)) == (30, 30)


# -- media types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "params", "chosen"),
    [
        (None, [], "image/jpeg"),
        ("*/*", [], "image/jpeg"),
        ("image/*", [], "image/jpeg"),
        ("image/png", [], "image/png"),
        ("image/webp, image/gif;q=0.5", [], "image/gif"),
        ("image/jpeg;q=0.4, image/png", [], "image/png"),
        ('multipart/related; type="image/png"', [], "image/png"),
        ("image/jpeg;q=0, image/*", [], "image/png"),
        ("application/dicom", ["image/png"], "image/png"),  # the parameter wins
    ],
)
def test_rendered_media_type_negotiation(
    accept: str | None, params: list[str], chosen: str
) -> None:
    assert negotiate_rendered(accept, params) == chosen


def test_no_rendered_type_acceptable_is_406() -> None:
    with pytest.raises(NotAcceptable, match="image/jpeg, image/png, image/gif"):
        negotiate_rendered("application/dicom, image/webp", [])


# -- grayscale ---------------------------------------------------------------------------


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    ramp = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    path = _write(
        tmp_path, ramp, photometric="MONOCHROME1", WindowCenter="2048", WindowWidth="4096"
    )
    out = render(path, 1, parse(None, None, None)).pixels
    np.testing.assert_array_equal(out, reference(path))
    # The lowest value shows white, the highest black.
    assert out[0, 0] == 255 and out[-1, -1] < 5


def test_signed_pixels_with_rescale_and_the_header_window(tmp_path: Path) -> None:
    hu = np.linspace(-1000, 1000, 64 * 64).reshape(64, 64).round()
    stored = ((hu + 1024) / 2).astype(np.int16)  # slope 2, intercept -1024
    path = _write(
        tmp_path,
        stored,
        signed=True,
        RescaleSlope="2",
        RescaleIntercept="-1024",
        WindowCenter=["40", "400"],
        WindowWidth=["400", "2000"],
    )
    rendered = render(path, 1, parse(None, None, None))
    assert rendered.window == Window(40, 400)  # the first of two windows
    np.testing.assert_array_equal(rendered.pixels, reference(path))


def test_without_any_window_the_frame_range_is_shown(tmp_path: Path) -> None:
    stored = np.arange(1000, 1000 + 32 * 32, dtype=np.uint16).reshape(32, 32)
    path = _write(tmp_path, stored)
    out = render(path, 1, parse(None, None, None)).pixels
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)


def test_a_frame_beyond_the_last_is_not_found(tmp_path: Path) -> None:
    path = _write(tmp_path, np.zeros((4, 4), dtype=np.uint16))
    with pytest.raises(NotFound, match="has 1 frame"):
        render(path, 2, parse(None, None, None))


def test_viewport_region_outside_the_image_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, np.zeros((4, 4), dtype=np.uint16))
    with pytest.raises(InvalidRequest, match="outside"):
        render(path, 1, parse(None, "10,10,4,0,2,2", None))


def test_flips_follow_negative_region_sizes(tmp_path: Path) -> None:
    stored = np.arange(16, dtype=np.uint16).reshape(4, 4) * 200
    path = _write(tmp_path, stored, WindowCenter="1500", WindowWidth="3001")
    plain = render(path, 1, parse(None, None, None)).pixels
    flipped = render(path, 1, parse(None, "4,4,0,0,-4,-4", None)).pixels
    np.testing.assert_array_equal(flipped, plain[::-1, ::-1])
    cropped = render(path, 1, parse(None, "2,2,1,1,2,2", None)).pixels
    np.testing.assert_array_equal(cropped, plain[1:3, 1:3])


# -- colour ------------------------------------------------------------------------------


def test_rgb_is_shown_as_stored() -> None:
    path = Path(get_testdata_file("examples_rgb_color.dcm"))
    out = render(path, 1, parse("0,1", None, None))  # a window does not apply to colour
    assert out.mode == "RGB" and out.window is None
    np.testing.assert_array_equal(out.pixels, dcmread(path).pixel_array)


def test_ybr_is_converted_to_rgb() -> None:
    path = Path(get_testdata_file("examples_ybr_color.dcm"))
    assert dcmread(path).PhotometricInterpretation == "YBR_FULL_422"
    # 30 frames: the one asked for is rendered.
    raw = pixel_array(path, raw=True, index=4)
    want = convert_color_space(raw, "YBR_FULL", "RGB")
    got = render(path, 5, parse(None, None, None)).pixels
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert not np.array_equal(got, render(path, 1, parse(None, None, None)).pixels)


def test_palette_color_goes_through_its_palette() -> None:
    path = Path(get_testdata_file("examples_palette.dcm"))
    ds = dcmread(path)
    lut = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    want = np.clip(np.rint(lut * 255 / 65535), 0, 255).astype(np.uint8)
    got = render(path, 1, parse(None, None, None)).pixels
    assert got.shape == (*ds.pixel_array.shape, 3)
    np.testing.assert_array_equal(got, want)


# -- encoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [RenderedType.PNG, RenderedType.GIF])
def test_png_and_gif_are_lossless_for_grayscale(tmp_path: Path, kind: RenderedType) -> None:
    ramp = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    rendered = render(
        _write(tmp_path, ramp, WindowCenter="2048", WindowWidth="4096"), 1, parse(None, None, None)
    )
    data = encode(rendered, kind, 90)
    back = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    np.testing.assert_array_equal(back, rendered.pixels)


def test_jpeg_quality_trades_size_for_fidelity() -> None:
    path = Path(get_testdata_file("examples_rgb_color.dcm"))
    rendered = render(path, 1, parse(None, None, None))
    small, large = (encode(rendered, RenderedType.JPEG, q) for q in (10, 95))
    assert len(small) < len(large)
    image = Image.open(io.BytesIO(large))
    assert image.format == "JPEG" and image.size == rendered.pixels.shape[1::-1]
