"""Deterministic synthetic DICOM data: CT and MR series of simple phantoms.

Everything here is a pure function of its arguments: UIDs are UUID-5 derived
(``2.25.<uuid>``) from a seed string and the position of the object in the
hierarchy, and the image noise comes from a generator seeded with a hash of
the same seed.  Two runs therefore produce byte-identical files, which lets
tests compare against fixed expectations and lets a PACS that already holds
the data treat a reload as a set of duplicates.

The demo data set (:func:`sample_studies`) is deliberately small (about 300
files, 40 MB) and covers what a DICOMweb gateway must get right: several
patients, studies on different dates, a patient with two studies, a study
with a CT and an MR series, oblique MR geometry, and patient names in
Latin-1, UTF-8 (Polish and Japanese, the latter with ideographic and
phonetic component groups) and plain ASCII.

Command line (for the demo and for benchmarks)::

    python -m app.sampledata OUT_DIR [--ct-slices N] [--mr-slices N] [--big-ct]

``--big-ct`` writes only one 300-slice 512x512 CT series (about 157 MB).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import hashlib
import math
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

__all__ = [
    "DEFAULT_SEED",
    "UID_NAMESPACE",
    "PatientInfo",
    "StudyInfo",
    "benchmark_ct",
    "ct_series",
    "derive_uid",
    "main",
    "mr_series",
    "sample_patients",
    "sample_studies",
    "write_datasets",
    "write_sample_studies",
]

#: Namespace of every UID this module derives; fixed so that UIDs never change between releases.
UID_NAMESPACE = uuid.UUID("6f0b8f0e-3c1a-5d2e-9b57-5d1c0e0a7d31")

#: Default seed: changing it gives a disjoint set of series and instance UIDs.
DEFAULT_SEED = "dimse-gateway-sample"

_IMPLEMENTATION_VERSION = "DGW_SAMPLE_1"
_MANUFACTURER = "Synthetic Phantom Works"
_SOFTWARE = "dimse-gateway sampledata 1"
_GYROMAGNETIC_MHZ_PER_T = 42.577478

FloatArray = npt.NDArray[np.float32]
Int16Array = npt.NDArray[np.int16]
UInt16Array = npt.NDArray[np.uint16]


def derive_uid(*parts: str) -> str:
    """Return a stable ``2.25.`` UID (at most 44 characters) for a key.

    ``pynetdicom``'s ``generate_uid`` ignores its entropy sources and returns a
    random UID, so determinism has to come from UUID-5 here.
    """
    key = "\x1f".join(parts)
    return "2.25." + str(uuid.uuid5(UID_NAMESPACE, key).int)


_IMPLEMENTATION_CLASS_UID = UID(derive_uid("dimse-gateway", "implementation-class"))


def _codec_for(charset: str) -> str:
    """Python codec for a single-byte or UTF-8 Specific Character Set value."""
    if charset == "":
        # The default repertoire is ASCII; pydicom's "iso8859" default would
        # silently accept Latin-1 and write undeclared 8-bit bytes.
        return "ascii"
    if charset.startswith("ISO 2022") or charset not in python_encoding:
        raise ValueError(
            f"unsupported Specific Character Set {charset!r}: use '' (ASCII), "
            "'ISO_IR 192' (UTF-8) or a single-byte set such as 'ISO_IR 100'"
        )
    return python_encoding[charset]


def _check_encodable(value: str, charset: str, what: str) -> None:
    codec = _codec_for(charset)
    try:
        value.encode(codec)
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} {value!r} cannot be written with Specific Character Set {charset!r}"
        ) from exc


@dataclass(frozen=True)
class PatientInfo:
    """A patient and the character set all of the patient's files are written in.

    ``charset`` is the value of (0008,0005) Specific Character Set: ``""`` for
    the default repertoire (ASCII, attribute omitted), ``"ISO_IR 100"``
    (Latin-1), ``"ISO_IR 192"`` (UTF-8) or another single-byte set.  The name
    must be representable in it; this is checked on construction.
    """

    patient_id: str
    name: str
    birth_date: str
    sex: str
    charset: str = "ISO_IR 192"

    def __post_init__(self) -> None:
        _check_encodable(self.name, self.charset, "patient name")
        _check_encodable(self.patient_id, "", "patient ID")
        _dt.datetime.strptime(self.birth_date, "%Y%m%d")
        if self.sex not in ("M", "F", "O", ""):
            raise ValueError(f"patient sex must be M, F, O or empty, not {self.sex!r}")


@dataclass(frozen=True)
class StudyInfo:
    """Study-level attributes shared by every series of a study (except the UID)."""

    date: str = "20240102"
    time: str = "093000"
    accession_number: str = "ACC0001"
    study_id: str = "1"
    description: str = "Synthetic study"
    referring_physician: str = "Referrer^Rita"
    institution: str = "Synthetic General Hospital"

    def __post_init__(self) -> None:
        _dt.datetime.strptime(self.date + self.time, "%Y%m%d%H%M%S")
        if len(self.accession_number) > 16 or len(self.study_id) > 16:
            raise ValueError("AccessionNumber and StudyID are SH: at most 16 characters")


@dataclass(frozen=True)
class _Ellipsoid:
    """Axis-aligned ellipsoid in patient coordinates (LPS, mm) with per-contrast values."""

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    values: tuple[float, ...]


# Body phantom (values in HU): later entries paint over earlier ones.
_BODY: tuple[_Ellipsoid, ...] = (
    _Ellipsoid((0, 140, 0), (230, 6, 5000), (250,)),  # patient table
    _Ellipsoid((0, 0, 0), (165, 118, 5000), (-95,)),  # subcutaneous fat
    _Ellipsoid((0, 0, 0), (152, 106, 5000), (45,)),  # muscle and organs
    _Ellipsoid((-60, 0, -95), (80, 72, 75), (60,)),  # liver
    _Ellipsoid((-66, -5, 40), (56, 72, 115), (-850,)),  # right lung
    _Ellipsoid((66, -5, 35), (50, 70, 110), (-850,)),  # left lung
    _Ellipsoid((14, -28, 5), (52, 44, 58), (42,)),  # heart
    _Ellipsoid((-8, 36, 0), (13, 13, 5000), (185,)),  # aorta with contrast
    _Ellipsoid((0, 62, 0), (21, 19, 5000), (750,)),  # vertebral cortex
    _Ellipsoid((0, 62, 0), (17, 15, 5000), (260,)),  # cancellous bone
    _Ellipsoid((0, 86, 0), (8, 7, 5000), (15,)),  # spinal canal
)

# Head phantom: values are (T1-weighted, T2-weighted) signal on a 12-bit scale.
_HEAD: tuple[_Ellipsoid, ...] = (
    _Ellipsoid((0, 0, 0), (76, 96, 88), (950, 700)),  # scalp fat
    _Ellipsoid((0, 0, 0), (71, 91, 83), (90, 60)),  # skull
    _Ellipsoid((0, 0, 2), (66, 86, 77), (300, 1700)),  # CSF around the brain
    _Ellipsoid((0, 0, 4), (63, 83, 73), (620, 950)),  # grey matter
    _Ellipsoid((0, 2, 10), (50, 68, 52), (880, 620)),  # white matter
    _Ellipsoid((-12, -4, 16), (7, 28, 13), (280, 1750)),  # right lateral ventricle
    _Ellipsoid((12, -4, 16), (7, 28, 13), (280, 1750)),  # left lateral ventricle
    _Ellipsoid((-31, -80, -30), (12, 12, 11), (220, 1550)),  # right eye
    _Ellipsoid((31, -80, -30), (12, 12, 11), (220, 1550)),  # left eye
    _Ellipsoid((22, 18, 32), (7, 8, 6), (520, 1450)),  # a lesion
)


def _rng_seed(seed: str, *parts: str) -> int:
    # hash() is salted per process; only a real digest is stable across runs.
    digest = hashlib.sha256("\x1f".join((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@functools.lru_cache(maxsize=8)
def _noise(rows: int, cols: int, sigma: float, seed: str) -> FloatArray:
    """Noise field larger than the image: each slice takes a shifted window of it."""
    rng = np.random.default_rng(_rng_seed(seed, "noise", str(rows), str(cols), str(sigma)))
    return rng.normal(0.0, sigma, size=(rows + 32, cols + 32)).astype(np.float32)


def _noise_window(noise: FloatArray, rows: int, cols: int, index: int) -> FloatArray:
    dr, dc = (index * 7) % 32, (index * 13) % 32
    return noise[dr : dr + rows, dc : dc + cols]


@functools.lru_cache(maxsize=8)
def _axial_forms(
    rows: int, cols: int, spacing: float
) -> tuple[tuple[float, float, float], tuple[FloatArray, ...]]:
    """In-plane part of each body ellipsoid's quadratic form on an axial grid.

    A slice at height z then only needs one comparison per ellipsoid:
    ``form <= 1 - ((z - cz) / c)**2``.  Returns the top-left pixel position
    and the forms (read-only).
    """
    x0 = -(cols - 1) / 2 * spacing
    y0 = -(rows - 1) / 2 * spacing
    x = (x0 + np.arange(cols, dtype=np.float32) * spacing)[np.newaxis, :]
    y = (y0 + np.arange(rows, dtype=np.float32) * spacing)[:, np.newaxis]
    forms = []
    for e in _BODY:
        (cx, cy, _), (a, b, _) = e.centre, e.semi_axes
        form = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2
        form.setflags(write=False)
        forms.append(form)
    return (x0, y0, 0.0), tuple(forms)


def _ct_slice(rows: int, cols: int, spacing: float, z: float, index: int, seed: str) -> Int16Array:
    """Stored values (HU + 1024) of one axial slice of the body phantom."""
    _, forms = _axial_forms(rows, cols, spacing)
    hu = np.full((rows, cols), -1000.0, dtype=np.float32)
    for e, form in zip(_BODY, forms, strict=True):
        dz = (z - e.centre[2]) / e.semi_axes[2]
        limit = 1.0 - dz * dz
        if limit > 0.0:
            hu[form <= limit] = e.values[0]
    hu += _noise_window(_noise(rows, cols, 12.0, seed), rows, cols, index)
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return (hu + 1024.0).round().astype(np.int16)


@functools.lru_cache(maxsize=8)
def _plane_grid(rows: int, cols: int, spacing: float) -> tuple[FloatArray, FloatArray]:
    """Distances (mm) of each pixel centre from the top-left one along rows and columns."""
    u = (np.arange(cols, dtype=np.float32) * spacing)[np.newaxis, :]
    v = (np.arange(rows, dtype=np.float32) * spacing)[:, np.newaxis]
    u.setflags(write=False)
    v.setflags(write=False)
    return u, v


@functools.lru_cache(maxsize=8)
def _bias_field(rows: int, cols: int) -> FloatArray:
    """Smooth receive-coil shading: brighter towards the top of the image."""
    r = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, np.newaxis]
    c = np.linspace(-1.0, 1.0, cols, dtype=np.float32)[np.newaxis, :]
    shading = 1.0 - 0.12 * r - 0.05 * c * c
    shading.setflags(write=False)
    return shading


def _mr_slice(
    rows: int,
    cols: int,
    spacing: float,
    origin: Sequence[float],
    row_dir: Sequence[float],
    col_dir: Sequence[float],
    contrast: int,
    index: int,
    seed: str,
) -> UInt16Array:
    """Samples the 3-D head phantom on an arbitrarily oriented plane."""
    u, v = _plane_grid(rows, cols, spacing)
    px = origin[0] + u * row_dir[0] + v * col_dir[0]
    py = origin[1] + u * row_dir[1] + v * col_dir[1]
    pz = origin[2] + u * row_dir[2] + v * col_dir[2]
    signal = np.zeros((rows, cols), dtype=np.float32)
    for e in _HEAD:
        (cx, cy, cz), (a, b, c) = e.centre, e.semi_axes
        inside = ((px - cx) / a) ** 2 + ((py - cy) / b) ** 2 + ((pz - cz) / c) ** 2 <= 1.0
        signal[inside] = e.values[contrast]
    signal *= _bias_field(rows, cols)
    noise = _noise_window(_noise(rows, cols, 18.0, seed), rows, cols, index)
    # Magnitude images have a Rician floor, never negative values.
    np.abs(signal + noise, out=signal)
    np.clip(signal, 0.0, 4095.0, out=signal)
    return signal.round().astype(np.uint16)


def _ds(value: float) -> str:
    """Format a float as a DS string of at most 16 characters, without trailing zeros."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        raise ValueError(f"{value!r} does not fit a DS value")
    return text


