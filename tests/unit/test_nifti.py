"""Unit tests for app.convert: DICOM series -> Volume -> NIfTI-1, and the BIDS sidecar.

Everything runs on app.sampledata's deterministic CT and MR series (and a few
files pydicom ships), written to a temporary folder.  Comparisons with dcm2niix
and real scanner files are in tests/integration/test_nifti_dcm2niix.py.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import random
import struct
import threading
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from app.convert.nifti import (
    NIFTI_HEADER_SIZE,
    Volume,
    build_part,
    build_volume,
    build_volumes,
    nifti_header,
    nifti_size,
    split_series,
    to_nifti,
    write_nifti,
)
from app.convert.sidecar import sidecar
from app.errors import ConversionError, GatewayError
from app.sampledata import ct_series, derive_uid, mr_series, sample_patients, write_datasets

PATIENT = sample_patients()["latin1"]
STUDY_UID = derive_uid("test-nifti", "study")


# ---------------------------------------------------------------------------- helpers


def _ct(**kwargs: Any) -> list[Dataset]:
    args: dict[str, Any] = {"slices": 12, "rows": 48, "cols": 64, "slice_thickness": 2.5}
    args.update(kwargs)
    return list(ct_series(patient=PATIENT, study_uid=STUDY_UID, series_number=1, **args))


def _mr(**kwargs: Any) -> list[Dataset]:
    args: dict[str, Any] = {"slices": 10, "rows": 40, "cols": 56, "oblique": True}
    args.update(kwargs)
    return list(mr_series(patient=PATIENT, study_uid=STUDY_UID, series_number=2, **args))


def _write(datasets: list[Dataset], folder: Path) -> list[Path]:
    return write_datasets(datasets, folder)


def _vector(values: Any) -> np.ndarray:
    return np.array([float(v) for v in values])


def _normal(ds: Dataset) -> np.ndarray:
    iop = _vector(ds.ImageOrientationPatient)
    return np.cross(iop[:3], iop[3:])


def _by_position(datasets: list[Dataset]) -> list[Dataset]:
    """The data sets in the order the converter must put them: ascending along the normal."""
    return sorted(datasets, key=lambda ds: float(_normal(ds) @ _vector(ds.ImagePositionPatient)))


def _renew_uid(ds: Dataset, salt: str) -> Dataset:
    clone = copy.deepcopy(ds)
    uid = UID(derive_uid("test-nifti", salt, ds.SOPInstanceUID))
    clone.SOPInstanceUID = uid
    clone.file_meta.MediaStorageSOPInstanceUID = uid
    return clone


def _refusal(paths: list[Path]) -> str:
    with pytest.raises(ConversionError) as info:
        build_volume(paths)
    assert isinstance(info.value, GatewayError)
    assert info.value.reason in info.value.message
    return info.value.reason


def _nifti_bytes(volume: Volume, *, compress: bool = False) -> bytes:
    return b"".join(bytes(chunk) for chunk in to_nifti(volume, compress=compress))


# ------------------------------------------------------------------------------- CT


def test_axial_ct_keeps_int16_and_hounsfield_units(tmp_path: Path) -> None:
    datasets = _ct()
    volume = build_volume(_write(datasets, tmp_path))

    assert volume.voxels.dtype == np.int16
    assert volume.shape == (12, 48, 64)
    expected = np.stack([ds.pixel_array.astype(np.int32) - 1024 for ds in _by_position(datasets)])
    np.testing.assert_array_equal(volume.voxels, expected)
    assert volume.voxels.min() >= -1024  # air, not the raw stored 0
    assert volume.rescale_slope == 1.0 and volume.rescale_intercept == -1024.0

    # ct_series runs head to feet: the volume starts at the lowest slice.
    lowest = min(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    np.testing.assert_allclose(volume.origin, _vector(lowest.ImagePositionPatient))
    spacing = float(datasets[0].PixelSpacing[0])
    np.testing.assert_allclose(volume.spacing, (spacing, spacing, 2.5))
    np.testing.assert_allclose(np.array(volume.direction), np.eye(3), atol=1e-12)


def test_ct_nifti_header_is_what_dcm2niix_writes(tmp_path: Path) -> None:
    volume = build_volume(_write(_ct(), tmp_path))
    header = nifti_header(volume)
    assert len(header) == NIFTI_HEADER_SIZE == 352
    assert struct.unpack_from("<i", header, 0)[0] == 348
    assert header[344:348] == b"n+1\0"
    assert header[348:352] == b"\0\0\0\0"  # no extensions
    assert struct.unpack_from("<fff", header, 108) == (352.0, 1.0, 0.0)  # vox_offset, scl_*

    path = write_nifti(volume, tmp_path / "ct.nii")
    assert path.stat().st_size == nifti_size(volume)
    img = nib.load(path)
    hdr = img.header
    assert img.shape == (64, 48, 12)
    assert hdr.get_data_dtype() == np.int16
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 1
    assert int(hdr["xyzt_units"]) == 10  # mm and seconds
    assert img.dataobj.slope == 1.0 and img.dataobj.inter == 0.0
    np.testing.assert_allclose(img.affine, volume.affine_ras, atol=1e-4)
    # LPS -> RAS: x and y flip, z stays.
    np.testing.assert_allclose(img.affine[:3, 3], np.array(volume.origin) * [-1, -1, 1], atol=1e-4)
    data = np.asarray(img.dataobj)
    np.testing.assert_array_equal(data, volume.voxels.transpose(2, 1, 0))


# ------------------------------------------------------------------------------- MR


def test_oblique_mr_geometry(tmp_path: Path) -> None:
    datasets = _mr()
    volume = build_volume(_write(datasets, tmp_path))
    first = _by_position(datasets)[0]
    iop = _vector(first.ImageOrientationPatient)
    normal = np.cross(iop[:3], iop[3:])

    assert volume.voxels.dtype == np.int16  # unsigned 12-bit fits int16, as dcm2niix keeps it
    assert volume.shape == (10, 40, 56)
    direction = np.array(volume.direction)
    np.testing.assert_allclose(direction[:, 0], iop[:3], atol=1e-6)
    np.testing.assert_allclose(direction[:, 1], iop[3:], atol=1e-6)
    np.testing.assert_allclose(direction[:, 2], normal / np.linalg.norm(normal), atol=1e-4)
    np.testing.assert_allclose(volume.origin, _vector(first.ImagePositionPatient))
    pixel = float(first.PixelSpacing[0])
    np.testing.assert_allclose(volume.spacing, (pixel, pixel, 6.0), atol=1e-3)
    expected = np.stack([ds.pixel_array for ds in _by_position(datasets)])
    np.testing.assert_array_equal(volume.voxels, expected)

    # The affine maps voxel (i, j, k) to that slice's pixel centre.
    affine = volume.affine_lps
    last = _by_position(datasets)[-1]
    corner = affine @ np.array([0, 0, 9, 1])
    np.testing.assert_allclose(corner[:3], _vector(last.ImagePositionPatient), atol=1e-3)
    far = affine @ np.array([55, 39, 0, 1])
    expected_far = _vector(first.ImagePositionPatient) + 55 * pixel * iop[:3] + 39 * pixel * iop[3:]
    np.testing.assert_allclose(far[:3], expected_far, atol=1e-3)


def test_descending_and_shuffled_orders_give_the_same_volume(tmp_path: Path) -> None:
    datasets = _mr()
    paths = _write(datasets, tmp_path / "ordered")
    reference = build_volume(paths)

    # Reverse the acquisition direction (InstanceNumber 1 at the top) ...
    flipped = [copy.deepcopy(ds) for ds in reversed(datasets)]
    for number, ds in enumerate(flipped, 1):
        ds.InstanceNumber = number
    descending = build_volume(_write(flipped, tmp_path / "descending"))
    # ... and shuffle file order and InstanceNumbers: geometry alone decides.
    rng = random.Random(7)
    shuffled = [copy.deepcopy(ds) for ds in datasets]
    numbers = list(range(1, len(shuffled) + 1))
    rng.shuffle(numbers)
    for ds, number in zip(shuffled, numbers, strict=True):
        ds.InstanceNumber = number
    shuffled_paths = _write(shuffled, tmp_path / "shuffled")
    rng.shuffle(shuffled_paths)

    for other in (descending, build_volume(shuffled_paths), build_volume(list(reversed(paths)))):
        np.testing.assert_array_equal(other.voxels, reference.voxels)
        np.testing.assert_allclose(other.affine_lps, reference.affine_lps)


def test_float32_when_rescale_is_not_integral_or_varies(tmp_path: Path) -> None:
    datasets = _mr(slices=4)
    for ds in datasets:
        ds.RescaleSlope = "0.5"
        ds.RescaleIntercept = "-3.25"
    volume = build_volume(_write(datasets, tmp_path / "fraction"))
    assert volume.voxels.dtype == np.float32
    expected = np.stack([ds.pixel_array * 0.5 - 3.25 for ds in _by_position(datasets)])
    np.testing.assert_allclose(volume.voxels, expected, rtol=1e-6)

    varying = _mr(slices=4)
    for index, ds in enumerate(varying):
        ds.RescaleSlope = str(index + 1)
        ds.RescaleIntercept = "0"
    volume = build_volume(_write(varying, tmp_path / "varying"))
    assert volume.voxels.dtype == np.float32
    assert volume.rescale_slope is None
    expected = np.stack([ds.pixel_array * float(ds.RescaleSlope) for ds in _by_position(varying)])
    np.testing.assert_allclose(volume.voxels, expected)


def test_integral_rescale_beyond_int16_widens(tmp_path: Path) -> None:
    datasets = _mr(slices=3)
    for ds in datasets:
        ds.RescaleSlope = "100"
        ds.RescaleIntercept = "0"
    volume = build_volume(_write(datasets, tmp_path))
    top = max(int(ds.pixel_array.max()) for ds in datasets) * 100
    assert top > 65535
    assert volume.voxels.dtype == np.float32
    assert float(volume.voxels.max()) == top


@pytest.mark.parametrize(("intercept", "dtype"), [(-40000, np.float32), (70000, np.float32)])
def test_ct_intercept_beyond_16_bits_gives_float(
    tmp_path: Path, intercept: int, dtype: type
) -> None:
    datasets = _ct(slices=4)
    for ds in datasets:
        ds.RescaleIntercept = str(intercept)
    volume = build_volume(_write(datasets, tmp_path))
    assert volume.voxels.dtype == dtype
    expected = np.stack(
        [ds.pixel_array.astype(np.int64) + intercept for ds in _by_position(datasets)]
    )
    np.testing.assert_array_equal(volume.voxels, expected)


def test_ct_intercept_into_uint16_range(tmp_path: Path) -> None:
    datasets = _ct(slices=4)
    for ds in datasets:
        ds.RescaleIntercept = "40000"
    volume = build_volume(_write(datasets, tmp_path))
    assert volume.voxels.dtype == np.uint16
    expected = np.stack([ds.pixel_array.astype(np.int64) + 40000 for ds in _by_position(datasets)])
    np.testing.assert_array_equal(volume.voxels, expected)


def test_large_arrays_are_mapped_and_writable() -> None:
    from app.convert.nifti import _allocate

    array = _allocate((40, 512, 512), np.dtype(np.int16))  # 21 MB: mapped, pages populated
    assert array.shape == (40, 512, 512) and array.dtype == np.int16
    assert array.flags.writeable and array.flags.c_contiguous
    array[...] = 7
    assert int(array.sum()) == 7 * 40 * 512 * 512
    small = _allocate((2, 8, 8), np.dtype(np.float32))
    assert small.shape == (2, 8, 8) and small.flags.writeable


def test_uint16_kept_when_values_exceed_int16(tmp_path: Path) -> None:
    datasets = _mr(slices=3)
    for ds in datasets:
        pixels = ds.pixel_array.astype(np.uint16) * 40  # up to ~43000
        ds.BitsStored, ds.HighBit = 16, 15
        ds.PixelData = pixels.tobytes()
    volume = build_volume(_write(datasets, tmp_path))
    assert volume.voxels.dtype == np.uint16
    assert int(volume.voxels.max()) > 32767


# ------------------------------------------------------------------------------- 4-D


def _two_volumes(datasets: list[Dataset]) -> list[Dataset]:
    second = []
    for ds in datasets:
        clone = _renew_uid(ds, "volume-2")
        clone.AcquisitionTime = "094300"
        clone.AcquisitionNumber = 2
        clone.TemporalPositionIdentifier = 2
        clone.PixelData = (ds.pixel_array // 2).astype(np.uint16).tobytes()
        second.append(clone)
    for ds in datasets:
        ds.TemporalPositionIdentifier = 1
    return second + datasets  # the later volume first: order must come from the headers


def test_repeated_positions_make_a_4d_series(tmp_path: Path) -> None:
    datasets = _mr(slices=5, rows=32, cols=32)
    volume = build_volume(_write(_two_volumes(datasets), tmp_path))
    assert volume.shape == (2, 5, 32, 32)
    first = np.stack([ds.pixel_array for ds in _by_position(datasets)])
    np.testing.assert_array_equal(volume.voxels[0], first)
    np.testing.assert_array_equal(volume.voxels[1], first // 2)
    assert volume.repetition_time == pytest.approx(0.5)

    img = nib.Nifti1Image.from_bytes(_nifti_bytes(volume))
    assert img.shape == (32, 32, 5, 2)
    assert img.header["pixdim"][4] == pytest.approx(0.5)  # TR in seconds


def test_incomplete_4d_series_is_refused(tmp_path: Path) -> None:
    datasets = _mr(slices=5, rows=32, cols=32)
    both = _two_volumes(datasets)
    del both[2]  # one slice of the second volume is missing
    reason = _refusal(_write(both, tmp_path))
    assert "incomplete volumes" in reason and "has 1" in reason


# ------------------------------------------------------------------------- refusals


def test_mixed_orientation_is_refused(tmp_path: Path) -> None:
    axial = _mr(oblique=False, slices=4, rows=32, cols=32)
    oblique = [_renew_uid(ds, "oblique") for ds in _mr(oblique=True, slices=4, rows=32, cols=32)]
    reason = _refusal(_write(axial + oblique, tmp_path))
    assert "mixed orientations" in reason
    assert "4 images" in reason


def test_mixed_matrix_size_is_refused(tmp_path: Path) -> None:
    small = _ct(rows=32, cols=32, slices=3)
    large = [_renew_uid(ds, "large") for ds in _ct(rows=48, cols=48, slices=3)]
    reason = _refusal(_write(small + large, tmp_path))
    assert "mixed matrix sizes" in reason and "32x32" in reason and "48x48" in reason


def test_missing_slice_is_refused_with_the_gap(tmp_path: Path) -> None:
    datasets = _ct(slices=10)
    del datasets[4]
    reason = _refusal(_write(datasets, tmp_path))
    assert "not uniform" in reason
    assert "5.00 mm" in reason and "2.50 mm (7x)" in reason
    assert "missing slices" in reason


def test_uneven_spacing_is_refused(tmp_path: Path) -> None:
    datasets = _ct(slices=6)
    z = float(datasets[3].ImagePositionPatient[2])
    datasets[3].ImagePositionPatient[2] = f"{z + 0.6:g}"
    reason = _refusal(_write(datasets, tmp_path))
    assert "not uniform within 0.2 mm" in reason


def _tilted(datasets: list[Dataset], degrees: float, axis: int = 1) -> list[Dataset]:
    """Shear a CT stack as a gantry tilt does: each slice's origin moves with z along ``axis``."""
    for ds in datasets:
        z = float(ds.ImagePositionPatient[2])
        shifted = float(ds.ImagePositionPatient[axis]) + z * math.tan(math.radians(degrees))
        ds.ImagePositionPatient[axis] = f"{shifted:.4f}"
        ds.GantryDetectorTilt = f"{degrees:g}"
    return datasets


