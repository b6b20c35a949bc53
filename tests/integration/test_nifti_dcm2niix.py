"""The NIfTI converter against dcm2niix: same voxels, same geometry.

Each case converts the same DICOM files with ``app.convert`` and with dcm2niix
(``dcm2niix -z n -b n -o OUT -f %s IN``, or dcm2niix's own reference output in
the test data's ``Ref/`` folders), reorients both to the closest canonical
(RAS) axes with nibabel and requires equal voxel values after scaling and
affines equal within 1e-3 mm.

Cases: generated CT (rescale) and oblique MR, descending and shuffled slice
orders, one Siemens mosaic in nine transfer syntaxes (dcm_qa_ts), the Siemens
orientation series (dcm_qa: 2-volume EPI mosaics, axial/coronal/sagittal,
ascending/descending/interleaved, lossless JPEG and JPEG 2000) and enhanced
multi-frame objects (dcm_qa_enh: Siemens XA10 fMRI in four files, a Philips
field map with magnitude and Hz frames).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from app.convert import Volume, build_volume, build_volumes, sidecar, write_nifti
from app.errors import ConversionError
from app.sampledata import ct_series, derive_uid, mr_series, sample_patients, write_datasets

pytestmark = pytest.mark.integration

AFFINE_TOLERANCE_MM = 1e-3
PATIENT = sample_patients()["ascii"]
STUDY_UID = derive_uid("test-nifti-dcm2niix", "study")
# Fields both converters write, compared value for value with dcm2niix's sidecar.
SHARED_SIDECAR_FIELDS = (
    "Modality",
    "MagneticFieldStrength",
    "ManufacturersModelName",
    "SeriesDescription",
    "ProtocolName",
    "SeriesNumber",
    "ImageType",
    "AcquisitionNumber",
    "SliceThickness",
    "SpacingBetweenSlices",
    "EchoTime",
    "RepetitionTime",
    "FlipAngle",
    "ImageOrientationPatientDICOM",
)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def dcm2niix() -> str:
    path = shutil.which("dcm2niix")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("dcm2niix is not installed (apt: dcm2niix)")
        pytest.skip("dcm2niix is not installed (apt: dcm2niix)")
    return path


def _run_dcm2niix(exe: str, source: Path, out: Path, *, sidecar: bool = False) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    command = [
        exe,
        "-z",
        "n",
        "-b",
        "y" if sidecar else "n",
        "-o",
        str(out),
        "-f",
        "%s",
        str(source),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    produced = sorted(out.glob("*.nii"))
    assert produced, f"dcm2niix wrote nothing:\n{result.stdout}"
    return produced


def _ours(volume: Volume, path: Path) -> nib.Nifti1Image:
    return nib.load(write_nifti(volume, path))


def _canonical(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    canonical = nib.as_closest_canonical(img)
    return np.asarray(canonical.dataobj, dtype=np.float64), canonical.affine


def _assert_same(
    ours: nib.Nifti1Image, theirs: nib.Nifti1Image, *, rtol: float = 0.0, atol: float = 0.0
) -> None:
    data, affine = _canonical(ours)
    ref_data, ref_affine = _canonical(theirs)
    assert data.shape == ref_data.shape
    np.testing.assert_allclose(affine, ref_affine, rtol=0, atol=AFFINE_TOLERANCE_MM)
    if rtol == 0 and atol == 0:
        np.testing.assert_array_equal(data, ref_data)
    else:
        np.testing.assert_allclose(data, ref_data, rtol=rtol, atol=atol)
    if len(ours.shape) == 4:
        assert ours.header["pixdim"][4] == pytest.approx(theirs.header["pixdim"][4], rel=1e-4)


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() not in {".nii", ".json", ".txt"}
    )


def _generated(
    tmp_path: Path, datasets: list[Dataset], name: str = "in"
) -> tuple[Path, list[Path]]:
    folder = tmp_path / name
    return folder, write_datasets(datasets, folder)


# ------------------------------------------------------------------- generated series


def test_generated_ct_with_rescale(dcm2niix: str, tmp_path: Path) -> None:
    datasets = list(
        ct_series(
            patient=PATIENT, study_uid=STUDY_UID, series_number=1, slices=40, rows=128, cols=160
        )
    )
    folder, paths = _generated(tmp_path, datasets)
    (reference,) = _run_dcm2niix(dcm2niix, folder, tmp_path / "dcm2niix")
    theirs = nib.load(reference)
    assert theirs.dataobj.inter == -1024  # dcm2niix keeps the stored values and scl_inter

    volume = build_volume(paths)
    ours = _ours(volume, tmp_path / "ours.nii")
    assert ours.get_data_dtype() == theirs.get_data_dtype() == np.int16
    assert ours.dataobj.inter == 0  # ours holds Hounsfield units directly
    _assert_same(ours, theirs)


def test_generated_oblique_mr(dcm2niix: str, tmp_path: Path) -> None:
    datasets = list(
        mr_series(
            patient=PATIENT, study_uid=STUDY_UID, series_number=2, slices=20, rows=96, cols=128
        )
    )
    folder, paths = _generated(tmp_path, datasets)
    (reference,) = _run_dcm2niix(dcm2niix, folder, tmp_path / "dcm2niix", sidecar=True)
    volume = build_volume(paths)
    _assert_same(_ours(volume, tmp_path / "ours.nii"), nib.load(reference))

    theirs = json.loads(reference.with_suffix(".json").read_text())
    mine = sidecar(volume.headers)
    for field in SHARED_SIDECAR_FIELDS:
        assert mine.get(field) == theirs.get(field), field
    assert mine["AcquisitionTime"] == _padded_time(theirs["AcquisitionTime"])


def _padded_time(text: str) -> str:
    # dcm2niix 1.0.20220720 prints "09:38:0.000000" for 09:38:00.
    hours, minutes, seconds = text.split(":")
    whole, _, fraction = seconds.partition(".")
    return f"{int(hours):02d}:{int(minutes):02d}:{int(whole):02d}.{fraction}"


@pytest.mark.parametrize("order", ["descending", "shuffled"])
def test_slice_order_does_not_matter(dcm2niix: str, tmp_path: Path, order: str) -> None:
    datasets = list(
        mr_series(
            patient=PATIENT, study_uid=STUDY_UID, series_number=3, slices=16, rows=64, cols=80
        )
    )
    rng = random.Random(11)
    if order == "descending":
        datasets = [copy.deepcopy(ds) for ds in reversed(datasets)]
        numbers = list(range(1, len(datasets) + 1))
    else:
        datasets = [copy.deepcopy(ds) for ds in datasets]
        numbers = rng.sample(range(1, len(datasets) + 1), len(datasets))
    for ds, number in zip(datasets, numbers, strict=True):
        ds.InstanceNumber = number
    folder, paths = _generated(tmp_path, datasets)
    if order == "shuffled":
        rng.shuffle(paths)
    (reference,) = _run_dcm2niix(dcm2niix, folder, tmp_path / "dcm2niix")
    _assert_same(_ours(build_volume(paths), tmp_path / "ours.nii"), nib.load(reference))


# -------------------------------------------------------------------- scanner files


@pytest.mark.parametrize("number", range(1, 10))
def test_transfer_syntaxes_match_dcm2niix_reference(
    testdata_dir: Path, tmp_path: Path, number: int
) -> None:
    """dcm_qa_ts: one Siemens mosaic (35 slices of 64x64) in nine transfer syntaxes."""
    source = testdata_dir / "dcm_qa_ts" / "In" / f"{number}.dcm"
    reference = testdata_dir / "dcm_qa_ts" / "Ref" / f"{number}.nii"
    assert "MOSAIC" in dcmread(source, stop_before_pixels=True).ImageType
    volume = build_volume([source])
    assert volume.shape == (35, 64, 64)
    _assert_same(_ours(volume, tmp_path / "ours.nii"), nib.load(reference))

    theirs = json.loads(reference.with_suffix(".json").read_text())
    mine = sidecar(volume.headers)
    for field in (*SHARED_SIDECAR_FIELDS, "Manufacturer", "AcquisitionTime"):
        assert mine.get(field) == theirs.get(field), field


def _orientation_folders() -> list[str]:
    from tests.integration.conftest import testdata_root

    root = testdata_root() / "dcm_qa" / "In" / "Orientation"
    if not root.is_dir():
        return ["missing"]
    return sorted(f"{p.parent.name}/{p.name}" for p in root.glob("*/*") if p.is_dir())


@pytest.mark.parametrize("folder", _orientation_folders())
def test_orientation_series_match_dcm2niix_reference(
    testdata_dir: Path, tmp_path: Path, folder: str
) -> None:
    """dcm_qa: Siemens VB17 2-volume EPI mosaics; dcm2niix's Ref/ is ProtocolName_SeriesNumber."""
    paths = _dicom_files(testdata_dir / "dcm_qa" / "In" / "Orientation" / folder)
    header = dcmread(paths[0], stop_before_pixels=True, force=True)
    # They are all mosaics: the converter cuts them into slices instead of refusing.
    assert "MOSAIC" in header.ImageType
    reference = testdata_dir / "dcm_qa" / "Ref" / f"{header.ProtocolName}_{header.SeriesNumber}.nii"

    volume = build_volume(paths)
    assert len(volume.shape) == 4 and volume.shape[0] == 2
    assert volume.voxels.dtype == np.int16
    _assert_same(_ours(volume, tmp_path / "ours.nii"), nib.load(reference))

    # Ref/ comes from a later dcm2niix, which appends a derived "MAGNITUDE" to ImageType.
    theirs = json.loads(reference.with_suffix(".json").read_text())
    mine = sidecar(volume.headers)
    for field in (*SHARED_SIDECAR_FIELDS, "Manufacturer"):
        if field == "ImageType":
            assert theirs[field][: len(mine[field])] == mine[field]
        else:
            assert mine.get(field) == theirs.get(field), field
    assert mine["AcquisitionTime"] == _padded_time(theirs["AcquisitionTime"])