def _age(birth_date: str, on_date: str) -> str:
    born = _dt.datetime.strptime(birth_date, "%Y%m%d").date()
    day = _dt.datetime.strptime(on_date, "%Y%m%d").date()
    years = day.year - born.year - ((day.month, day.day) < (born.month, born.day))
    return f"{max(years, 0):03d}Y"


@dataclass(frozen=True)
class _SeriesContext:
    patient: PatientInfo
    study: StudyInfo
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    series_number: int
    modality: str
    description: str
    body_part: str
    station: str
    model: str
    seed: str
    series_time: str


def _base_dataset(ctx: _SeriesContext, sop_class: UID, index: int) -> Dataset:
    """Patient, study, series, frame of reference, equipment and SOP common modules."""
    for what, value in (
        ("study description", ctx.study.description),
        ("referring physician", ctx.study.referring_physician),
        ("institution", ctx.study.institution),
        ("series description", ctx.description),
    ):
        _check_encodable(value, ctx.patient.charset, what)

    sop_uid = UID(derive_uid(ctx.seed, "instance", ctx.series_uid, str(index)))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION

    ds = Dataset()
    ds.file_meta = meta
    if ctx.patient.charset:
        ds.SpecificCharacterSet = ctx.patient.charset
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if ctx.modality == "CT" else "M"]
    ds.InstanceCreationDate = ctx.study.date
    ds.InstanceCreationTime = ctx.series_time
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ctx.study.date
    ds.SeriesDate = ctx.study.date
    ds.AcquisitionDate = ctx.study.date
    ds.ContentDate = ctx.study.date
    ds.StudyTime = ctx.study.time
    ds.SeriesTime = ctx.series_time
    ds.AcquisitionTime = ctx.series_time
    ds.ContentTime = ctx.series_time
    ds.AccessionNumber = ctx.study.accession_number
    ds.Modality = ctx.modality
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = ctx.study.institution
    ds.ReferringPhysicianName = ctx.study.referring_physician
    ds.StationName = ctx.station
    ds.StudyDescription = ctx.study.description
    ds.SeriesDescription = ctx.description
    ds.ManufacturerModelName = ctx.model
    ds.PatientName = ctx.patient.name
    ds.PatientID = ctx.patient.patient_id
    ds.PatientBirthDate = ctx.patient.birth_date
    ds.PatientSex = ctx.patient.sex
    ds.PatientAge = _age(ctx.patient.birth_date, ctx.study.date)
    ds.BodyPartExamined = ctx.body_part
    ds.DeviceSerialNumber = str(uuid.uuid5(UID_NAMESPACE, ctx.station).int % 10**8)
    ds.SoftwareVersions = _SOFTWARE
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = ctx.study_uid
    ds.SeriesInstanceUID = ctx.series_uid
    ds.StudyID = ctx.study.study_id
    ds.SeriesNumber = ctx.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    return ds


