"""Which attributes belong to which query level, and what QIDO-RS returns by default.

The level tables follow PS3.4 C.6.1.1 (Patient Root) and C.6.2.1 (Study Root) key
lists; the default return attributes follow PS3.18 Tables 10.6.3-3 to 10.6.3-5.
"""

from __future__ import annotations

from enum import StrEnum

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword


class Level(StrEnum):
    """Query/Retrieve Level (0008,0052) values, top to bottom."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return _DEPTH[self]

    def below(self) -> Level | None:
        order = list(Level)
        i = order.index(self)
        return order[i + 1] if i + 1 < len(order) else None

    def above(self) -> Level | None:
        order = list(Level)
        i = order.index(self)
        return order[i - 1] if i > 0 else None


_DEPTH = {Level.PATIENT: 0, Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}


def _tags(*keywords: str) -> frozenset[int]:
    out = set()
    for kw in keywords:
        tag = tag_for_keyword(kw)
        if tag is None:  # pragma: no cover - a typo in this table
            raise KeyError(kw)
        out.add(int(tag))
    return frozenset(out)


# Unique key of each level (PS3.4 C.6.1.1.2-5, C.6.2.1.2-4).
UNIQUE_KEY: dict[Level, int] = {
    Level.PATIENT: 0x00100020,  # PatientID
    Level.STUDY: 0x0020000D,  # StudyInstanceUID
    Level.SERIES: 0x0020000E,  # SeriesInstanceUID
    Level.IMAGE: 0x00080018,  # SOPInstanceUID
}

PATIENT_KEYS = _tags(
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
)

STUDY_KEYS = _tags(
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyInstanceUID",
    "ReferringPhysicianName",
    "StudyDescription",
    "ProcedureCodeSequence",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    "OtherStudyNumbers",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "ModalitiesInStudy",
    "SOPClassesInStudy",
    "AnatomicRegionsInStudyCodeSequence",
    "IssuerOfAccessionNumberSequence",
    "InstanceAvailability",
    "TimezoneOffsetFromUTC",
)

SERIES_KEYS = _tags(
    "Modality",
    "SeriesNumber",
    "SeriesInstanceUID",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "ProtocolName",
    "Laterality",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
    "NumberOfSeriesRelatedInstances",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "InstitutionName",
    "OperatorsName",
    "PerformingPhysicianName",
    "FrameOfReferenceUID",
)

# Anything not listed above is taken as an instance (IMAGE level) attribute: the
# composite instance module attributes are open-ended (Rows, Columns, ...).

LEVEL_KEYS: dict[Level, frozenset[int]] = {
    Level.PATIENT: PATIENT_KEYS,
    Level.STUDY: STUDY_KEYS,
    Level.SERIES: SERIES_KEYS,
}

# Attributes that are never match or return keys: they steer the query itself.
QUERY_CONTROL = _tags("QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle")

# Attributes computed by the gateway rather than asked of the PACS.
GATEWAY_COMPUTED = _tags("RetrieveURL")


def level_of(tag: int, *, study_root: bool = True) -> Level:
    """Return the query level an attribute belongs to.

    In the Study Root model patient attributes are study-level keys (PS3.4
    C.6.2.1.2); in the Patient Root model they live at PATIENT level.
    """
    if tag in PATIENT_KEYS:
        return Level.STUDY if study_root else Level.PATIENT
    if tag in STUDY_KEYS:
        return Level.STUDY
    if tag in SERIES_KEYS:
        return Level.SERIES
    return Level.IMAGE


_STUDY_DEFAULTS = _tags(
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "TimezoneOffsetFromUTC",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    # Not in Table 10.6.3-3, but every study list (OHIF's included) shows it.
    "StudyDescription",
)

_SERIES_DEFAULTS = _tags(
    "Modality",
    "TimezoneOffsetFromUTC",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)

_INSTANCE_DEFAULTS = _tags(
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "TimezoneOffsetFromUTC",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)

_PATIENT_DEFAULTS = _tags(
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
)

DEFAULT_RETURN: dict[Level, frozenset[int]] = {
    Level.PATIENT: _PATIENT_DEFAULTS,
    Level.STUDY: _STUDY_DEFAULTS,
    Level.SERIES: _SERIES_DEFAULTS,
    Level.IMAGE: _INSTANCE_DEFAULTS,
}

# includefield=all: every optional key the gateway knows for the level.
ALL_RETURN: dict[Level, frozenset[int]] = {
    Level.PATIENT: PATIENT_KEYS,
    Level.STUDY: STUDY_KEYS | PATIENT_KEYS,
    Level.SERIES: SERIES_KEYS,
    Level.IMAGE: _INSTANCE_DEFAULTS
    | _tags(
        "ImageType",
        "AcquisitionNumber",
        "ContentDate",
        "ContentTime",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "SliceLocation",
        "SliceThickness",
        "PixelSpacing",
        "PhotometricInterpretation",
        "SamplesPerPixel",
        "BitsStored",
        "WindowCenter",
        "WindowWidth",
    ),
}


def keyword(tag: int) -> str:
    """Return the DICOM keyword for *tag*, or its 8-hex form for private/unknown tags."""
    return keyword_for_tag(tag) or f"{tag:08X}"


def vr_of(tag: int) -> str:
    """Return the dictionary VR of *tag*, resolving ambiguous VRs to the common choice."""
    vr = dictionary_VR(tag)
    if " or " in vr:
        # "US or SS", "OB or OW": the C-FIND identifier carries no pixel data, so
        # the unsigned/word form is the one PACS answer with.
        return "US" if vr.startswith("US") else "OW"
    return vr