def test_enhanced_siemens_xa10_fmri_in_four_files(
    dcm2niix: str, testdata_dir: Path, tmp_path: Path
) -> None:
    folder = testdata_dir / "dcm_qa_enh" / "In" / "Siemens" / "XA10"
    (reference,) = _run_dcm2niix(dcm2niix, folder, tmp_path / "dcm2niix", sidecar=True)
    paths = list(reversed(_dicom_files(folder)))  # file order must not matter
    volume = build_volume(paths)
    assert volume.shape == (4, 6, 64, 64)
    assert volume.repetition_time == pytest.approx(0.5)
    _assert_same(_ours(volume, tmp_path / "ours.nii"), nib.load(reference))

    theirs = json.loads(reference.with_suffix(".json").read_text())
    mine = sidecar(volume.headers)
    for field in (*SHARED_SIDECAR_FIELDS, "AcquisitionTime", "Manufacturer"):
        assert mine.get(field) == theirs.get(field), field


def _philips_scale(path: Path, echo_frame: int) -> dict[str, Any]:
    ds = dcmread(path, stop_before_pixels=True)
    frame = ds.PerFrameFunctionalGroupsSequence[echo_frame]
    transform = frame.PixelValueTransformationSequence[0]
    private = frame[0x2005, 0x140F][0]
    return {
        "slope": float(transform.RescaleSlope),
        "intercept": float(transform.RescaleIntercept),
        "scale_slope": float(private[0x2005, 0x100E].value),
    }


