"""BIDS-style JSON sidecar for a converted series, with dcm2niix's field names and units.

Field names and units follow what dcm2niix writes (``BIDS/README.md`` of
dcm2niix; BIDS "MRI specific fields"): times in seconds (DICOM holds
milliseconds), angles in degrees, lengths in mm, ``AcquisitionTime`` as
``HH:MM:SS.ffffff``, ``ImageOrientationPatientDICOM`` and ``ImageType`` as
lists.  Fields whose attribute is absent are left out, as dcm2niix does.

Enhanced multi-frame objects keep most of these attributes in functional
groups (PS3.3 C.7.6.16): they are looked up in the data set itself, then in
the shared functional groups, then in the first frame's.

Patient and study identifiers (name, ID, birth date, sex, age, size, weight,
accession number, study ID, referring physician, study and series UIDs and
the acquisition date) are written only with ``phi=True`` (dcm2niix ``-ba n``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from app import __version__

__all__ = ["CONVERSION_SOFTWARE", "sidecar"]

CONVERSION_SOFTWARE = "dimse-gateway"

# dcm2niix reports vendors by a short name (``nii_dicom.cpp`` kMANUFACTURER_*).
_VENDORS = (
    ("SIEMENS", "Siemens"),
    ("GE ", "GE"),
    ("GE MEDICAL", "GE"),
    ("GEMS", "GE"),
    ("PHILIPS", "Philips"),
    ("TOSHIBA", "Toshiba"),
    ("CANON", "Canon"),
    ("UIH", "UIH"),
    ("UNITED IMAGING", "UIH"),
    ("HITACHI", "Hitachi"),
    ("BRUKER", "Bruker"),
    ("MEDISO", "Mediso"),
)

# (BIDS name, DICOM keyword, kind) in dcm2niix's order.  Kinds: "str", "int",
# "float", "ms" (milliseconds to seconds), "list" (strings), "floats".
_GLOBAL_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("Modality", "Modality", "str"),
    ("MagneticFieldStrength", "MagneticFieldStrength", "float"),
    ("ImagingFrequency", "ImagingFrequency", "float"),
    ("Manufacturer", "Manufacturer", "vendor"),
    ("ManufacturersModelName", "ManufacturerModelName", "str"),
    ("InstitutionName", "InstitutionName", "str"),
    ("DeviceSerialNumber", "DeviceSerialNumber", "str"),
    ("StationName", "StationName", "str"),
    ("BodyPartExamined", "BodyPartExamined", "str"),
    ("PatientPosition", "PatientPosition", "str"),
    ("SoftwareVersions", "SoftwareVersions", "str"),
    ("MRAcquisitionType", "MRAcquisitionType", "str"),
    ("StudyDescription", "StudyDescription", "str"),
    ("SeriesDescription", "SeriesDescription", "str"),
    ("ProtocolName", "ProtocolName", "str"),
    ("ScanningSequence", "ScanningSequence", "str"),
    ("SequenceVariant", "SequenceVariant", "str"),
    ("ScanOptions", "ScanOptions", "str"),
    ("SequenceName", "SequenceName", "str"),
    ("PulseSequenceName", "PulseSequenceName", "str"),
    ("ImageType", "ImageType", "list"),
    ("SeriesNumber", "SeriesNumber", "int"),
    ("AcquisitionNumber", "AcquisitionNumber", "int"),
    ("ImageComments", "ImageComments", "str"),
    ("SliceThickness", "SliceThickness", "float"),
    ("SpacingBetweenSlices", "SpacingBetweenSlices", "float"),
    ("EchoNumber", "EchoNumbers", "int"),
    ("EchoTime", "EchoTime", "ms"),
    ("RepetitionTime", "RepetitionTime", "ms"),
    ("InversionTime", "InversionTime", "ms"),
    ("FlipAngle", "FlipAngle", "float"),
    ("ReceiveCoilName", "ReceiveCoilName", "str"),
    ("PixelBandwidth", "PixelBandwidth", "float"),
    ("ConvolutionKernel", "ConvolutionKernel", "str"),
    ("ExposureTime", "ExposureTime", "ms"),
    ("XRayTubeCurrent", "XRayTubeCurrent", "float"),
    ("XRayExposure", "Exposure", "float"),
    ("ImageOrientationPatientDICOM", "ImageOrientationPatient", "floats"),
    ("InPlanePhaseEncodingDirectionDICOM", "InPlanePhaseEncodingDirection", "str"),
)

_PHI_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("PatientName", "PatientName", "str"),
    ("PatientID", "PatientID", "str"),
    ("PatientBirthDate", "PatientBirthDate", "date"),
    ("PatientSex", "PatientSex", "str"),
    ("PatientAge", "PatientAge", "str"),
    ("PatientSize", "PatientSize", "float"),
    ("PatientWeight", "PatientWeight", "float"),
    ("AccessionNumber", "AccessionNumber", "str"),
    ("StudyID", "StudyID", "str"),
    ("ReferringPhysicianName", "ReferringPhysicianName", "str"),
    ("StudyInstanceUID", "StudyInstanceUID", "str"),
    ("SeriesInstanceUID", "SeriesInstanceUID", "str"),
)

# Enhanced MR / CT keep some attributes under another keyword in the functional groups.
_FUNCTIONAL_ALIASES = {
    "EchoTime": ("EffectiveEchoTime",),
    "InversionTime": ("InversionTimes",),
    "ImageType": ("FrameType",),
}


def _functional_items(ds: Dataset) -> Iterator[Dataset]:
    """First items of every functional group macro: shared ones, then the first frame's."""
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if keyword not in ds or not ds[keyword].value:
            continue
        group = ds[keyword].value[0]
        for element in group:
            if element.VR == "SQ" and element.value:
                yield element.value[0]


