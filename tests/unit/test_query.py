"""QIDO-RS parameter parsing (PS3.18 §8.3.4)."""

from __future__ import annotations

import pytest

from app.dicomweb.attributes import Level
from app.dicomweb.query import parse_qido, valid_uid
from app.errors import InvalidQuery

STUDY_UID = 0x0020000D


def test_keyword_and_tag_forms_are_the_same_key() -> None:
    a = parse_qido(Level.STUDY, [("PatientID", "P1")])
    b = parse_qido(Level.STUDY, [("00100020", "P1")])
    assert a.matches == [
        m.__class__(m.path, m.vr, m.value, m.level, "PatientID") for m in b.matches
    ]
    assert a.matches[0].path == (0x00100020,)


def test_uid_list_becomes_dimse_multi_value() -> None:
    q = parse_qido(Level.STUDY, [("StudyInstanceUID", "1.2.3,1.2.4")])
    assert q.matches[0].value == "1.2.3\\1.2.4"
    # OHIF joins study UIDs with backslashes.
    q = parse_qido(Level.STUDY, [("StudyInstanceUID", "1.2.3\\1.2.4")])
    assert q.matches[0].value == "1.2.3\\1.2.4"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20240101-20240131", "20240101-20240131"),
        ("-20240131", "-20240131"),
        ("20240101-", "20240101-"),
        ("20240101", "20240101"),
    ],
)
def test_date_ranges(value: str, expected: str) -> None:
    q = parse_qido(Level.STUDY, [("StudyDate", value)])
    assert q.matches[0].value == expected


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("StudyDate", "2024-01-01x", "StudyDate"),
        ("StudyDate", "20241301", "calendar"),
        ("StudyDate", "20240201-20240101", "starts after"),
        ("StudyInstanceUID", "1.2.abc", "not a valid DICOM UID"),
        ("StudyInstanceUID", "1.02.3", "not a valid DICOM UID"),
        ("NoSuchKeyword", "x", "not a DICOM attribute keyword"),
        ("limit", "-1", "must not be negative"),
        ("offset", "ten", "whole number"),
        ("fuzzymatching", "perhaps", "true or false"),
        ("PixelData", "", "cannot be matched"),
        ("QueryRetrieveLevel", "STUDY", "set by the gateway"),
        ("00091001", "x", "private"),
        ("StudyTime", "25", "StudyTime"),
        ("SeriesNumber", "abc", "not a valid IS number"),
        ("PatientName", "A\\B", "only supported for UIDs"),
        ("ModalitiesInStudy", "CT,,MR", "empty entry"),
        ("Modality", "CT,MAGNETICRESONANCE1", "16 characters"),
        ("Modality", "CT,M\tR", "not a code string"),
    ],
)
def test_bad_parameters_are_named(name: str, value: str, fragment: str) -> None:
    with pytest.raises(InvalidQuery) as info:
        parse_qido(Level.STUDY, [(name, value)])
    assert info.value.parameter == name
    assert fragment in info.value.message


@pytest.mark.parametrize("value", ["CT,MR", "CT\\MR", " CT , MR "])
def test_code_string_list(value: str) -> None:
    """Comma (OHIF) or backslash (DICOM) separated codes become one list key."""
    q = parse_qido(Level.STUDY, [("ModalitiesInStudy", value)])
    assert q.matches[0].value == "CT\\MR"


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        ("Doe^John^^^", "Doe^John"),
        ("Doe^John==", "Doe^John"),
        ("Yamada^Tarou=山田^太郎^=", "Yamada^Tarou=山田^太郎"),
        ("=山田*", "=山田*"),
        ("^John", "^John"),
        ("^", "^"),
    ],
)
def test_person_name_without_trailing_empty_components(value: str, sent: str) -> None:
    assert parse_qido(Level.STUDY, [("PatientName", value)]).matches[0].value == sent