def _series_time(study: StudyInfo, series_number: int) -> str:
    start = _dt.datetime.strptime(study.date + study.time, "%Y%m%d%H%M%S")
    return (start + _dt.timedelta(minutes=4 * series_number)).strftime("%H%M%S")


def _image_pixel_module(
    ds: Dataset, rows: int, cols: int, bits_stored: int, signed: bool, pixels: bytes
) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.add_new(0x7FE00010, "OW", pixels)


def ct_series(
    *,
    patient: PatientInfo,
    study_uid: str,
    series_number: int,
    slices: int = 60,
    rows: int = 512,
    cols: int = 512,
    slice_thickness: float = 1.0,
    description: str = "Thorax 1.0 B31f",
    seed: str = DEFAULT_SEED,
    study: StudyInfo | None = None,
    field_of_view: float = 350.0,
) -> Iterator[Dataset]:
    """Yield an axial CT Image Storage series of a body phantom, head to feet.

    Pixel data are signed 16-bit stored values with RescaleSlope 1 and
    RescaleIntercept -1024 (so stored = HU + 1024).  Slices are contiguous
    (spacing = ``slice_thickness``) and centred on z = 0; pixels are square
    with spacing ``field_of_view / max(rows, cols)``.  The series, frame of
    reference and instance UIDs derive from ``seed``, ``study_uid`` and
    ``series_number``.  Each data set carries Explicit VR Little Endian file
    meta and can be written with ``save_as(path, enforce_file_format=True)``.
    """
    if slices < 1 or rows < 1 or cols < 1 or slice_thickness <= 0:
        raise ValueError("slices, rows, cols and slice_thickness must be positive")
    study = study or StudyInfo()
    series_uid = derive_uid(seed, "series", study_uid, str(series_number))
    ctx = _SeriesContext(
        patient=patient,
        study=study,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=derive_uid(seed, "frame-of-reference", series_uid),
        series_number=series_number,
        modality="CT",
        description=description,
        body_part="CHEST",
        station="SYNCT01",
        model="PhantomScan CT 64",
        seed=seed,
        series_time=_series_time(study, series_number),
    )
    spacing = round(field_of_view / max(rows, cols), 6)
    (x0, y0, _), _ = _axial_forms(rows, cols, spacing)
    z_top = (slices - 1) / 2 * slice_thickness
    for k in range(slices):
        z = z_top - k * slice_thickness
        ds = _base_dataset(ctx, CTImageStorage, k)
        ds.SliceThickness = _ds(slice_thickness)
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _ds(field_of_view)
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "140"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = 250
        ds.Exposure = 125
        ds.ConvolutionKernel = "B31f"
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = _ds(z)
        ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        pixels = _ct_slice(rows, cols, spacing, z, k, seed)
        _image_pixel_module(ds, rows, cols, 16, True, pixels.tobytes())
        yield ds