def _raw(ds: Dataset, keyword: str) -> Any:
    value = ds.get(keyword)
    if value not in (None, ""):
        return value
    names = (keyword, *_FUNCTIONAL_ALIASES.get(keyword, ()))
    for item in _functional_items(ds):
        for name in names:
            value = item.get(name)
            if value not in (None, ""):
                return value
    return None


def _number(value: Any) -> float | int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    # dcm2niix prints with %g: six significant digits, integers without a point.
    number = float(f"{number:.6g}")
    return int(number) if number.is_integer() else number


def _first(value: Any) -> Any:
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return value
    items = list(value)
    return items[0] if items else None


def _convert(value: Any, kind: str) -> Any:
    if kind == "list":
        items = [value] if isinstance(value, str) else list(value)
        return [str(v) for v in items]
    if kind == "floats":
        numbers = [_number(v) for v in value]
        return None if any(n is None for n in numbers) else numbers
    if kind in ("float", "int", "ms"):
        number = _number(_first(value))
        if number is None:
            return None
        if kind == "ms":
            return _number(number / 1000.0)
        if kind == "int":
            return int(number)
        return number
    if kind == "vendor":
        text = str(value).strip()
        upper = text.upper() + " "
        return next((short for prefix, short in _VENDORS if upper.startswith(prefix)), text)
    if kind == "date":
        text = str(value)
        return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text
    if isinstance(value, MultiValue | list | tuple):
        # Multi-valued CS such as ScanOptions: dcm2niix joins them with a backslash.
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _time_of_day(ds: Dataset) -> float | None:
    """Acquisition time (seconds after midnight) of a data set, or of its first frame."""
    text = ds.get("AcquisitionTime") or ""
    if not text:
        dt = ds.get("AcquisitionDateTime") or ""
        if not dt:
            content = next(
                (i for i in _functional_items(ds) if "FrameAcquisitionDateTime" in i), None
            )
            dt = content.get("FrameAcquisitionDateTime", "") if content is not None else ""
        text = str(dt)[8:]
    text = str(text).replace(":", "").strip()
    head, _, fraction = text.partition(".")
    if len(head) < 2 or not head.isdigit():
        return None
    head = (head + "0000")[:6]
    seconds = int(head[:2]) * 3600 + int(head[2:4]) * 60 + int(head[4:6])
    return seconds + (float("0." + fraction) if fraction.isdigit() else 0.0)


