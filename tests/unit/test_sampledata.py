"""Unit tests for app.sampledata: determinism, character sets, geometry, file format."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from app import sampledata
from app.sampledata import (
    PatientInfo,
    StudyInfo,
    ct_series,
    derive_uid,
    mr_series,
    sample_patients,
    sample_studies,
    write_datasets,
    write_sample_studies,
)

SMALL = {"ct_slices": 6, "mr_slices": 4, "ct_matrix": 64, "mr_matrix": 64}


def _fingerprint(datasets: list[Dataset]) -> list[tuple[str, str, str, bytes]]:
    return [
        (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.PixelData)
        for ds in datasets
    ]


def _normal(ds: Dataset) -> np.ndarray:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(iop[:3], iop[3:])


def test_derive_uid_is_stable_and_valid() -> None:
    uid = derive_uid("a", "b")
    assert uid == derive_uid("a", "b")
    assert uid != derive_uid("a", "c")
    assert uid != derive_uid("ab")  # parts are separated, not concatenated
    assert uid.startswith("2.25.")
    assert len(uid) <= 64
    assert pydicom.uid.UID(uid).is_valid


def test_two_runs_give_identical_uids_and_pixels() -> None:
    first = list(sample_studies(**SMALL))
    second = list(sample_studies(**SMALL))
    assert _fingerprint(first) == _fingerprint(second)


def test_uids_do_not_depend_on_sizes_but_on_seed() -> None:
    small = list(sample_studies(**SMALL))
    other_seed = list(sample_studies(**SMALL, seed="another"))
    assert {ds.SOPInstanceUID for ds in small}.isdisjoint(ds.SOPInstanceUID for ds in other_seed)
    # Study UIDs come from the accession numbers, so they survive a size change.
    bigger = {ds.StudyInstanceUID for ds in sample_studies(**{**SMALL, "ct_slices": 7})}
    assert {ds.StudyInstanceUID for ds in small} == bigger


def test_written_files_are_byte_identical_across_runs(tmp_path: Path) -> None:
    first = write_sample_studies(tmp_path / "a", **SMALL)
    second = write_sample_studies(tmp_path / "b", **SMALL)
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_sample_studies_structure() -> None:
    datasets = list(sample_studies(**SMALL))
    uids = [ds.SOPInstanceUID for ds in datasets]
    assert len(uids) == len(set(uids))
    assert len(datasets) == 3 * SMALL["ct_slices"] + 5 * SMALL["mr_slices"]

    patients = {ds.PatientID for ds in datasets}
    studies: dict[str, set[str]] = {}
    dates = set()
    for ds in datasets:
        studies.setdefault(ds.StudyInstanceUID, set()).add(ds.Modality)
        dates.add(ds.StudyDate)
        for keyword in (
            "AccessionNumber",
            "StudyID",
            "StudyDescription",
            "StudyTime",
            "SeriesDescription",
            "SeriesNumber",
            "ReferringPhysicianName",
        ):
            assert keyword in ds, keyword
    assert len(patients) >= 4
    assert len(studies) >= 6
    assert len(dates) == len(studies)
    assert {"CT", "MR"} in studies.values()
    studies_per_patient = Counter(
        pid for pid, _ in {(ds.PatientID, ds.StudyInstanceUID) for ds in datasets}
    )
    assert max(studies_per_patient.values()) >= 2


def test_default_sample_size_is_small() -> None:
    count = 0
    pixel_bytes = 0
    for ds in sample_studies():
        count += 1
        pixel_bytes += len(ds.PixelData)
    assert 200 <= count <= 400
    assert pixel_bytes < 60e6


@pytest.mark.parametrize(
    ("key", "charset"),
    [
        ("ascii", None),
        ("latin1", "ISO_IR 100"),
        ("polish", "ISO_IR 192"),
        ("japanese", "ISO_IR 192"),
    ],
)
def test_names_survive_save_and_read(tmp_path: Path, key: str, charset: str | None) -> None:
    patient = sample_patients()[key]
    ds = next(
        iter(
            ct_series(
                patient=patient,
                study_uid=derive_uid("test", key),
                series_number=1,
                slices=1,
                rows=32,
                cols=32,
            )
        )
    )
    (path,) = write_datasets([ds], tmp_path)
    back = pydicom.dcmread(path)
    assert back.get("SpecificCharacterSet") == charset
    assert str(back.PatientName) == patient.name


def test_raw_bytes_use_the_declared_charset(tmp_path: Path) -> None:
    paths = write_sample_studies(tmp_path, **SMALL)
    by_patient = {}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_patient.setdefault(ds.PatientID, path.read_bytes())
    p = sample_patients()
    assert "Müller".encode("latin-1") in by_patient[p["latin1"].patient_id]
    assert "Müller".encode() not in by_patient[p["latin1"].patient_id]
    assert "Łukasiewicz".encode() in by_patient[p["polish"].patient_id]
    assert "山田^太郎".encode() in by_patient[p["japanese"].patient_id]
    assert b"Doe^John" in by_patient[p["ascii"].patient_id]


def test_japanese_name_has_three_component_groups() -> None:
    names = {str(ds.PatientName): ds.PatientName for ds in sample_studies(**SMALL)}
    yamada = next(name for text, name in names.items() if text.startswith("Yamada"))
    assert yamada.alphabetic == "Yamada^Tarou"
    assert yamada.ideographic == "山田^太郎"
    assert yamada.phonetic == "やまだ^たろう"


def test_patient_name_must_fit_charset() -> None:
    with pytest.raises(ValueError, match="cannot be written"):
        PatientInfo("X1", "Łukasiewicz^Zofia", "19820527", "F", "ISO_IR 100")
    with pytest.raises(ValueError, match="cannot be written"):
        PatientInfo("X2", "Müller^Jürgen", "19571103", "M", "")
    with pytest.raises(ValueError, match="unsupported"):
        PatientInfo("X3", "Doe^John", "19640212", "M", "ISO 2022 IR 87")


def test_study_strings_must_fit_charset() -> None:
    patient = PatientInfo("X4", "Doe^Jane", "19700101", "F", "")
    series = ct_series(
        patient=patient,
        study_uid="1.2.3",
        series_number=1,
        slices=1,
        rows=8,
        cols=8,
        study=StudyInfo(description="Schädel"),
    )
    with pytest.raises(ValueError, match="study description"):
        next(iter(series))


def test_ct_geometry_and_pixel_module() -> None:
    patient = sample_patients()["ascii"]
    series = list(
        ct_series(
            patient=patient,
            study_uid="1.2.3",
            series_number=4,
            slices=5,
            rows=64,
            cols=48,
            slice_thickness=2.5,
        )
    )
    assert [ds.InstanceNumber for ds in series] == [1, 2, 3, 4, 5]
    first = series[0]
    assert first.SOPClassUID == CTImageStorage
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert (first.Rows, first.Columns) == (64, 48)
    assert first.PixelRepresentation == 1
    assert float(first.RescaleIntercept) == -1024
    assert float(first.RescaleSlope) == 1
    assert float(first.SliceThickness) == 2.5
    zs = [float(ds.ImagePositionPatient[2]) for ds in series]
    assert np.allclose(np.diff(zs), -2.5)
    xy = {tuple(ds.ImagePositionPatient[:2]) for ds in series}
    assert len(xy) == 1
    hu = first.pixel_array.astype(np.int32) - 1024
    assert first.pixel_array.dtype == np.int16
    assert hu.shape == (64, 48)
    assert hu.min() < -900  # air
    assert hu.max() > 500  # bone
    assert len({ds.FrameOfReferenceUID for ds in series}) == 1


def test_oblique_mr_geometry_is_consistent() -> None:
    patient = sample_patients()["polish"]
    series = list(
        mr_series(
            patient=patient,
            study_uid="1.2.3",
            series_number=1,
            slices=6,
            rows=32,
            cols=40,
            slice_thickness=4.0,
            slice_gap=1.0,
        )
    )
    iop = np.array([float(v) for v in series[0].ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    assert abs(np.linalg.norm(row) - 1) < 1e-5
    assert abs(np.linalg.norm(col) - 1) < 1e-5
    assert abs(np.dot(row, col)) < 1e-5
    # Really oblique: neither direction along a patient axis.
    assert np.count_nonzero(np.abs(row) > 1e-3) >= 2
    assert np.count_nonzero(np.abs(col) > 1e-3) >= 2
    normal = _normal(series[0])
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in series])
    for ds in series:
        assert np.allclose(_normal(ds), normal)
    steps = np.diff(positions, axis=0)
    for step in steps:
        # Parallel to the normal, one SpacingBetweenSlices long.
        assert np.linalg.norm(np.cross(step, normal)) < 1e-3
        assert np.dot(step, normal) == pytest.approx(5.0, abs=1e-3)
    assert float(series[0].SpacingBetweenSlices) == 5.0
    locations = [float(ds.SliceLocation) for ds in series]
    assert np.allclose(np.diff(locations), 5.0, atol=1e-3)


def test_axial_mr_and_mr_attributes() -> None:
    patient = sample_patients()["latin1"]
    series = list(
        mr_series(
            patient=patient,
            study_uid="1.2.3",
            series_number=2,
            oblique=False,
            slices=3,
            rows=16,
            cols=16,
            echo_time=90.0,
            repetition_time=3000.0,
            flip_angle=150.0,
            field_strength=3.0,
        )
    )
    ds = series[0]
    assert ds.SOPClassUID == MRImageStorage
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds.EchoTime) == 90.0
    assert float(ds.RepetitionTime) == 3000.0
    assert float(ds.FlipAngle) == 150.0
    assert float(ds.MagneticFieldStrength) == 3.0
    assert ds.Manufacturer
    assert ds.pixel_array.dtype == np.uint16
    assert int(ds.pixel_array.max()) < 2**12


def test_every_file_passes_enforce_file_format(tmp_path: Path) -> None:
    paths = write_sample_studies(tmp_path, **SMALL)
    for path in paths:
        assert path.name.endswith(".dcm")
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM"
        ds = pydicom.dcmread(path)
        assert path.name == f"{ds.SOPInstanceUID}.dcm"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_default_ct_series_is_60_full_size_slices() -> None:
    # How fast generation is belongs in a benchmark, not in a timed test.
    patient = sample_patients()["ascii"]
    datasets = list(ct_series(patient=patient, study_uid="1.2.3", series_number=1))
    assert len(datasets) == 60
    assert len(datasets[0].PixelData) == 512 * 512 * 2


def test_benchmark_ct_is_full_size() -> None:
    datasets = list(sampledata.benchmark_ct(slices=2))
    assert [(ds.Rows, ds.Columns) for ds in datasets] == [(512, 512), (512, 512)]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    sample_series = {ds.SeriesInstanceUID for ds in sample_studies(**SMALL)}
    assert datasets[0].SeriesInstanceUID not in sample_series


def test_cli_writes_sample_studies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sampledata.main([str(tmp_path), "--ct-slices", "2", "--mr-slices", "1"]) == 0
    files = list(tmp_path.glob("*.dcm"))
    assert len(files) == 3 * 2 + 5 * 1
    assert "wrote 11 files" in capsys.readouterr().out
