"""Property-based tests of the DICOM JSON encoder (PS3.18 Annex F) on generated data sets.

For valid data ``dataset_to_json`` never raises and leaves nothing out but what
F.2 excludes (group lengths, File Meta, SpecificCharacterSet); keys are sorted
8-digit uppercase hex; the output is strict JSON; and a data set gives the
same JSON whether its elements are pydicom values (built in code) or raw bytes
(as a C-FIND answer or a received file holds them).
"""

from __future__ import annotations

import json
import logging
import re
from io import BytesIO
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from app.dicomweb.json import dataset_to_json, dumps

# caplog is cleared for every example.
PROPERTY = settings(
    max_examples=200,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

_TAGS_BY_VR: dict[str, list[int]] = {}
for _tag, _entry in DicomDictionary.items():
    if _tag >> 16 not in (0x0000, 0x0002, 0xFFFE) and _tag & 0xFFFF and _tag != 0x00080005:
        _TAGS_BY_VR.setdefault(_entry[0], []).append(_tag)
for _tags in _TAGS_BY_VR.values():
    _tags.sort()

# -- valid values per VR (PS3.5 Table 6.2-1) ---------------------------------------------------

_printable = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp"))


def _text(max_size: int, *, backslash: bool = False) -> st.SearchStrategy[str]:
    chars = _printable if backslash else _printable.filter(lambda c: c != "\\")
    # Leading/trailing spaces are padding (F.2.5 values carry none); inner ones are kept.
    return st.text(chars, max_size=max_size).map(str.strip).filter(bool)


_uid = (
    st.lists(st.integers(0, 10**9), min_size=2, max_size=8)
    .map(lambda parts: ".".join(map(str, parts)))
    .filter(lambda uid: len(uid) <= 64)
)
_components = st.lists(
    st.text(_printable.filter(lambda c: c not in "\\^="), max_size=10).map(str.strip),
    min_size=1,
    max_size=5,
)
_pn = st.lists(_components.map("^".join), min_size=1, max_size=3).map(
    lambda groups: "=".join(groups).rstrip("=^")
)

SINGLE: dict[str, st.SearchStrategy[Any]] = {
    "AE": st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", min_size=1, max_size=16),
    "AS": st.tuples(st.integers(0, 999), st.sampled_from("DWMY")).map(
        lambda a: f"{a[0]:03d}{a[1]}"
    ),
    "CS": st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", min_size=1, max_size=16),
    # %Y does not pad years before 1000.
    "DA": st.dates().map(lambda d: f"{d.year:04d}{d:%m%d}"),
    "TM": st.times().map(lambda t: f"{t:%H%M%S}"),
    "DT": st.datetimes().map(lambda d: f"{d.year:04d}{d:%m%d%H%M%S}"),
    "DS": st.one_of(
        st.integers(-(10**9), 10**9).map(str),
        st.floats(-1e6, 1e6, allow_nan=False).map(lambda f: f"{f:.6g}"),
        st.sampled_from(["1.50", "0.1", "-0", "1e3", "+2.5", "00012"]),
    ),
    "IS": st.integers(-(2**31), 2**31 - 1).map(str) | st.sampled_from(["+7", "007", "-0"]),
    "LO": _text(64),
    "SH": _text(16),
    "PN": _pn.filter(bool),
    "LT": _text(200, backslash=True),
    "ST": _text(200, backslash=True),
    "UT": _text(200, backslash=True),
    "UC": _text(100),
    "UR": st.sampled_from(["http://example.org/a", "urn:oid:1.2.3"]),
    "UI": _uid,
    "US": st.integers(0, 2**16 - 1),
    "SS": st.integers(-(2**15), 2**15 - 1),
    "UL": st.integers(0, 2**32 - 1),
    "SL": st.integers(-(2**31), 2**31 - 1),
    "SV": st.integers(-(2**63), 2**63 - 1),
    "UV": st.integers(0, 2**64 - 1),
    "FL": st.floats(width=32),
    "FD": st.floats(),
    "AT": st.integers(0, 0xFFFFFFFF),
}
_MULTI = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI"}
_MULTI |= {"US", "SS", "UL", "SL", "SV", "UV", "FL", "FD", "AT"}
# Word sizes; OB values too have an even length once encoded (PS3.5 7.1.1).
_BINARY = {"OB": 2, "OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _value(vr: str) -> st.SearchStrategy[Any]:
    if vr in _BINARY:
        size = _BINARY[vr]
        return st.binary(max_size=64).map(lambda b: b[: len(b) // size * size]).filter(bool)
    single = SINGLE[vr]
    if vr in _MULTI:
        return st.one_of(single, st.lists(single, min_size=2, max_size=4))
    return single


@st.composite
def datasets(draw: st.DrawFn, depth: int = 0) -> Dataset:
    ds = Dataset()
    vrs = sorted(set(SINGLE) | set(_BINARY) | ({"SQ"} if depth < 2 else set()))
    for vr in draw(st.lists(st.sampled_from(vrs), max_size=8 if depth == 0 else 3)):
        tag = draw(st.sampled_from(_TAGS_BY_VR[vr]))
        if tag in ds:
            continue
        if vr == "SQ":
            items = draw(st.lists(datasets(depth + 1), max_size=2))
            ds.add_new(tag, vr, Sequence(items))
        elif draw(st.booleans()) and vr not in _BINARY:
            ds.add_new(tag, vr, None)  # zero-length
        else:
            ds.add_new(tag, vr, draw(_value(vr)))
    return ds


def _with_utf8(ds: Dataset) -> Dataset:
    ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _raw(ds: Dataset) -> Dataset:
    """The data set as bytes read back: unconverted elements, as the network gives them."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = False
    fp.is_little_endian = True
    write_dataset(fp, ds)
    return read_dataset(BytesIO(fp.getvalue()), False, True)


_KEY = re.compile(r"[0-9A-F]{8}")


def _check_object(obj: dict[str, Any]) -> None:
    keys = list(obj)
    assert keys == sorted(keys)
    for key in keys:
        assert _KEY.fullmatch(key), key
        tag = int(key, 16)
        assert tag & 0xFFFF, f"group length {key}"
        assert tag >> 16 not in (0x0000, 0x0002), key
        assert tag != 0x00080005
        attr = obj[key]
        assert set(attr) <= {"vr", "Value", "InlineBinary", "BulkDataURI"}
        if attr["vr"] == "SQ":
            for item in attr.get("Value", []):
                _check_object(item)


def _expected_keys(ds: Dataset) -> set[str]:
    return {
        f"{tag:08X}"
        for tag in (int(elem.tag) for elem in ds)
        if tag & 0xFFFF and tag >> 16 not in (0x0000, 0x0002) and tag != 0x00080005
    }


@PROPERTY
@given(ds=datasets().map(_with_utf8))
def test_valid_data_sets_encode_whole_sorted_and_as_strict_json(
    ds: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.dicomweb.json"):
        caplog.clear()
        obj = dataset_to_json(ds)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    _check_object(obj)
    assert set(obj) == _expected_keys(ds)
    # allow_nan=False: FL/FD NaN and infinities must already be strings.
    assert json.loads(dumps([obj])) == [obj]


@PROPERTY
@given(ds=datasets().map(_with_utf8))
def test_raw_and_converted_elements_give_the_same_json(ds: Dataset) -> None:
    assert dataset_to_json(_raw(ds)) == dataset_to_json(ds)


@PROPERTY
@given(ds=datasets(), extra=st.sampled_from([0x00080000, 0x00100000, 0x00020000]))
def test_group_lengths_and_meta_are_left_out(ds: Dataset, extra: int) -> None:
    ds.add_new(extra, "UL", 100)
    ds.add_new(0x00020010, "UI", "1.2.840.10008.1.2.1")
    ds.SpecificCharacterSet = "ISO_IR 192"
    obj = dataset_to_json(ds)
    _check_object(obj)
    assert set(obj) == _expected_keys(ds)