@pytest.mark.parametrize("degrees", [15.0, -22.0])
def test_gantry_tilt_is_resampled_onto_the_dicom_positions(tmp_path: Path, degrees: float) -> None:
    """A row ramp (HU = 10 x row) tells where every resampled voxel came from."""
    datasets = _tilted(_ct(slices=9, rows=40, cols=24), degrees)
    for ds in datasets:
        ramp = np.repeat(np.arange(40, dtype=np.int16)[:, None] * 10 + 1024, 24, axis=1)
        ramp[:, -1] = 24  # -1000 HU: the lowest value, which fills what no slice covers
        ds.PixelData = ramp.tobytes()
    volume = build_volume(_write(datasets, tmp_path))
    assert volume.resampled is not None
    assert f"gantry-tilt {abs(degrees):.2f} deg" in volume.resampled
    assert f"GantryDetectorTilt {degrees:g}" in volume.resampled
    row_spacing = float(datasets[0].PixelSpacing[0])
    added = math.ceil(8 * 2.5 * math.tan(math.radians(abs(degrees))) / row_spacing)
    assert volume.shape == (9, 40 + added, 24)
    assert volume.voxels.dtype == np.int16
    np.testing.assert_allclose(np.array(volume.direction), np.eye(3), atol=1e-9)
    assert volume.spacing[2] == pytest.approx(2.5)  # along the normal, not along the shear

    column_spacing = float(datasets[0].PixelSpacing[1])
    by_z = {round(float(ds.ImagePositionPatient[2]), 3): ds for ds in datasets}
    affine = volume.affine_lps
    errors = []
    for k in range(volume.shape[0]):
        for j in range(volume.shape[1]):
            value = int(volume.voxels[k, j, 3])
            if value == -1000:
                continue  # fill outside the scanned field
            x, y, z, _ = affine @ np.array([3.0, j, k, 1.0])
            source = by_z[round(float(z), 3)]
            ipp = _vector(source.ImagePositionPatient)
            assert x == pytest.approx(ipp[0] + 3 * column_spacing)
            # The DICOM row at this world position, by ImagePositionPatient alone.
            row = (y - ipp[1]) / row_spacing
            if 0 <= row <= 39:
                errors.append(value / 10 - row)
    assert len(errors) >= 9 * 38
    # Values are rounded to whole HU: 0.05 of a row.
    assert max(abs(e) for e in errors) <= 0.051