def _format_time(seconds: float) -> str:
    micro = round(seconds * 1_000_000)
    hours, rest = divmod(micro, 3_600_000_000)
    minutes, rest = divmod(rest, 60_000_000)
    secs, micro = divmod(rest, 1_000_000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{micro:06d}"


def sidecar(
    headers: Sequence[Dataset],
    *,
    phi: bool = False,
    echo_number: int | None = None,
    echo_time: float | None = None,
    resampled: str | None = None,
) -> dict[str, Any]:
    """The BIDS sidecar of a series whose ``headers`` are in slice order (first first).

    Values come from the first header; ``AcquisitionTime`` is the earliest of
    all headers (the start of the acquisition).  ``phi`` adds the patient and
    study identifiers listed in the module docstring.  For one echo of a
    multi-echo series (one file of dcm2niix's ``_e1``, ``_e2``...) give its
    ``echo_number`` and ``echo_time`` (ms): ``EchoNumber`` is then written even
    for the first echo, as dcm2niix does, and both override the headers (an
    enhanced file holds every echo).  ``resampled`` (``Volume.resampled``)
    is written as ``Resampled`` with the GantryDetectorTilt, a gateway
    addition: dcm2niix says it only in its ``_Tilt`` file name.
    """
    if not headers:
        raise ValueError("a sidecar needs at least one header")
    first = headers[0]
    result: dict[str, Any] = {}
    for name, keyword, kind in _GLOBAL_FIELDS:
        if name == "AcquisitionNumber":
            times = [t for t in (_time_of_day(ds) for ds in headers) if t is not None]
            if times:
                result["AcquisitionTime"] = _format_time(min(times))
        raw = _raw(first, keyword)
        if name == "EchoNumber" and echo_number is not None:
            result[name] = echo_number
            continue
        if name == "EchoTime" and echo_time is not None:
            raw = echo_time
        if raw is None and name == "ProtocolName":
            raw = _raw(first, "SeriesDescription")  # as dcm2niix falls back
        if raw is None:
            continue
        value = _convert(raw, kind)
        if name == "EchoNumber" and value == 1:
            continue  # dcm2niix names the echo only in multi-echo series
        if name == "InversionTime" and not value:
            continue  # dcm2niix writes TI only when there is one
        if name == "InPlanePhaseEncodingDirectionDICOM" and value == "COLUMN":
            value = "COL"  # dcm2niix's spelling
        if value not in (None, "", []):
            result[name] = value
    if phi:
        for name, keyword, kind in _PHI_FIELDS:
            raw = _raw(first, keyword)
            if raw is not None:
                value = _convert(raw, kind)
                if value not in (None, ""):
                    result[name] = value
        date = first.get("AcquisitionDate") or first.get("SeriesDate") or first.get("StudyDate")
        times = [t for t in (_time_of_day(ds) for ds in headers) if t is not None]
        if date and times and len(str(date)) == 8:
            day = str(date)
            stamp = _format_time(min(times))
            result["AcquisitionDateTime"] = f"{day[:4]}-{day[4:6]}-{day[6:8]}T{stamp}"
    if resampled:
        tilt = _convert(_raw(first, "GantryDetectorTilt"), "float")
        if tilt is not None:
            result["GantryDetectorTilt"] = tilt
        result["Resampled"] = resampled
    result["ConversionSoftware"] = CONVERSION_SOFTWARE
    result["ConversionSoftwareVersion"] = __version__
    return result
