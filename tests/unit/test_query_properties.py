"""Property-based tests of the QIDO-RS parser and the C-FIND Identifier built from it.

Whatever a client sends, ``parse_qido`` either returns a query whose every key
is a valid C-FIND matching key for its VR (PS3.4 C.2.2.2, PS3.5 Table 6.2-1),
or raises InvalidQuery naming a parameter the client sent. Never another
exception, never a hang (Hypothesis' per-example deadline and pytest-timeout).
"""

from __future__ import annotations

import re
from datetime import date, time
from decimal import Decimal
from io import BytesIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import DicomDictionary, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as PydicomSequence

from app.dicomweb.attributes import Level, keyword, vr_of
from app.dicomweb.query import MatchKey, QidoQuery, parse_qido, valid_uid
from app.dimse.identifiers import build_identifier
from app.errors import InvalidQuery

# Some examples build and encode an Identifier; a loaded 2-core machine is slow.
PROPERTY = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E

# -- attribute IDs -----------------------------------------------------------------------------

_PUBLIC = sorted(t for t in DicomDictionary if not t >> 16 & 1)
_KEYWORDS = sorted(kw for t in _PUBLIC if (kw := keyword_for_tag(t)))
_SEQUENCES = sorted(
    kw for t in _PUBLIC if DicomDictionary[t][0] == "SQ" and (kw := keyword_for_tag(t))
)
# What viewers actually send (CONFORMANCE-NOTES §1.6), so the interesting VRs come often.
_QIDO_KEYS = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "StudyInstanceUID",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "AcquisitionDateTime",
    "SliceThickness",
    "FrameIncrementPointer",
    "Rows",
    "PixelData",
    "QueryRetrieveLevel",
    "RequestAttributesSequence.ScheduledProcedureStepID",
    "RequestAttributesSequence.RequestedProcedureID",
    "ReferencedSOPSequence.ReferencedSOPInstanceUID",
]

hex_tags = st.one_of(
    st.sampled_from(_PUBLIC).map(lambda t: f"{t:08X}"),
    st.sampled_from(_PUBLIC).map(lambda t: f"{t:08x}"),
    st.integers(0, 0xFFFFFFFF).map(lambda t: f"{t:08X}"),
)
attribute_ids = st.one_of(
    st.sampled_from(_QIDO_KEYS),
    st.sampled_from(_KEYWORDS),
    hex_tags,
    st.tuples(st.sampled_from(_SEQUENCES), st.sampled_from(_KEYWORDS)).map(".".join),
    st.lists(st.sampled_from(_QIDO_KEYS), min_size=2, max_size=3).map(".".join),
    st.text(max_size=20),
)

# -- values ------------------------------------------------------------------------------------

digits = st.text("0123456789", min_size=1, max_size=14)
dates = st.dates(date(1, 1, 1), date(9999, 12, 31)).map(lambda d: f"{d:%Y%m%d}")
times = st.times().map(lambda t: t.strftime("%H%M%S.%f")[: st_len(t)]) | st.sampled_from(
    ["09", "0930", "093000", "09:30:00", "24", "2360", "235960"]
)


def st_len(t: time) -> int:
    # Any of the precisions TM allows: HH, HHMM, HHMMSS, HHMMSS.F to .FFFFFF.
    return (2, 4, 6, 8, 13)[t.microsecond % 5]