def test_tilt_attribute_alone_does_not_resample(tmp_path: Path) -> None:
    """Positions on the slice normal (a scanner that resampled already): nothing to correct."""
    datasets = _ct(slices=6)
    for ds in datasets:
        ds.GantryDetectorTilt = "12"
    volume = build_volume(_write(datasets, tmp_path))
    assert volume.resampled is None and volume.shape == (6, 48, 64)


def test_shears_that_are_not_a_gantry_tilt_are_refused(tmp_path: Path) -> None:
    sideways = _tilted(_ct(slices=6), 15.0, axis=0)
    reason = _refusal(_write(sideways, tmp_path / "sideways"))
    assert "gantry tilt or sheared stack" in reason and "15.0" in reason
    assert "along the rows (F)" in reason

    uneven = _tilted(_ct(slices=6), 15.0)
    uneven[2].ImagePositionPatient[1] = f"{float(uneven[2].ImagePositionPatient[1]) + 1.5:.4f}"
    reason = _refusal(_write(uneven, tmp_path / "uneven"))
    assert "unequal amounts" in reason

    series = _tilted(_ct(slices=4), 15.0)
    repeated = series + [_renew_uid(ds, "second") for ds in series]
    for ds in repeated[4:]:
        ds.AcquisitionNumber = 2
        ds.TemporalPositionIdentifier = 2
    reason = _refusal(_write(repeated, tmp_path / "4d"))
    assert "only in a single volume" in reason