def test_repeated_match_key_is_refused() -> None:
    with pytest.raises(InvalidQuery) as info:
        parse_qido(Level.STUDY, [("PatientID", "a"), ("00100020", "b")])
    assert info.value.parameter == "00100020"


def test_includefield_repeated_comma_and_all() -> None:
    q = parse_qido(
        Level.STUDY,
        [
            ("includefield", "00081030,00080060"),
            ("includefield", "StudyID"),
            ("includefield", "all"),
        ],
    )
    assert {0x00081030, 0x00080060, 0x00200010} <= q.includefields
    assert q.include_all
    # Series attributes asked for in a study search are not returned (PS3.18 §10.6.3.3.1).
    assert 0x00080060 not in q.return_tags(Level.STUDY)
    assert 0x00081030 in q.return_tags(Level.STUDY)


def test_path_uid_is_a_match_and_checked() -> None:
    q = parse_qido(Level.SERIES, [], path_uids={STUDY_UID: "1.2.840.1"})
    assert q.match(STUDY_UID) is not None
    with pytest.raises(InvalidQuery):
        parse_qido(Level.SERIES, [], path_uids={STUDY_UID: "../../etc"})


def test_limit_zero_is_no_limit() -> None:
    assert parse_qido(Level.STUDY, [("limit", "0")]).limit is None


def test_limit_offset_fuzzy() -> None:
    q = parse_qido(Level.STUDY, [("limit", "10"), ("offset", "5"), ("fuzzymatching", "true")])
    assert (q.limit, q.offset, q.fuzzymatching) == (10, 5, True)


def test_sequence_key() -> None:
    q = parse_qido(Level.SERIES, [("RequestAttributesSequence.ScheduledProcedureStepID", "S1")])
    assert q.matches[0].path == (0x00400275, 0x00400009)
    with pytest.raises(InvalidQuery):
        parse_qido(Level.SERIES, [("PatientID.StudyID", "x")])


def test_patient_level_refuses_lower_keys() -> None:
    with pytest.raises(InvalidQuery):
        parse_qido(Level.PATIENT, [("Modality", "CT")], study_root=False)


@pytest.mark.parametrize(
    ("uid", "ok"),
    [
        ("1.2.840.10008.1.2", True),
        ("0", True),
        ("1." * 40 + "1", False),
        ("1..2", False),
        ("", False),
    ],
)
def test_uid_grammar(uid: str, ok: bool) -> None:
    assert valid_uid(uid) is ok


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # One value with a negative UTC offset, not a range to the year 500.
        ("20240105103000-0500", "20240105103000-0500"),
        ("20240105+0100-20240106+0100", "20240105+0100-20240106+0100"),
        ("20240105-0500-20240106-0500", "20240105-0500-20240106-0500"),
        ("2024-", "2024-"),
    ],
)
def test_datetime_values_and_ranges_with_offsets(value: str, expected: str) -> None:
    q = parse_qido(Level.IMAGE, [("AcquisitionDateTime", value)])
    assert q.matches[0].value == expected


def test_time_range_compares_at_each_ends_precision() -> None:
    # "09" covers the whole hour, so 09:30 to 09 is a valid range.
    assert parse_qido(Level.STUDY, [("StudyTime", "0930-09")]).matches[0].value == "0930-09"


@pytest.mark.parametrize("value", ["nan", "inf", "1_000", "1e"])
def test_numbers_follow_the_vr_grammar(value: str) -> None:
    with pytest.raises(InvalidQuery):
        parse_qido(Level.SERIES, [("SeriesNumber", value)])


def test_query_uid_contradicting_the_url_matches_nothing() -> None:
    q = parse_qido(Level.SERIES, [("StudyInstanceUID", "1.2.3")], path_uids={STUDY_UID: "1.2.4"})
    assert q.contradictory
    agreeing = parse_qido(
        Level.SERIES, [("StudyInstanceUID", "1.2.4,1.2.5")], path_uids={STUDY_UID: "1.2.4"}
    )
    assert not agreeing.contradictory
