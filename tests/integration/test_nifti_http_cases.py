"""NIfTI over HTTP for series that are not one plain volume, from their own Orthanc.

The Orthanc holds generated series the shared sample data lacks: a three-echo
MR series (split into one volume per echo, compared with dcm2niix's ``_e1``,
``_e2``, ``_e3`` files), a gantry-tilted CT (resampled, compared with
dcm2niix's ``_Tilt`` file), and one series for each refusal of issue 3 point 4
(mixed orientations, mixed matrix sizes, uneven spacing, a non-image object).
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from app.sampledata import ct_series, derive_uid, mr_series, sample_patients, write_datasets
from tests.gateway_server import GatewayServer, free_port, gateway_settings, local_node
from tests.integration.test_nifti_dcm2niix import _assert_same, _padded_time, _run_dcm2niix
from tests.peers.orthanc import OrthancPeer, orthanc_available

pytestmark = pytest.mark.integration

PATIENT = sample_patients()["ascii"]
STUDY = derive_uid("test-nifti-http-cases", "study")
ECHO_TIMES = (12.0, 40.0, 90.0)
TILT = 15.0


def _renew(ds: Dataset, salt: str, *, series: str | None = None) -> Dataset:
    clone = copy.deepcopy(ds)
    uid = UID(derive_uid("test-nifti-http-cases", salt, ds.SOPInstanceUID))
    clone.SOPInstanceUID = uid
    clone.file_meta.MediaStorageSOPInstanceUID = uid
    if series is not None:
        clone.SeriesInstanceUID = series
    return clone


def _multi_echo() -> list[Dataset]:
    """One MR series, three echoes of six oblique slices, as a scanner stores them."""
    datasets = []
    for number, echo_time in enumerate(ECHO_TIMES, start=1):
        for ds in mr_series(
            patient=PATIENT,
            study_uid=STUDY,
            series_number=4,
            slices=6,
            rows=32,
            cols=40,
            echo_time=echo_time,
            description="me_gre",
        ):
            clone = _renew(ds, f"echo-{number}")
            clone.EchoNumbers = str(number)
            clone.InstanceNumber = int(ds.InstanceNumber) + 100 * number
            datasets.append(clone)
    return datasets


def _ct(series_number: int, **kwargs: int | float) -> list[Dataset]:
    args: dict[str, int | float] = {"slices": 8, "rows": 32, "cols": 32, "slice_thickness": 2.5}
    args.update(kwargs)
    return list(
        ct_series(
            patient=PATIENT,
            study_uid=STUDY,
            series_number=series_number,
            description=f"case {series_number}",
            **args,  # type: ignore[arg-type]
        )
    )


def _tilted_ct() -> list[Dataset]:
    """An axial CT whose slice origins move along y with z, as a tilted gantry leaves them."""
    datasets = _ct(14, slices=12, rows=64, cols=64)
    for ds in datasets:
        z = float(ds.ImagePositionPatient[2])
        y = float(ds.ImagePositionPatient[1]) + z * math.tan(math.radians(TILT))
        ds.ImagePositionPatient[1] = f"{y:.4f}"
        ds.GantryDetectorTilt = f"{TILT:g}"
    return datasets


def _refused_series() -> dict[str, list[Dataset]]:
    """One series per refusal, each under its own SeriesInstanceUID."""
    uneven = _ct(10)
    z = float(uneven[3].ImagePositionPatient[2])
    uneven[3].ImagePositionPatient[2] = f"{z + 0.8:g}"

    localizer = _ct(11)
    series = str(localizer[0].SeriesInstanceUID)
    scout = _renew(localizer[0], "scout", series=series)
    scout.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    mixed_orientation = [*localizer, scout]

    sizes = _ct(12)
    series = str(sizes[0].SeriesInstanceUID)
    larger = [_renew(ds, "large", series=series) for ds in _ct(12, rows=48, cols=48)]
    for ds in larger:
        ds.ImagePositionPatient[2] = f"{float(ds.ImagePositionPatient[2]) + 100:g}"
    mixed_sizes = [*sizes, *larger]

    with_report = _ct(13)
    report = Dataset()
    report.file_meta = copy.deepcopy(with_report[0].file_meta)
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(report, keyword, getattr(with_report[0], keyword))
    report.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.22")  # Enhanced SR
    report.SOPInstanceUID = UID(derive_uid("test-nifti-http-cases", "report"))
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    report.Modality = "SR"
    report.StudyDate = with_report[0].StudyDate
    report.SeriesNumber = 13
    report.InstanceNumber = 99
    return {
        "uneven spacing": uneven,
        "mixed orientations": mixed_orientation,
        "mixed matrix sizes": mixed_sizes,
        "non-image object": [*with_report, report],
    }


@dataclass
class Cases:
    gateway: GatewayServer
    folders: dict[str, Path]
    series: dict[str, str]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cases]:
    if not orthanc_available():
        pytest.skip("Orthanc is not installed (apt: orthanc orthanc-dicomweb)")
    root = tmp_path_factory.mktemp("nifti-cases")
    groups = {"multi-echo": _multi_echo(), "gantry tilt": _tilted_ct(), **_refused_series()}
    folders = {name: root / name.replace(" ", "-") for name in groups}
    files: list[Path] = []
    for name, datasets in groups.items():
        files += write_datasets(datasets, folders[name])
    storage_port = free_port()
    peer = OrthancPeer(
        root / "orthanc", modalities={"DIMSEGW": ("DIMSEGW", "127.0.0.1", storage_port)}
    )
    peer.start()
    try:
        peer.load(files)
        settings = gateway_settings(
            root / "gw",
            local_node("orthanc", peer.aet, peer.dicom_port, default=True),
            storage_port=storage_port,
        )
        series = {name: str(datasets[0].SeriesInstanceUID) for name, datasets in groups.items()}
        with GatewayServer(settings) as gw:
            yield Cases(gw, folders, series)
    finally:
        peer.stop()


@pytest.fixture(scope="module")
def dcm2niix() -> str:
    path = shutil.which("dcm2niix")
    if path is None:
        pytest.skip("dcm2niix is not installed (apt: dcm2niix)")
    return path


def _url(cases: Cases, name: str, tail: str = "nifti") -> str:
    return f"{cases.gateway.dicomweb}/studies/{STUDY}/series/{cases.series[name]}/{tail}"


# ------------------------------------------------------------------------------ multi-echo


def test_multi_echo_series_lists_its_echoes_with_300(cases: Cases) -> None:
    resp = httpx.get(_url(cases, "multi-echo"), timeout=120)
    assert resp.status_code == 300, resp.text
    body = resp.json()
    assert "echo=N" in body["message"] and "_e1, _e2, _e3" in body["message"]
    volumes = body["volumes"]
    assert [v["EchoNumber"] for v in volumes] == [1, 2, 3]
    assert [v["EchoTime"] for v in volumes] == [0.012, 0.04, 0.09]
    assert [v["suffix"] for v in volumes] == ["_e1", "_e2", "_e3"]
    assert all(v["images"] == 6 for v in volumes)
    assert volumes[1]["nifti"] == _url(cases, "multi-echo") + "?echo=2"
    assert volumes[1]["sidecar"] == _url(cases, "multi-echo", "nifti/sidecar") + "?echo=2"

    # The sidecar cannot choose either; a missing echo is 404 naming the ones there are.
    side = httpx.get(_url(cases, "multi-echo", "nifti/sidecar"), timeout=60)
    assert side.status_code == 300 and len(side.json()["volumes"]) == 3
    missing = httpx.get(_url(cases, "multi-echo"), params={"echo": 4}, timeout=60)
    assert missing.status_code == 404
    assert "echo=4" in missing.json()["message"] and "TE 90 ms" in missing.json()["message"]


def test_each_echo_matches_dcm2niix(cases: Cases, dcm2niix: str, tmp_path: Path) -> None:
    references = _run_dcm2niix(
        dcm2niix, cases.folders["multi-echo"], tmp_path / "dcm2niix", sidecar=True
    )
    assert [p.name for p in references] == ["4_e1.nii", "4_e2.nii", "4_e3.nii"]
    for number, reference in enumerate(references, start=1):
        resp = httpx.get(
            _url(cases, "multi-echo"), params={"echo": number, "compress": "false"}, timeout=120
        )
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-disposition"].endswith(f'4_me_gre_e{number}.nii"')
        ours = nib.Nifti1Image.from_bytes(resp.content)
        assert ours.shape == (40, 32, 6)
        _assert_same(ours, nib.load(reference))

        side = httpx.get(
            _url(cases, "multi-echo", "nifti/sidecar"), params={"echo": number}, timeout=60
        )
        assert side.status_code == 200, side.text
        mine, theirs = side.json(), json.loads(reference.with_suffix(".json").read_text())
        for field in ("EchoNumber", "EchoTime", "RepetitionTime", "SeriesDescription"):
            assert mine[field] == theirs[field], field
        assert mine["AcquisitionTime"] == _padded_time(theirs["AcquisitionTime"])


def test_volume_number_and_the_one_call_path(cases: Cases) -> None:
    by_volume = httpx.get(_url(cases, "multi-echo"), params={"volume": 3}, timeout=120)
    by_echo = httpx.get(_url(cases, "multi-echo"), params={"echo": 3}, timeout=120)
    assert by_volume.status_code == by_echo.status_code == 200
    assert gzip.decompress(by_volume.content) == gzip.decompress(by_echo.content)

    search = {"PatientID": PATIENT.patient_id, "SeriesNumber": "4"}
    listing = httpx.get(f"{cases.gateway.dicomweb}/nifti", params=search, timeout=120)
    assert listing.status_code == 300, listing.text
    # The links of the one-call path lead to the series itself.
    assert listing.json()["volumes"][0]["nifti"] == _url(cases, "multi-echo") + "?echo=1"
    one = httpx.get(f"{cases.gateway.dicomweb}/nifti", params={**search, "echo": 2}, timeout=120)
    assert one.status_code == 200, one.text
    assert gzip.decompress(one.content) == gzip.decompress(
        httpx.get(_url(cases, "multi-echo"), params={"echo": 2}, timeout=120).content
    )
    bad = httpx.get(_url(cases, "multi-echo"), params={"echo": 0}, timeout=30)
    assert bad.status_code == 400


# ------------------------------------------------------------------------------ gantry tilt


def test_gantry_tilt_is_resampled_as_dcm2niix_does(
    cases: Cases, dcm2niix: str, tmp_path: Path
) -> None:
    folder = cases.folders["gantry tilt"]
    produced = _run_dcm2niix(dcm2niix, folder, tmp_path / "dcm2niix")
    (tilt_file,) = [p for p in produced if "_Tilt" in p.name]
    resp = httpx.get(_url(cases, "gantry tilt"), params={"compress": "false"}, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-gateway-resampled"].startswith("gantry-tilt 15.00 deg")
    ours = nib.Nifti1Image.from_bytes(resp.content)
    theirs = nib.load(tilt_file)
    assert ours.get_data_dtype() == theirs.get_data_dtype() == np.int16

    # Same grid and the same interpolated values (but for a rare rounding tie, float32
    # there and float64 here) ...
    mine, ref = nib.as_closest_canonical(ours), nib.as_closest_canonical(theirs)
    assert mine.shape == ref.shape == (64, 66, 12)
    data = np.asarray(mine.dataobj, dtype=np.float64)
    ref_data = np.asarray(ref.dataobj, dtype=np.float64)
    assert np.max(np.abs(data - ref_data)) <= 1
    assert np.count_nonzero(data != ref_data) <= data.size // 1000
    np.testing.assert_allclose(mine.affine[:3, :3], ref.affine[:3, :3], atol=1e-3)
    np.testing.assert_allclose(mine.affine[[0, 2], 3], ref.affine[[0, 2], 3], atol=1e-3)
    # ... but dcm2niix (1.0.20220720, and 1.0.20260724 from PyPI alike) labels the
    # tilted grid one to two rows off along y: the origin is checked against the DICOM
    # positions instead.  The slice lying furthest along y needed no interpolation:
    # its first row must sit exactly at its ImagePositionPatient.
    to_voxel = np.linalg.inv(ours.affine)
    raw = np.asarray(ours.dataobj)
    exact = 0
    for path in sorted(folder.iterdir()):
        ds = dcmread(path)
        ras = np.array([-1.0, -1.0, 1.0]) * np.array([float(v) for v in ds.ImagePositionPatient])
        i, j, k = (to_voxel @ np.array([*ras, 1.0]))[:3]
        assert i == pytest.approx(0, abs=1e-3) and k == pytest.approx(round(k), abs=1e-3)
        if abs(j - round(j)) < 1e-3:
            hounsfield = ds.pixel_array.astype(np.int16) + np.int16(-1024)
            np.testing.assert_array_equal(raw[:, round(j), round(k)], hounsfield[0])
            exact += 1
    assert exact == 1

    side = httpx.get(_url(cases, "gantry tilt", "nifti/sidecar"), timeout=60).json()
    assert side["GantryDetectorTilt"] == 15
    assert side["Resampled"] == resp.headers["x-gateway-resampled"]


# -------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("uneven spacing", "not uniform within 0.2 mm"),
        ("mixed orientations", "mixed orientations"),
        ("mixed matrix sizes", "mixed matrix sizes"),
        ("non-image object", "not an image"),
    ],
)
def test_series_that_are_not_one_volume_get_422(cases: Cases, name: str, expected: str) -> None:
    resp = httpx.get(_url(cases, name), timeout=120)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["error"] == "ConversionError"
    assert expected in body["message"]
    assert "Traceback" not in resp.text