def test_non_image_objects_are_refused(tmp_path: Path) -> None:
    datasets = _ct(slices=3)
    paths = _write(datasets, tmp_path / "ct")
    report = get_testdata_file("reportsi.dcm")
    assert report is not None
    reason = _refusal([*paths, Path(report)])
    assert "reportsi.dcm" in reason and "structured report" in reason

    no_pixels = copy.deepcopy(datasets[0])
    del no_pixels.PixelData
    reason = _refusal(_write([no_pixels], tmp_path / "no-pixels"))
    assert "no pixel data" in reason

    text = tmp_path / "notes.txt"
    text.write_text("not DICOM at all\n")
    reason = _refusal([text])
    assert "notes.txt" in reason


def test_duplicate_positions_are_refused(tmp_path: Path) -> None:
    datasets = _ct(slices=4)
    clone = _renew_uid(datasets[1], "copy")
    reason = _refusal(_write([*datasets, clone], tmp_path / "twin"))
    assert "incomplete volumes" in reason or "duplicate" in reason

    paths = _write(datasets, tmp_path / "same")
    reason = _refusal([*paths, paths[0]])
    assert "same instance" in reason

    doubled = datasets + [_renew_uid(ds, "copy") for ds in datasets]
    reason = _refusal(_write(doubled, tmp_path / "doubled"))
    assert "duplicate slices" in reason and "tells apart" in reason


