"""C-FIND matching semantics (PS3.4 C.2.2.2) applied to PACS answers by the gateway."""

from __future__ import annotations

import itertools
import re
from io import BytesIO

import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from app.dicomweb.attributes import Level, vr_of
from app.dicomweb.matching import matches, matches_all, time_key_for_pacs
from app.dicomweb.query import MatchKey, parse_qido


def key(name: str, value: str) -> MatchKey:
    """A match key as query.py builds it, for ``Keyword`` or ``Sequence.Keyword``."""
    path = tuple(int(tag_for_keyword(part) or 0) for part in name.split("."))
    return MatchKey(path, vr_of(path[-1]), value, Level.STUDY, name)


def dataset(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def roundtrip(ds: Dataset, *, implicit: bool = False) -> Dataset:
    """*ds* as it arrives in a C-FIND response: raw, undecoded elements."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = True
    write_dataset(fp, ds)
    return read_dataset(BytesIO(fp.getvalue()), implicit, True)


def raw(*elements: tuple[int, str, bytes]) -> Dataset:
    """Unconverted elements, holding values pydicom would refuse to write."""
    items: dict[BaseTag, DataElement | RawDataElement] = {
        Tag(tag): RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
        for tag, vr, value in elements
    }
    return Dataset(items)


# -- Universal, absent and empty (C.2.2.2.1, C.2.2.2.3) --------------------------------------


def test_universal_key_matches_present_empty_and_absent_attributes() -> None:
    assert matches(dataset(PatientName="Doe"), key("PatientName", "")) is True
    assert matches(dataset(PatientName=""), key("PatientName", "")) is True
    assert matches(Dataset(), key("PatientName", "")) is True


def test_absent_attribute_cannot_be_judged() -> None:
    assert matches(Dataset(), key("StudyDescription", "CT*")) is None
    assert matches(Dataset(), key("StudyDate", "20240101")) is None


def test_empty_stored_value_fails_everything_but_universal_and_a_lone_star() -> None:
    ds = roundtrip(dataset(StudyDescription="", PatientName="", ModalitiesInStudy=""))

    assert matches(ds, key("StudyDescription", "CT")) is False
    assert matches(ds, key("StudyDescription", "C*")) is False
    assert matches(ds, key("PatientName", "?*")) is False
    # "*" matches any sequence of characters, the empty one included (C.2.2.2.4).
    assert matches(ds, key("StudyDescription", "*")) is True
    assert matches(Dataset(), key("StudyDescription", "**")) is True
    assert matches(ds, key("ModalitiesInStudy", "CT")) is False


def test_matches_all_reports_unjudged_keys_and_judges_every_key() -> None:
    ds = dataset(PatientID="P1", Modality="CT")
    keys = [
        key("Modality", "MR"),  # fails
        key("PatientID", "P1"),
        key("ModalitiesInStudy", "CT"),  # absent
        key("StudyDescription", "*Thorax*"),  # absent
        key("StudyDate", ""),  # universal: never unjudged
    ]

    assert matches_all(ds, keys) == (False, [keys[2], keys[3]])
    assert matches_all(ds, keys[1:]) == (True, [keys[2], keys[3]])
    assert matches_all(ds, []) == (True, [])


# -- Single value (C.2.2.2.1) ----------------------------------------------------------------


def test_single_value_is_exact_and_case_sensitive() -> None:
    ds = dataset(AccessionNumber="Acc1", StudyID="12", PatientSex="M")

    assert matches(ds, key("AccessionNumber", "Acc1")) is True
    assert matches(ds, key("AccessionNumber", "ACC1")) is False
    assert matches(ds, key("AccessionNumber", "Acc")) is False
    assert matches(ds, key("PatientSex", "m")) is False


def test_padding_of_the_stored_value_is_ignored() -> None:
    ds = raw(
        (0x00100020, "LO", b"  P1  "),
        (0x00080050, "SH", b"A1 "),
        (0x0020000D, "UI", b"1.2.3\x00"),
    )

    assert matches(ds, key("PatientID", "P1")) is True
    assert matches(ds, key("AccessionNumber", "A1")) is True
    assert matches(ds, key("StudyInstanceUID", "1.2.3")) is True


def test_multi_valued_attribute_matches_if_any_value_matches() -> None:
    ds = roundtrip(dataset(ModalitiesInStudy=["CT", "MR"], OtherStudyNumbers=["7", "8"]))

    assert matches(ds, key("ModalitiesInStudy", "MR")) is True
    assert matches(ds, key("ModalitiesInStudy", "CT")) is True
    assert matches(ds, key("ModalitiesInStudy", "US")) is False
    assert matches(ds, key("ModalitiesInStudy", "M?")) is True
    # A list of codes (ModalitiesInStudy=CT,MR) matches if any code matches any value.
    assert matches(ds, key("ModalitiesInStudy", "US\\MR")) is True
    assert matches(ds, key("ModalitiesInStudy", "US\\C?")) is True
    assert matches(ds, key("ModalitiesInStudy", "US\\PT")) is False


def test_integer_and_decimal_strings_compare_as_numbers() -> None:
    ds = raw(
        (0x00101030, "DS", b"72.50 "),
        (0x00201208, "IS", b"0120"),
        (0x00101020, "DS", b"abc "),  # invalid: matches nothing, raises nothing
    )

    assert matches(ds, key("PatientWeight", "72.5")) is True
    assert matches(ds, key("PatientWeight", "7.25e1")) is True
    assert matches(ds, key("PatientWeight", "72")) is False
    assert matches(ds, key("NumberOfStudyRelatedInstances", "120")) is True
    assert matches(ds, key("PatientSize", "1.8")) is False


# -- Person names ----------------------------------------------------------------------------


def test_person_name_is_case_insensitive_and_ignores_trailing_empty_components() -> None:
    ds = roundtrip(dataset(PatientName="Doe^John^^^", ReferringPhysicianName="Roe^R"))

    assert matches(ds, key("PatientName", "doe^john")) is True
    assert matches(ds, key("PatientName", "DOE^JOHN^")) is True
    assert matches(ds, key("PatientName", "Doe")) is False  # a single value is the whole name
    assert matches(ds, key("PatientName", "doe*")) is True
    assert matches(ds, key("PatientName", "*JOHN")) is True
    assert matches(ds, key("PatientName", "D?E^J*")) is True
    assert matches(ds, key("PatientName", "Doe^Jane")) is False
    assert matches(ds, key("ReferringPhysicianName", "roe^r")) is True


def test_person_name_matches_each_component_group() -> None:
    # Decoded from ISO 2022 IR 87 bytes, as a Japanese PACS answers.
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds = Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = name
    ds = roundtrip(ds)

    assert matches(ds, key("PatientName", "Yamada^Tarou")) is True
    assert matches(ds, key("PatientName", "山田^太郎")) is True
    assert matches(ds, key("PatientName", "山田*")) is True
    assert matches(ds, key("PatientName", "やまだ^たろう")) is True
    assert matches(ds, key("PatientName", name)) is True
    assert matches(ds, key("PatientName", "yamada*=山田*")) is True
    assert matches(ds, key("PatientName", "山田^花子")) is False


def test_latin1_person_name_from_a_c_find_response() -> None:
    ds = dataset(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen")
    ds = roundtrip(ds, implicit=True)

    assert matches(ds, key("PatientName", "MÜLLER^JÜRGEN")) is True
    assert matches(ds, key("PatientName", "Mü*")) is True
    assert matches(ds, key("PatientName", "Muller*")) is False  # accents count unless fuzzy


def test_fuzzy_person_name_matches_component_prefixes() -> None:
    ds = dataset(PatientName="Müller^Jürgen^Karl")

    assert matches(ds, key("PatientName", "jür")) is False
    assert matches(ds, key("PatientName", "jür"), fuzzy=True) is True
    assert matches(ds, key("PatientName", "jur"), fuzzy=True) is True  # accents ignored
    assert matches(ds, key("PatientName", "KA"), fuzzy=True) is True
    assert matches(ds, key("PatientName", "mul^jur"), fuzzy=True) is True
    assert matches(ds, key("PatientName", "^jü"), fuzzy=True) is True
    assert matches(ds, key("PatientName", "j?r"), fuzzy=True) is True
    assert matches(ds, key("PatientName", "ller"), fuzzy=True) is False  # prefixes only
    assert matches(ds, key("PatientName", "jur^mul"), fuzzy=True) is False  # positions count
    assert matches(ds, key("PatientName", "a^b^c^d^e^f"), fuzzy=True) is False


# -- Wild cards (C.2.2.2.4) ------------------------------------------------------------------


def test_wild_cards_only_for_their_vrs() -> None:
    ds = dataset(StudyDescription="CT Thorax", PatientAge="054Y", StudyInstanceUID="1.2.3")

    assert matches(ds, key("StudyDescription", "CT*")) is True
    assert matches(ds, key("StudyDescription", "ct*")) is False
    assert matches(ds, key("StudyDescription", "CT?Thorax")) is True
    assert matches(ds, key("StudyDescription", "CT??Thorax")) is False
    # AS and UI are not wild card VRs: "*" and "?" are plain characters there.
    assert matches(ds, key("PatientAge", "05*")) is False
    assert matches(ds, key("PatientAge", "054?")) is False
    assert matches(ds, key("StudyInstanceUID", "1.2.*")) is False


def test_regular_expression_characters_are_literal() -> None:
    ds = dataset(StudyDescription="a.b (c+) [d] ^e$ \\f", AccessionNumber="a|b")

    assert matches(ds, key("StudyDescription", "a.b (c+) [d] ^e$*")) is True
    assert matches(ds, key("StudyDescription", "axb*")) is False
    assert matches(ds, key("AccessionNumber", "a|b")) is True
    assert matches(ds, key("AccessionNumber", "a")) is False


def _reference(pattern: str, text: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, re.DOTALL) is not None


def test_wild_card_matching_agrees_with_a_reference_on_every_short_case() -> None:
    # Exhaustive over a small alphabet: every pattern up to 4 symbols against
    # every non-empty text up to 4 characters.
    patterns = ["".join(p) for n in range(1, 5) for p in itertools.product("ab*?", repeat=n)]
    texts = ["".join(t) for n in range(1, 5) for t in itertools.product("ab", repeat=n)]
    for text in texts:
        ds = dataset(StudyDescription=text)
        for pattern in patterns:
            got = matches(ds, key("StudyDescription", pattern))
            assert got is _reference(pattern, text), (pattern, text)


def test_many_stars_against_a_long_text_stay_fast() -> None:
    ds = dataset(StudyComments="a" * 10_000)  # LT

    assert matches(ds, key("StudyComments", "*a*a*a*a*a*a*a*a*a*a*b")) is False


# -- UID lists (C.2.2.2.2) -------------------------------------------------------------------


def test_uid_list_matches_any_of_its_uids() -> None:
    ds = roundtrip(dataset(StudyInstanceUID="1.2.3"))
    query = parse_qido(Level.STUDY, [("StudyInstanceUID", "1.2.4,1.2.3")])

    assert matches(ds, query.matches[0]) is True
    assert matches(ds, key("StudyInstanceUID", "1.2.3\\1.2.4")) is True
    assert matches(ds, key("StudyInstanceUID", "1.2.30\\1.2")) is False


# -- Ranges (C.2.2.2.5) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20240105", True),
        ("20240104", False),
        ("20240101-20240131", True),
        ("20240105-20240105", True),
        ("20240106-20240131", False),
        ("-20240105", True),
        ("-20240104", False),
        ("20240105-", True),
        ("20240106-", False),
    ],
)
def test_date_single_value_and_ranges(value: str, expected: bool) -> None:
    ds = roundtrip(dataset(StudyDate="20240105"))

    assert matches(ds, key("StudyDate", value)) is expected


def test_acr_nema_dates_and_invalid_stored_dates() -> None:
    assert matches(raw((0x00080020, "DA", b"2024.01.05")), key("StudyDate", "20240101-")) is True
    assert matches(raw((0x00080020, "DA", b"20240")), key("StudyDate", "20240101-")) is False


@pytest.mark.parametrize(
    ("stored", "value", "expected"),
    [
        ("0930", "0900-093000", True),  # as strings "0930" < "093000"
        ("0930", "093001-", False),
        ("0930", "-0929", False),
        ("093045.5", "0930", True),  # a single value covers its precision
        ("0931", "0930", False),
        ("105959.999999", "-10", True),  # the upper end "10" is the whole hour
        ("1100", "-10", False),
        ("093000.5", "093000.4-093000.6", True),
        ("093000.7", "093000.4-093000.6", False),
        ("09:30:00", "0930-", True),  # ACR-NEMA form
        ("2500", "-23", False),  # invalid stored time
    ],
)
def test_time_ranges_compare_times_not_strings(stored: str, value: str, expected: bool) -> None:
    ds = raw((0x00080030, "TM", stored.encode()))

    assert matches(ds, key("StudyTime", value)) is expected


def test_time_key_from_the_query_parser() -> None:
    query = parse_qido(Level.STUDY, [("StudyTime", "09:00-09:30")])

    assert matches(dataset(StudyTime="0930"), query.matches[0]) is True
    assert matches(dataset(StudyTime="093100"), query.matches[0]) is False


@pytest.mark.parametrize(
    ("stored", "value", "expected"),
    [
        ("20240105103000", "20240105-20240106", True),
        ("20240105103000", "2024-2025", True),
        ("20240105103000", "202401051031-", False),
        ("20240105103000", "-2023", False),
        ("20240105103000", "2024", True),  # single value at year precision
        # Offsets: the same instant written in two zones.
        ("20240105103000+0100", "20240105093000+0000", True),
        ("20240105103000+0100", "20240105043000-0500", True),
        ("20240105103000+0100", "20240105103000+0000", False),
        # "-0500" is an offset here, not a range to the year 500.
        ("20240105103000-0500", "20240105103000-0500", True),
        ("20240105153000+0000", "20240105-0500-20240105103000-0500", True),
        ("20240105153100+0000", "20240105-0500-20240105103000-0500", False),
        # Without an offset on one side, wall-clock times are compared.
        ("20240105103000", "20240105103000+0900", True),
    ],
)
def test_datetime_ranges_and_offsets(stored: str, value: str, expected: bool) -> None:
    ds = raw((0x0040A120, "DT", stored.encode()))

    assert matches(ds, key("DateTime", value)) is expected


def test_datetime_without_offset_takes_the_answer_timezone() -> None:
    ds = raw((0x00080201, "SH", b"+0100"), (0x0040A120, "DT", b"20240105103000"))

    assert matches(ds, key("DateTime", "20240105093000+0000")) is True
    assert matches(ds, key("DateTime", "20240105103000+0000")) is False


# -- Sequences (C.2.2.2.6) -------------------------------------------------------------------


def _request(*step_ids: str | None) -> Dataset:
    items = []
    for step_id in step_ids:
        item = Dataset()
        item.RequestedProcedureID = "RP"
        if step_id is not None:
            item.ScheduledProcedureStepID = step_id
        items.append(item)
    ds = Dataset()
    ds.RequestAttributesSequence = Sequence(items)
    return roundtrip(ds)


def test_sequence_key_matches_if_any_item_matches() -> None:
    spsid = "RequestAttributesSequence.ScheduledProcedureStepID"

    assert matches(_request("A", "B"), key(spsid, "B")) is True
    assert matches(_request("A", "B"), key(spsid, "C")) is False
    assert matches(_request(None, "B"), key(spsid, "B*")) is True
    assert matches(_request(None, ""), key(spsid, "B")) is False
    # No item has the attribute, or there is no sequence: cannot be judged.
    assert matches(_request(None, None), key(spsid, "B")) is None
    assert matches(Dataset(), key(spsid, "B")) is None
    # An empty sequence is an empty value.
    assert matches(_request(), key(spsid, "B")) is False


def test_sequence_item_inherits_the_character_set() -> None:
    item = Dataset()
    item.ScheduledProcedureStepID = "Größe"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.RequestAttributesSequence = Sequence([item])

    answer = roundtrip(ds, implicit=True)

    assert matches(answer, key("RequestAttributesSequence.ScheduledProcedureStepID", "Gr??e"))


# -- Robustness ------------------------------------------------------------------------------


def test_unreadable_values_do_not_raise() -> None:
    ds = raw(
        (0x00200010, "SH", b"\xff\xfe"),  # not ASCII: decoded with replacement characters
        (0x00081032, "SQ", b"\x01\x02\x03"),  # not a sequence encoding
    )

    assert matches(ds, key("StudyID", "1")) is False
    assert matches(ds, key("ProcedureCodeSequence.CodeValue", "X")) is None


def test_matching_leaves_the_answer_unconverted() -> None:
    ds = roundtrip(dataset(PatientName="Doe^John", StudyDate="20240105"))

    matches_all(ds, [key("PatientName", "doe*"), key("StudyDate", "2024-")])

    assert all(isinstance(elem, RawDataElement) for _, elem in ds.items())


_STORED_TIMES = (
    "08",
    "0800",
    "080000",
    "120000",
    "1200",
    "133834",
    "133834.250000",
    "163000",
    "1630",
    "163059.9",
)


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        ("-1630", "-163059.999999"),
        ("1630-", "16-"),
        ("1630", "16-163059.999999"),
        ("133834", "13-133834.999999"),
        ("133834.25", "13-133834.259999"),
        ("08-12", "08-125959.999999"),
        ("0800-1200", "08-120059.999999"),
        ("-133834.250000", "-133834.250000"),
    ],
)
def test_time_key_for_pacs_loses_nothing_to_string_comparison(value: str, sent: str) -> None:
    """A PACS comparing TM strings (Orthanc) must return every time the gateway's
    matcher then accepts: ``-1630`` as sent missed ``163000``."""
    assert time_key_for_pacs(value) == sent
    low, _, high = sent.partition("-")
    for stored in _STORED_TIMES:
        if matches(dataset(StudyTime=stored), key("StudyTime", value)):
            assert low <= stored and (not high or stored <= high), stored