def ranges(single: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    ends = st.one_of(st.just(""), single)
    return st.one_of(single, st.tuples(ends, ends).map("-".join))


uids = st.one_of(
    st.lists(st.integers(0, 10**12), min_size=1, max_size=12).map(
        lambda parts: ".".join(map(str, parts))
    ),
    st.text("0123456789.", min_size=1, max_size=70),
    st.sampled_from(["1.2.840.10008.5.1.4.1.1.2", "1.02.3", "../../etc/passwd", "1.2.3\n"]),
)
uid_lists = st.lists(uids, min_size=1, max_size=4).flatmap(
    lambda parts: st.sampled_from([",", "\\", ", "]).map(lambda sep: sep.join(parts))
)
wildcards = st.text(
    st.one_of(st.sampled_from("*?^=.- "), st.characters(codec="utf-8")), max_size=70
)
numbers = st.one_of(
    st.integers().map(str),
    st.floats().map(repr),
    st.decimals(allow_nan=True).map(str),
    st.sampled_from(["1_000", "+12", "\uff11\uff12", "\u0663", "1e5", ".5", "5."]),
)
values = st.one_of(
    st.just(""),
    dates,
    ranges(dates),
    ranges(times),
    ranges(st.one_of(dates, digits)),
    uid_lists,
    wildcards,
    numbers,
    st.text(max_size=200),
    st.text(st.characters(min_codepoint=0x100), min_size=1, max_size=5),
    st.text(max_size=5).map(lambda s: s * 300),
)
booleans = st.sampled_from(["true", "false", "TRUE", "1", "0", "yes", "no", "", "maybe"])
includefields = st.lists(
    st.one_of(attribute_ids, st.sampled_from(["all", "ALL", " ", ""])), max_size=4
).map(",".join)

control = st.one_of(
    st.tuples(st.sampled_from(["limit", "offset", "LIMIT", " offset "]), numbers | digits),
    st.tuples(st.sampled_from(["includefield", "IncludeField"]), includefields),
    st.tuples(
        st.sampled_from(["fuzzymatching", "emptyvaluematching", "multiplevaluematching"]),
        booleans,
    ),
    st.tuples(st.sampled_from(["accept", "charset"]), st.text(max_size=30)),
)
parameters = st.lists(st.one_of(st.tuples(attribute_ids, values), control), max_size=8)
path_uids = st.fixed_dictionaries({}, optional={STUDY_UID: uids, SERIES_UID: uids})


# -- what a valid key looks like, from the standard ----------------------------------------------

_DA = r"[0-9]{8}"
_TM = r"[0-9]{2}(?:[0-9]{2}(?:[0-9]{2}(?:\.[0-9]{1,6})?)?)?"
_DT = r"[0-9]{4}(?:[0-9]{2}){0,5}(?:\.[0-9]{1,6})?(?:[+-][0-9]{4})?"
_MAX = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "DS": 16, "IS": 12}
_MATCHABLE = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "SQ", "ST"}
_MATCHABLE |= {"TM", "UC", "UI", "UR", "UT"}


def _single_or_range(single: str, value: str) -> bool:
    return re.fullmatch(f"(?:{single})?-?(?:{single})?", value) is not None and value != "-"


def assert_valid_key(key: MatchKey) -> None:
    """The key's value is one a C-FIND SCP can take for its VR (PS3.5 Table 6.2-1,
    PS3.4 C.2.2.2): zero-length, or a single value, a wild card pattern for the
    text VRs, a range for DA/TM/DT, a list for UI."""
    vr, value = key.vr, key.value
    assert vr in _MATCHABLE, key
    assert vr == vr_of(key.path[-1])
    if vr == "SQ":
        assert value == ""
    if not value:
        return
    allowed_controls = "\t\n\f\r" if vr in ("LT", "ST", "UT") else ""
    assert all(c in allowed_controls or (c >= " " and c != "\x7f") for c in value), key
    assert value == value.strip(), key
    if vr not in ("LO", "LT", "PN", "SH", "ST", "UC", "UT"):
        # The default repertoire only (PS3.5 6.1.2.3): the rest cannot even be encoded.
        assert value.isascii(), key
    if vr == "UI":
        assert all(valid_uid(uid) for uid in value.split("\\")), key
        return
    assert "\\" not in value, key
    if vr == "DA":
        assert _single_or_range(_DA, value), key
    elif vr == "TM":
        assert _single_or_range(_TM, value), key
    elif vr == "DT":
        assert re.fullmatch(f"(?:{_DT})?-?(?:{_DT})?", value), key
    elif vr == "IS":
        assert re.fullmatch(r"[+-]?[0-9]+", value) and -(2**31) <= int(value) < 2**31, key
    elif vr == "DS":
        assert re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", value), key
        assert Decimal(value).is_finite()
    elif vr == "AS":
        assert re.fullmatch(r"[0-9]{3}[DWMY]", value), key
    if vr == "PN":
        groups = value.split("=")
        assert len(groups) <= 3 and all(len(g) <= 64 for g in groups), key
    elif vr in _MAX:
        assert len(value) <= _MAX[vr], key
    assert len(value) <= 1024, key


