"""The fast UID walk agrees with pydicom on real and generated files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from app.dimse.uidscan import part10_study_series, study_series_uids
from app.sampledata import ct_series, sample_patients, write_datasets

TESTDATA = Path(
    os.environ.get("DIMSE_GATEWAY_TESTDATA")
    or Path(__file__).resolve().parents[2].parent / "shared" / "testdata"
)


def _truth(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True, force=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def test_agrees_with_pydicom_on_the_test_data() -> None:
    if not TESTDATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"test data missing at {TESTDATA}")
        pytest.skip(f"test data missing at {TESTDATA}")
    checked = 0
    for path in sorted(TESTDATA.glob("*/In/**/*")):
        if not path.is_file():
            continue
        head = path.read_bytes()[:65536]
        if head[128:132] != b"DICM":
            continue
        ds = dcmread(path, stop_before_pixels=True, force=True)
        ts = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in ds.file_meta else ""
        got = part10_study_series(head, ts)
        if got is not None:
            assert got == _truth(path), path
            checked += 1
        else:
            # Only big endian or deflate may be left to pydicom.
            assert ts in ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"), path
    assert checked > 40


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_skips_undefined_length_sequences(tmp_path: Path, syntax: str) -> None:
    ds = next(
        ct_series(
            patient=sample_patients()["latin1"],
            study_uid="2.25.1234",
            series_number=3,
            slices=1,
            rows=8,
            cols=8,
            seed="uidscan",
        )
    )
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.3"
    inner = Dataset()
    inner.CodeValue = "X"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds.ReferencedImageSequence.is_undefined_length = True
    item.PurposeOfReferenceCodeSequence.is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax
    [path] = write_datasets([ds], tmp_path)
    head = path.read_bytes()[:65536]
    assert part10_study_series(head, syntax) == _truth(path)


def test_missing_uids_give_none() -> None:
    assert study_series_uids(b"\x08\x00\x18\x00UI\x04\x001.2\x00", ExplicitVRLittleEndian) is None
    assert study_series_uids(b"garbage", ExplicitVRLittleEndian) is None