def test_mixed_echoes_are_refused_and_split_on_request(tmp_path: Path) -> None:
    first = _mr(slices=4, rows=32, cols=32)
    second = []
    for ds in _mr(slices=4, rows=32, cols=32, echo_time=90.0):
        clone = _renew_uid(ds, "echo-2")
        clone.EchoNumbers = 2
        second.append(clone)
    paths = _write(first + second, tmp_path)
    reason = _refusal(paths)
    assert "mixed echoes" in reason and "TE 12 ms" in reason and "TE 90 ms" in reason

    volumes = build_volumes(paths)
    assert [v.shape for v in volumes] == [(4, 32, 32), (4, 32, 32)]
    assert [float(v.headers[0].EchoTime) for v in volumes] == [12.0, 90.0]


def test_split_order_and_names_do_not_depend_on_file_order(tmp_path: Path) -> None:
    """Echoes in echo order, magnitude before phase, dcm2niix's suffixes, whatever the arrival."""
    datasets = []
    for number, echo_time in ((2, 40.0), (1, 12.0)):
        for kind in ("P", "M"):
            for ds in _mr(slices=3, rows=16, cols=16, echo_time=echo_time):
                clone = _renew_uid(ds, f"{number}-{kind}")
                clone.EchoNumbers = number
                clone.ImageType = ["ORIGINAL", "PRIMARY", kind, "ND"]
                datasets.append(clone)
    paths = _write(datasets, tmp_path)
    random.Random(3).shuffle(paths)
    parts = split_series(paths)
    assert [(p.number, p.echo_number, p.echo_time, p.suffix) for p in parts] == [
        (1, 1, 12.0, "_e1"),
        (2, 1, 12.0, "_e1_ph"),
        (3, 2, 40.0, "_e2"),
        (4, 2, 40.0, "_e2_ph"),
    ]
    assert [p.image_type[2] for p in parts] == ["M", "P", "M", "P"]
    assert all(p.images == 3 for p in parts)
    assert split_series(sorted(paths))[2].suffix == "_e2"

    volume = build_part(parts[2])
    assert volume.shape == (3, 16, 16)
    assert {ds.SOPInstanceUID for ds in volume.headers} <= {
        ds.SOPInstanceUID for ds in datasets if ds.EchoNumbers == 2 and ds.ImageType[2] == "M"
    }
    side = sidecar(volume.headers, echo_number=2, echo_time=40.0)
    assert side["EchoNumber"] == 2 and side["EchoTime"] == 0.04
    # Without a multi-echo context, echo 1 is not named (dcm2niix's single-echo sidecars).
    assert "EchoNumber" not in sidecar(build_part(parts[0]).headers)
    assert sidecar(build_part(parts[0]).headers, echo_number=1)["EchoNumber"] == 1