def _encode(ds: Dataset, implicit: bool) -> Dataset:
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = True
    write_dataset(fp, ds)
    return read_dataset(BytesIO(fp.getvalue()), implicit, True)


def _key_value(ds: Dataset, key: MatchKey) -> str:
    elem = ds[key.path[0]]
    if len(key.path) == 2:
        elem = elem.value[0][key.path[1]]
    raw = elem.value
    if raw is None or isinstance(raw, PydicomSequence):
        text = ""  # an empty value, or a nested sequence (empty: a return key)
    elif isinstance(raw, bytes):
        text = raw.decode("utf-8")
    elif isinstance(raw, MultiValue):
        # Not str(): that is a Python list's repr, and a value of 0 is not empty.
        text = "\\".join(str(v) for v in raw)
    else:
        text = str(raw)
    return text.rstrip(" \x00")


# -- properties --------------------------------------------------------------------------------


@PROPERTY
@given(
    level=st.sampled_from(list(Level)),
    params=parameters,
    uids_in_path=path_uids,
    study_root=st.booleans(),
)
def test_parser_returns_a_valid_query_or_names_the_parameter(
    level: Level, params: list[tuple[str, str]], uids_in_path: dict[int, str], study_root: bool
) -> None:
    try:
        query = parse_qido(level, params, path_uids=uids_in_path, study_root=study_root)
    except InvalidQuery as exc:
        named = {name.strip() for name, _ in params} | {keyword(t) for t in uids_in_path}
        assert exc.parameter in named
        assert repr(exc.parameter) in exc.message
        return
    assert isinstance(query, QidoQuery)
    for key in query.matches:
        assert_valid_key(key)
    assert query.limit is None or query.limit >= 0
    assert query.offset >= 0
    for tag in query.includefields:
        assert tag >> 16 not in (0x0000, 0x0002, 0xFFFE) and tag & 0xFFFF


@PROPERTY
@given(level=st.sampled_from(list(Level)), params=parameters, implicit=st.booleans())
def test_identifier_from_a_parsed_query_encodes_and_reads_back_the_keys(
    level: Level, params: list[tuple[str, str]], implicit: bool
) -> None:
    """Parsed -> Identifier -> bytes -> Identifier keeps every key value as the
    parser made it, and pydicom finds nothing to warn about (warnings are errors)."""
    try:
        query = parse_qido(level, params)
    except InvalidQuery:
        return
    identifier = build_identifier(level, query.matches, query.return_tags(level))
    back = _encode(identifier, implicit)
    assert back.QueryRetrieveLevel == level.value
    if any(not key.value.isascii() for key in query.matches):
        assert back.SpecificCharacterSet == "ISO_IR 192"
    for key in query.matches:
        assert _key_value(back, key) == key.value
        assert_valid_key(key)


@PROPERTY
@given(level=st.sampled_from(list(Level)), params=parameters)
def test_parsing_the_parsed_keys_again_changes_nothing(
    level: Level, params: list[tuple[str, str]]
) -> None:
    """The parser's output form is a fixed point: the keys, written back as QIDO
    parameters (tags in hex, UID lists with commas), parse to the same keys."""
    try:
        query = parse_qido(level, params)
    except InvalidQuery:
        return
    again = parse_qido(
        level,
        [
            (".".join(f"{t:08X}" for t in key.path), key.value.replace("\\", ","))
            for key in query.matches
        ],
    )
    assert [(k.path, k.vr, k.value, k.level) for k in again.matches] == [
        (k.path, k.vr, k.value, k.level) for k in query.matches
    ]