def test_enhanced_philips_field_map(dcm2niix: str, testdata_dir: Path, tmp_path: Path) -> None:
    """One file, 64 frames: magnitude (TE 1.52 ms) and a field map in Hz, 32 slices each."""
    path = testdata_dir / "dcm_qa_enh" / "In" / "Philips" / "IM_0027_fMAP.dcm"
    magnitude_ref, fieldmap_ref = _run_dcm2niix(dcm2niix, path.parent, tmp_path / "dcm2niix")
    assert magnitude_ref.name.endswith("_e1.nii") and "fieldmaphz" in fieldmap_ref.name

    with pytest.raises(ConversionError, match="mixed echoes"):
        build_volume([path])  # one volume would mix two kinds of images
    magnitude, fieldmap = build_volumes([path])

    # The field map: the standard rescale (Hz), which dcm2niix keeps as scl_slope/scl_inter
    # (rounded to float32, hence the tolerance).
    _assert_same(
        _ours(fieldmap, tmp_path / "fieldmap.nii"), nib.load(fieldmap_ref), rtol=1e-5, atol=0.01
    )
    # The magnitude: same grid; dcm2niix applies Philips' private "floating point" scale
    # (2005,100E) instead of the DICOM rescale, so its values are ours / (RS * SS).
    ours = _ours(magnitude, tmp_path / "magnitude.nii")
    theirs = nib.load(magnitude_ref)
    data, affine = _canonical(ours)
    ref_data, ref_affine = _canonical(theirs)
    np.testing.assert_allclose(affine, ref_affine, atol=AFFINE_TOLERANCE_MM)
    scale = _philips_scale(path, 0)
    np.testing.assert_allclose(
        data / (scale["slope"] * scale["scale_slope"]), ref_data, rtol=1e-4, atol=1e-2
    )