def test_mixed_orientations_stay_one_part_and_are_refused(tmp_path: Path) -> None:
    axial = _mr(oblique=False, slices=3, rows=16, cols=16)
    oblique = [_renew_uid(ds, "oblique") for ds in _mr(oblique=True, slices=3, rows=16, cols=16)]
    (part,) = split_series(_write(axial + oblique, tmp_path))
    with pytest.raises(ConversionError, match="mixed orientations"):
        build_part(part)


def test_colour_images_are_refused() -> None:
    rgb = get_testdata_file("SC_rgb_small_odd.dcm")
    assert rgb is not None
    reason = _refusal([Path(rgb)])
    assert "colour images (3 samples per pixel" in reason


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("JPEG2000.dcm", "no patient geometry"),  # NM secondary capture without a position
        ("liver_1frame.dcm", "Segmentation Storage) is raw data, a registration or a segmentation"),
        ("rtdose.dcm", "RT dose grid: not converted"),
        ("rtstruct.dcm", "RT structure set, not an image"),
    ],
)
def test_objects_without_a_volume_are_refused(name: str, expected: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    assert expected in _refusal([Path(path)])


# ---------------------------------------------------------------- encodings and multi-frame


@pytest.mark.parametrize(
    "name", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm"]
)
def test_transfer_syntaxes_give_the_same_slice(name: str) -> None:
    reference_path = get_testdata_file("MR_small.dcm")
    other_path = get_testdata_file(name)
    assert reference_path is not None and other_path is not None
    reference = build_volume([Path(reference_path)])
    other = build_volume([Path(other_path)])
    assert reference.shape == (1, 64, 64)
    np.testing.assert_array_equal(other.voxels, reference.voxels)
    np.testing.assert_allclose(other.affine_lps, reference.affine_lps)
    assert reference.spacing[2] == pytest.approx(float(dcmread(reference_path).SliceThickness))


def _enhanced(datasets: list[Dataset], order: list[int]) -> Dataset:
    """An Enhanced MR Image with the classic slices as frames, in ``order``."""
    first = datasets[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.4.1")
    uid = generate_uid(entropy_srcs=["test-nifti-enhanced"])
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    for keyword in (
        "Modality", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
        "SeriesNumber", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
        "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
        "RepetitionTime", "Manufacturer",
    ):  # fmt: skip
        setattr(ds, keyword, getattr(first, keyword))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.NumberOfFrames = len(order)

    measures = Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    frames = []
    for index in order:
        position = Dataset()
        position.ImagePositionPatient = datasets[index].ImagePositionPatient
        content = Dataset()
        content.InStackPositionNumber = index + 1
        transform = Dataset()
        transform.RescaleSlope = "2"
        transform.RescaleIntercept = "-100"
        transform.RescaleType = "US"
        item = Dataset()
        item.PlanePositionSequence = DicomSequence([position])
        item.FrameContentSequence = DicomSequence([content])
        item.PixelValueTransformationSequence = DicomSequence([transform])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = b"".join(datasets[index].PixelData for index in order)
    ds["PixelData"].VR = "OW"
    return ds


def test_enhanced_multi_frame_uses_the_same_geometry(tmp_path: Path) -> None:
    datasets = _mr(slices=6, rows=32, cols=40)
    classic = build_volume(_write(datasets, tmp_path / "classic"))
    order = [3, 0, 5, 1, 4, 2]
    enhanced_ds = _enhanced(datasets, order)
    path = tmp_path / "enhanced.dcm"
    enhanced_ds.save_as(path, enforce_file_format=True)

    enhanced = build_volume([path])
    assert enhanced.shape == classic.shape
    np.testing.assert_allclose(enhanced.affine_lps, classic.affine_lps, atol=1e-9)
    np.testing.assert_array_equal(enhanced.voxels, classic.voxels.astype(np.int32) * 2 - 100)
    assert enhanced.voxels.dtype == np.int16
    assert sidecar(enhanced.headers)["ImageOrientationPatientDICOM"] == [
        float(v) if not float(v).is_integer() else int(float(v))
        for v in datasets[0].ImageOrientationPatient
    ]


def test_enhanced_multi_frame_with_varying_rescale_is_float(tmp_path: Path) -> None:
    datasets = _mr(slices=3, rows=16, cols=16)
    enhanced_ds = _enhanced(datasets, [0, 1, 2])
    enhanced_ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence[
        0
    ].RescaleSlope = "0.25"
    path = tmp_path / "enhanced.dcm"
    enhanced_ds.save_as(path, enforce_file_format=True)
    volume = build_volume([path])
    assert volume.voxels.dtype == np.float32
    by_position = _by_position(datasets)
    slopes = {id(datasets[i]): s for i, s in zip(range(3), (2.0, 0.25, 2.0), strict=True)}
    expected = np.stack([ds.pixel_array * slopes[id(ds)] - 100 for ds in by_position])
    np.testing.assert_allclose(volume.voxels, expected)


# ------------------------------------------------------------------- readers and gzip


def test_nibabel_and_simpleitk_read_the_same_geometry(tmp_path: Path) -> None:
    volume = build_volume(_write(_mr(), tmp_path / "mr"))
    path = write_nifti(volume, tmp_path / "mr.nii.gz")

    img = nib.load(path)
    np.testing.assert_allclose(img.get_sform(), volume.affine_ras, atol=1e-4)
    np.testing.assert_allclose(img.get_qform(), volume.affine_ras, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(img.dataobj), volume.voxels.transpose(2, 1, 0))

    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (56, 40, 10)
    np.testing.assert_allclose(image.GetOrigin(), volume.origin, atol=1e-3)
    np.testing.assert_allclose(image.GetSpacing(), volume.spacing, atol=1e-4)
    np.testing.assert_allclose(
        np.array(image.GetDirection()).reshape(3, 3), np.array(volume.direction), atol=1e-5
    )
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.voxels)
    assert sitk.GetArrayFromImage(image).dtype == np.int16  # no widening to int32

    # The same affine from both readers, in the same (RAS) convention.
    sitk_affine = np.eye(4)
    sitk_affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * image.GetSpacing()
    sitk_affine[:3, 3] = image.GetOrigin()
    np.testing.assert_allclose(np.diag([-1, -1, 1, 1]) @ sitk_affine, img.affine, atol=1e-3)


@pytest.mark.parametrize(("level", "threads"), [(0, 1), (1, 1), (3, 1), (1, 2), (3, 2)])
def test_gzip_output_is_one_valid_gzip_stream(tmp_path: Path, level: int, threads: int) -> None:
    volume = build_volume(_write(_ct(), tmp_path))
    plain = _nifti_bytes(volume)
    chunks = list(to_nifti(volume, compress=True, level=level, threads=threads))
    assert all(isinstance(chunk, bytes) for chunk in chunks)
    packed = b"".join(chunks)
    assert packed[:3] == b"\x1f\x8b\x08"
    assert gzip.decompress(packed) == plain
    assert len(packed) < len(plain)
    assert nib.Nifti1Image.from_bytes(gzip.decompress(packed)).shape == (64, 48, 12)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        next(to_nifti(volume, compress=True, level=9))


def test_abandoned_gzip_stream_stops_its_threads(tmp_path: Path) -> None:
    volume = build_volume(_write(_ct(rows=256, cols=256, slices=40), tmp_path))
    before = threading.active_count()
    stream = to_nifti(volume, compress=True, threads=2)
    first = next(stream)
    assert first[:2] == b"\x1f\x8b"
    assert threading.active_count() > before
    stream.close()  # what a server does when the client goes away
    assert threading.active_count() == before


def test_uncompressed_stream_is_the_header_then_the_voxels(tmp_path: Path) -> None:
    volume = build_volume(_write(_ct(), tmp_path))
    chunks = list(to_nifti(volume, compress=False))
    assert bytes(chunks[0]) == nifti_header(volume)
    data = b"".join(bytes(c) for c in chunks[1:])
    assert data == volume.voxels.tobytes()
    assert sum(len(c) for c in chunks) == nifti_size(volume)


# ------------------------------------------------------------------------------ sidecar


def test_sidecar_mr_fields_and_units(tmp_path: Path) -> None:
    volume = build_volume(_write(_mr(), tmp_path))
    meta = sidecar(volume.headers)
    assert meta["Modality"] == "MR"
    assert meta["EchoTime"] == 0.012 and meta["RepetitionTime"] == 0.5  # seconds
    assert meta["FlipAngle"] == 90
    assert meta["MagneticFieldStrength"] == 1.5
    assert meta["SliceThickness"] == 5 and meta["SpacingBetweenSlices"] == 6
    assert meta["SeriesNumber"] == 2
    assert meta["ImageType"] == ["ORIGINAL", "PRIMARY", "M"]
    assert meta["AcquisitionTime"] == "09:38:00.000000"
    assert meta["ManufacturersModelName"] == "PhantomScan MR 1.5T"
    assert meta["ProtocolName"] == meta["SeriesDescription"] == "t1_se_tra"
    assert len(meta["ImageOrientationPatientDICOM"]) == 6
    assert meta["ConversionSoftware"] == "dimse-gateway"
    assert meta["ConversionSoftwareVersion"]
    json.dumps(meta)  # plain JSON types only


def test_sidecar_leaves_out_phi_unless_asked(tmp_path: Path) -> None:
    volume = build_volume(_write(_ct(slices=3), tmp_path))
    plain = sidecar(volume.headers)
    phi_keys = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber"}
    assert not phi_keys & plain.keys()
    assert "StudyInstanceUID" not in plain and "SeriesInstanceUID" not in plain
    assert "Müller" not in json.dumps(plain, ensure_ascii=False)

    full = sidecar(volume.headers, phi=True)
    assert full["PatientName"] == "Müller^Jürgen"
    assert full["PatientID"] == "DGW0002"
    assert full["PatientBirthDate"] == "1957-11-03"
    assert full["SeriesInstanceUID"] == volume.headers[0].SeriesInstanceUID
    assert full["AcquisitionDateTime"].startswith("2024-01-02T09:34:00")
    assert full["ExposureTime"] == 0.5 and full["XRayTubeCurrent"] == 250


def test_sidecar_manufacturer_names_follow_dcm2niix(tmp_path: Path) -> None:
    volume = build_volume(_write(_ct(slices=2), tmp_path))
    header = copy.deepcopy(volume.headers[0])
    cases: dict[str, str] = {
        "SIEMENS": "Siemens",
        "Philips Medical Systems": "Philips",
        "GE MEDICAL SYSTEMS": "GE",
        "Synthetic Phantom Works": "Synthetic Phantom Works",
    }
    for name, short in cases.items():
        header.Manufacturer = name
        assert sidecar([header])["Manufacturer"] == short