@PROPERTY
@given(name=attribute_ids, value=values)
def test_refusals_name_the_parameter_even_for_hostile_names(name: str, value: str) -> None:
    try:
        parse_qido(Level.IMAGE, [(name, value), ("includefield", name)])
    except InvalidQuery as exc:
        assert exc.parameter in (name.strip(), "includefield")


# -- regression tests for what the properties found ---------------------------------------------


def test_uid_with_a_trailing_newline_is_not_valid() -> None:
    # "$" matched before a final "\n": /studies/1.2.3%0A reached the PACS and the cache.
    assert not valid_uid("1.2.3\n")
    assert valid_uid("1.2.3")


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        # Non-ASCII digits matched "\d": they reached the PACS as IS and DA keys.
        ("SeriesNumber", "\u0661\u0662", "not a valid IS number"),
        ("StudyDate", "\uff12\uff10\uff12\uff10\uff10\uff11\uff10\uff11", "not a valid DA"),
        # Longer than PS3.5 Table 6.2-1 allows: invalid in an Identifier.
        ("PatientID", "x" * 65, "64 characters"),
        ("AccessionNumber", "x" * 17, "16 characters"),
        ("SeriesNumber", "+000000000012", "12 characters"),
        ("SeriesNumber", "99999999999", "out of the range"),
        ("SliceThickness", "1" * 17, "16 characters"),
        ("PatientName", "a=b=c=d", "three component groups"),
        ("PatientName", "x" * 65 + "=y", "longer than 64"),
        ("PatientAge", "45 years", "age"),
        ("PatientName", "Doe\x00", "control characters"),
        ("StudyDescription", "a\nb", "control characters"),
        # An AT key went to the PACS as text that is no tag.
        ("FrameIncrementPointer", "abc", "VR AT"),
        # pydicom cannot encode a CS beyond Latin-1: the C-FIND failed with a 500.
        ("Modality", "\U000e899d", "ASCII characters only"),
        ("Modality", "\u00c9*", "ASCII characters only"),
    ],
)
def test_keys_invalid_for_their_vr_are_refused(name: str, value: str, fragment: str) -> None:
    with pytest.raises(InvalidQuery) as info:
        parse_qido(Level.IMAGE, [(name, value)])
    assert info.value.parameter == name
    assert fragment in info.value.message


@pytest.mark.parametrize("tag", ["00000002", "00020010", "00020000", "FFFEE000"])
@pytest.mark.parametrize("as_include", [False, True])
def test_command_and_file_meta_elements_are_not_keys(tag: str, as_include: bool) -> None:
    params = [("includefield", tag)] if as_include else [(tag, "")]
    with pytest.raises(InvalidQuery) as info:
        parse_qido(Level.IMAGE, params)
    assert "not a data set attribute" in info.value.message


def test_wild_card_keys_build_an_identifier_without_pydicom_warnings() -> None:
    # pydicom's CS grammar has no "*": Modality=C* warned (an error under pytest).
    query = parse_qido(Level.SERIES, [("Modality", "C*"), ("SeriesDescription", "?x*")])
    identifier = build_identifier(Level.SERIES, query.matches, query.return_tags(Level.SERIES))
    assert identifier.Modality == "C*"
    assert identifier.SeriesDescription == "?x*"


def test_includefield_errors_name_includefield() -> None:
    with pytest.raises(InvalidQuery) as info:
        parse_qido(Level.STUDY, [("includefield", "StudyDate,NoSuchThing")])
    assert info.value.parameter == "includefield"
    assert "NoSuchThing" in info.value.message