def _rotation(tilt_deg: float, yaw_deg: float) -> npt.NDArray[np.float64]:
    """Rotation about the patient's left-right axis (tilt), then about the feet-head axis."""
    t, y = math.radians(tilt_deg), math.radians(yaw_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    rz = np.array([[math.cos(y), -math.sin(y), 0], [math.sin(y), math.cos(y), 0], [0, 0, 1]])
    rotation: npt.NDArray[np.float64] = rz @ rx
    return rotation


def mr_series(
    *,
    patient: PatientInfo,
    study_uid: str,
    series_number: int,
    oblique: bool = True,
    slices: int = 24,
    rows: int = 256,
    cols: int = 256,
    slice_thickness: float = 5.0,
    slice_gap: float = 1.0,
    echo_time: float = 12.0,
    repetition_time: float = 500.0,
    flip_angle: float = 90.0,
    field_strength: float = 1.5,
    description: str = "t1_se_tra",
    seed: str = DEFAULT_SEED,
    study: StudyInfo | None = None,
    field_of_view: float = 230.0,
) -> Iterator[Dataset]:
    """Yield an MR Image Storage series of a head phantom.

    With ``oblique`` the slice plane is tilted 18 degrees about the
    left-right axis and turned 7 degrees about the feet-head axis, as for
    an AC-PC aligned brain scan; ImageOrientationPatient holds the rotated
    row and column directions (rounded to 6 decimals) and every
    ImagePositionPatient lies on the line along their cross product, spaced
    ``slice_thickness + slice_gap`` (SpacingBetweenSlices).  Without it the
    slices are axial.  An echo time above 50 ms gives T2 contrast, else T1.
    Pixel data are unsigned, 12 bits stored.
    """
    if slices < 1 or rows < 1 or cols < 1 or slice_thickness <= 0 or slice_gap < 0:
        raise ValueError("slices, rows, cols and slice_thickness must be positive")
    study = study or StudyInfo()
    series_uid = derive_uid(seed, "series", study_uid, str(series_number))
    ctx = _SeriesContext(
        patient=patient,
        study=study,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=derive_uid(seed, "frame-of-reference", series_uid),
        series_number=series_number,
        modality="MR",
        description=description,
        body_part="HEAD",
        station="SYNMR01",
        model=f"PhantomScan MR {field_strength:g}T",
        seed=seed,
        series_time=_series_time(study, series_number),
    )
    rot = _rotation(-18.0, 7.0) if oblique else np.eye(3)
    # Round first and derive positions from the rounded cosines, so that the
    # stored geometry is self-consistent to the precision it is written with.
    row_dir = np.round(rot[:, 0], 6)
    col_dir = np.round(rot[:, 1], 6)
    row_cos = [float(c) for c in row_dir]
    col_cos = [float(c) for c in col_dir]
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    spacing = round(field_of_view / max(rows, cols), 6)
    step = slice_thickness + slice_gap
    centre = np.array([0.0, -5.0, 12.0])
    corner = centre - (cols - 1) / 2 * spacing * row_dir - (rows - 1) / 2 * spacing * col_dir
    contrast = 1 if echo_time > 50.0 else 0
    iop = [_ds(float(c)) for c in (*row_dir, *col_dir)]
    window = (1100, 1600) if contrast == 0 else (1000, 2200)
    for k in range(slices):
        position = corner + (k - (slices - 1) / 2) * step * normal
        ipp = [round(float(c), 4) for c in position]
        ds = _base_dataset(ctx, MRImageStorage, k)
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SK" if contrast else "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = "tse15" if contrast else "se1"
        ds.SliceThickness = _ds(slice_thickness)
        ds.RepetitionTime = _ds(repetition_time)
        ds.EchoTime = _ds(echo_time)
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = _ds(_GYROMAGNETIC_MHZ_PER_T * field_strength)
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = "1"
        ds.MagneticFieldStrength = _ds(field_strength)
        ds.SpacingBetweenSlices = _ds(step)
        ds.EchoTrainLength = "15" if contrast else "1"
        ds.PixelBandwidth = "130"
        ds.ReceiveCoilName = "Head 16"
        ds.TransmitCoilName = "Body"
        ds.InPlanePhaseEncodingDirection = "ROW"
        ds.FlipAngle = _ds(flip_angle)
        ds.ImagePositionPatient = [_ds(c) for c in ipp]
        ds.ImageOrientationPatient = iop
        ds.SliceLocation = _ds(float(np.dot(np.array(ipp), normal)))
        ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
        ds.WindowCenter = str(window[0])
        ds.WindowWidth = str(window[1])
        pixels = _mr_slice(rows, cols, spacing, ipp, row_cos, col_cos, contrast, k, seed)
        _image_pixel_module(ds, rows, cols, 12, False, pixels.tobytes())
        yield ds


def sample_patients() -> dict[str, PatientInfo]:
    """The demo patients by key: ``ascii``, ``latin1``, ``polish``, ``japanese``."""
    return {
        "ascii": PatientInfo("DGW0001", "Doe^John", "19640212", "M", ""),
        "latin1": PatientInfo("DGW0002", "Müller^Jürgen", "19571103", "M", "ISO_IR 100"),
        "polish": PatientInfo("DGW0003", "Łukasiewicz^Zofia^Maria", "19820527", "F", "ISO_IR 192"),
        "japanese": PatientInfo(
            "DGW0004", "Yamada^Tarou=山田^太郎=やまだ^たろう", "19750830", "M", "ISO_IR 192"
        ),
    }


def sample_studies(
    *,
    ct_slices: int = 60,
    mr_slices: int = 24,
    ct_matrix: int = 256,
    mr_matrix: int = 256,
    seed: str = DEFAULT_SEED,
) -> Iterator[Dataset]:
    """Yield the demo data set: 4 patients, 6 studies, 7 series.

    ================  ==========  ==========================================
    patient           date        series
    ================  ==========  ==========================================
    Doe^John          2019-03-14  CT chest
    Müller^Jürgen     2020-06-02  CT abdomen (2 mm) and axial MR (T2)
    Müller^Jürgen     2021-11-23  oblique MR head (T1)
    Łukasiewicz^...   2022-01-10  oblique MR head, T1 and T2
    Yamada^Tarou=...  2023-07-07  CT chest (description in Japanese)
    Doe^John          2024-02-29  oblique MR head (T2)
    ================  ==========  ==========================================

    With the defaults that is 3 x ``ct_slices`` + 5 x ``mr_slices`` = 300
    files of 128 KiB pixel data each, about 40 MB.
    """
    p = sample_patients()

    def study_uid(accession: str) -> str:
        return derive_uid(seed, "study", accession)

    doe_ct = StudyInfo(
        date="20190314",
        time="081500",
        accession_number="ACC2019031401",
        study_id="1001",
        description="CT Thorax",
        referring_physician="Smith^Alice^^Dr.",
        institution="Springfield General Hospital",
    )
    yield from ct_series(
        patient=p["ascii"],
        study=doe_ct,
        study_uid=study_uid(doe_ct.accession_number),
        series_number=1,
        slices=ct_slices,
        rows=ct_matrix,
        cols=ct_matrix,
        description="Thorax 1.0 B31f",
        seed=seed,
    )

    mueller_1 = StudyInfo(
        date="20200602",
        time="141030",
        accession_number="ACC2020060207",
        study_id="2001",
        description="CT/MR Abdomen",
        referring_physician="Schäfer^Anna",
        institution="Klinikum Süd",
    )
    uid = study_uid(mueller_1.accession_number)
    yield from ct_series(
        patient=p["latin1"],
        study=mueller_1,
        study_uid=uid,
        series_number=1,
        slices=ct_slices,
        rows=ct_matrix,
        cols=ct_matrix,
        slice_thickness=2.0,
        description="Abdomen venös 2.0 B30f",
        seed=seed,
    )
    yield from mr_series(
        patient=p["latin1"],
        study=mueller_1,
        study_uid=uid,
        series_number=2,
        oblique=False,
        slices=mr_slices,
        rows=mr_matrix,
        cols=mr_matrix,
        echo_time=90.0,
        repetition_time=1200.0,
        flip_angle=150.0,
        description="t2_haste_tra",
        seed=seed,
    )

    mueller_2 = StudyInfo(
        date="20211123",
        time="101500",
        accession_number="ACC2021112302",
        study_id="2002",
        description="MRT Schädel",
        referring_physician="Schäfer^Anna",
        institution="Klinikum Süd",
    )
    yield from mr_series(
        patient=p["latin1"],
        study=mueller_2,
        study_uid=study_uid(mueller_2.accession_number),
        series_number=1,
        slices=mr_slices,
        rows=mr_matrix,
        cols=mr_matrix,
        description="t1_se_obl",
        seed=seed,
    )

    lukasiewicz = StudyInfo(
        date="20220110",
        time="163000",
        accession_number="ACC2022011003",
        study_id="3001",
        description="MR Głowa",
        referring_physician="Wiśniewska^Anna",
        institution="Szpital Miejski Łódź",
    )
    uid = study_uid(lukasiewicz.accession_number)
    yield from mr_series(
        patient=p["polish"],
        study=lukasiewicz,
        study_uid=uid,
        series_number=1,
        slices=mr_slices,
        rows=mr_matrix,
        cols=mr_matrix,
        field_strength=3.0,
        description="T1 SE oblique",
        seed=seed,
    )
    yield from mr_series(
        patient=p["polish"],
        study=lukasiewicz,
        study_uid=uid,
        series_number=2,
        slices=mr_slices,
        rows=mr_matrix,
        cols=mr_matrix,
        echo_time=100.0,
        repetition_time=4000.0,
        flip_angle=150.0,
        field_strength=3.0,
        description="T2 TSE oblique",
        seed=seed,
    )

    yamada = StudyInfo(
        date="20230707",
        time="113000",
        accession_number="ACC2023070704",
        study_id="4001",
        description="CT 胸部",
        referring_physician="Suzuki^Hanako=鈴木^花子",
        institution="東京総合病院",
    )
    yield from ct_series(
        patient=p["japanese"],
        study=yamada,
        study_uid=study_uid(yamada.accession_number),
        series_number=1,
        slices=ct_slices,
        rows=ct_matrix,
        cols=ct_matrix,
        slice_thickness=1.5,
        description="胸部 1.5 B31f",
        seed=seed,
    )

    doe_mr = StudyInfo(
        date="20240229",
        time="075900",
        accession_number="ACC2024022905",
        study_id="1002",
        description="MR Head",
        referring_physician="Smith^Alice^^Dr.",
        institution="Springfield General Hospital",
    )
    yield from mr_series(
        patient=p["ascii"],
        study=doe_mr,
        study_uid=study_uid(doe_mr.accession_number),
        series_number=3,
        slices=mr_slices,
        rows=mr_matrix,
        cols=mr_matrix,
        echo_time=95.0,
        repetition_time=3500.0,
        flip_angle=150.0,
        description="t2_tse_obl",
        seed=seed,
    )


def benchmark_ct(*, slices: int = 300, seed: str = DEFAULT_SEED) -> Iterator[Dataset]:
    """One 512x512 CT series of ``slices`` slices (300: 157 MB) for transfer benchmarks."""
    patient = PatientInfo("DGW0900", "Bench^Phantom", "19800101", "O", "")
    study = StudyInfo(
        date="20250115",
        time="120000",
        accession_number="ACC2025011509",
        study_id="9001",
        description="CT Benchmark",
        referring_physician="",
    )
    yield from ct_series(
        patient=patient,
        study=study,
        study_uid=derive_uid(seed, "study", study.accession_number),
        series_number=1,
        slices=slices,
        description=f"Benchmark {slices} x 512 x 512",
        seed=seed,
    )


def write_datasets(datasets: Iterable[Dataset], out_dir: Path) -> list[Path]:
    """Write each data set as a Part 10 file ``<SOPInstanceUID>.dcm`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_sample_studies(
    out_dir: Path,
    *,
    ct_slices: int = 60,
    mr_slices: int = 24,
    ct_matrix: int = 256,
    mr_matrix: int = 256,
    seed: str = DEFAULT_SEED,
) -> list[Path]:
    """Write :func:`sample_studies` to ``out_dir``; returns the file paths in generation order."""
    return write_datasets(
        sample_studies(
            ct_slices=ct_slices,
            mr_slices=mr_slices,
            ct_matrix=ct_matrix,
            mr_matrix=mr_matrix,
            seed=seed,
        ),
        out_dir,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m app.sampledata",
        description="Write deterministic synthetic DICOM files.",
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--ct-slices", type=int, default=60, metavar="N")
    parser.add_argument("--mr-slices", type=int, default=24, metavar="N")
    parser.add_argument(
        "--big-ct",
        action="store_true",
        help="write only one 300-slice 512x512 CT series (about 157 MB) for benchmarks",
    )
    args = parser.parse_args(argv)
    if args.big_ct:
        paths = write_datasets(benchmark_ct(), args.out_dir)
    else:
        paths = write_sample_studies(
            args.out_dir, ct_slices=args.ct_slices, mr_slices=args.mr_slices
        )
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files, {total / 1e6:.1f} MB, to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
