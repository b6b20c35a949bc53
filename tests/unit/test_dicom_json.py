"""DICOM JSON encoder, checked against PS3.18 Annex F (not against pydicom's to_json)."""

from __future__ import annotations

import base64
import json
import logging
import struct
from io import BytesIO
from typing import Any

import pytest
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from app.dicomweb.json import dataset_to_json, dumps


def roundtrip(ds: Dataset, *, implicit: bool = False, little: bool = True) -> Dataset:
    """Write *ds* to bytes and read it back, as a C-FIND response identifier arrives."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    write_dataset(fp, ds)
    return read_dataset(BytesIO(fp.getvalue()), implicit, little)


def raw_dataset(*elements: tuple[int, str | None, bytes], little: bool = True) -> Dataset:
    """A data set of unconverted elements, holding values pydicom would refuse to write."""
    raw: dict[BaseTag, DataElement | RawDataElement] = {
        Tag(tag): RawDataElement(Tag(tag), vr, len(value), value, 0, vr is None, little)
        for tag, vr, value in elements
    }
    return Dataset(raw)


def value_of(obj: dict[str, Any], key: str) -> list[Any]:
    values: list[Any] = obj[key]["Value"]
    return values


# -- F.2.2: names, order, what is left out ---------------------------------------------------


def test_keys_are_uppercase_hex_in_ascending_order() -> None:
    ds = Dataset()
    ds.PatientID = "P1"
    ds.StudyInstanceUID = "1.2.3"
    ds.AccessionNumber = "A1"
    ds.add_new(0x0009100A, "LO", "private")  # lower-case hex would be "0009100a"
    ds.Modality = "CT"

    out = dataset_to_json(roundtrip(ds))

    assert list(out) == sorted(out)
    assert list(out) == ["00080050", "00080060", "0009100A", "00100020", "0020000D"]


def test_group_lengths_file_meta_command_and_character_set_are_left_out() -> None:
    ds = raw_dataset(
        (0x00000000, "UL", struct.pack("<I", 4)),
        (0x00000900, "US", struct.pack("<H", 0)),
        (0x00020010, "UI", b"1.2.840.10008.1.2.1\x00"),
        (0x00080000, "UL", struct.pack("<I", 10)),
        (0x00080005, "CS", b"ISO_IR 100"),
        (0x00090000, "UL", struct.pack("<I", 10)),
        (0x00100010, "PN", b"Doe^John"),
    )

    assert list(dataset_to_json(ds)) == ["00100010"]


def test_tags_restricts_top_level_only() -> None:
    item = Dataset()
    item.CodeValue = "X"
    item.CodeMeaning = "meaning"
    ds = Dataset()
    ds.PatientID = "P1"
    ds.PatientName = "Doe"
    ds.ProcedureCodeSequence = Sequence([item])

    out = dataset_to_json(roundtrip(ds), tags={0x00100020, 0x00081032, 0x00200010})

    assert list(out) == ["00081032", "00100020"]
    assert list(value_of(out, "00081032")[0]) == ["00080100", "00080104"]


# -- PN (F.2.2) and character sets (F.2, PS3.5 6.1) ------------------------------------------


def test_person_name_groups_are_named_and_empty_groups_left_out() -> None:
    ds = raw_dataset(
        (0x00100010, "PN", b"Doe^John^^Dr"),
        (0x00081060, "PN", b"=Ideo^Only\\Smith"),
        (0x00080090, "PN", b"Doe^John==Phon^Only "),
    )

    out = dataset_to_json(ds)

    assert value_of(out, "00100010") == [{"Alphabetic": "Doe^John^^Dr"}]
    # No "Alphabetic": "" for an empty first group (pydicom's to_json emits one).
    assert value_of(out, "00081060") == [{"Ideographic": "Ideo^Only"}, {"Alphabetic": "Smith"}]
    assert value_of(out, "00080090") == [{"Alphabetic": "Doe^John", "Phonetic": "Phon^Only"}]


def test_japanese_iso_2022_ir_87_person_name_after_round_trip() -> None:
    # PS3.5 H.3.1's example, with kanji whose JIS X 0208 codes contain the
    # bytes 0x3D '=', 0x5C '\' and 0x5E '^': a decoder that splits the bytes
    # before decoding them cuts those characters in half.
    name = "Yamada^Tarou=山田予^太郎俑五=やまだ^たろう"
    assert b"=" in "予".encode("iso2022_jp")[3:5]
    assert b"\\" in "俑".encode("iso2022_jp")[3:5]
    assert b"^" in "五".encode("iso2022_jp")[3:5]
    ds = Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = name
    ds.ReferringPhysicianName = [name, "Doe^J"]
    ds.StudyDescription = "俑検査"

    for implicit in (False, True):
        out = dataset_to_json(roundtrip(ds, implicit=implicit))

        japanese = {
            "Alphabetic": "Yamada^Tarou",
            "Ideographic": "山田予^太郎俑五",
            "Phonetic": "やまだ^たろう",
        }
        assert value_of(out, "00100010") == [japanese]
        assert value_of(out, "00080090") == [japanese, {"Alphabetic": "Doe^J"}]
        assert value_of(out, "00081030") == ["俑検査"]
        assert "00080005" not in out


def test_latin1_data_set_is_decoded_after_a_round_trip() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    ds.StudyDescription = "Thorax ä ö ü ß"
    item = Dataset()  # no SpecificCharacterSet of its own: inherits ISO_IR 100
    item.CodeMeaning = "Hüfte"
    ds.ProcedureCodeSequence = Sequence([item])

    read = roundtrip(ds)
    assert b"M\xfcller" in read.get_item(0x00100010).value  # stored as Latin-1 bytes

    out = dataset_to_json(read)
    assert value_of(out, "00100010") == [{"Alphabetic": "Müller^Jürgen"}]
    assert value_of(out, "00081030") == ["Thorax ä ö ü ß"]
    assert value_of(value_of(out, "00081032")[0], "00080104") == ["Hüfte"]
    body = dumps([out])
    assert "Müller".encode() in body  # UTF-8 on the wire, not \u escapes


def test_utf8_data_set_and_sequence_item_with_its_own_character_set() -> None:
    item = Dataset()
    item.SpecificCharacterSet = "ISO_IR 100"
    item.CodeMeaning = "Hüfte"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Ωμέγα^Δέλτα"
    ds.ProcedureCodeSequence = Sequence([item])

    out = dataset_to_json(roundtrip(ds))

    assert value_of(out, "00100010") == [{"Alphabetic": "Ωμέγα^Δέλτα"}]
    nested = value_of(out, "00081032")[0]
    assert value_of(nested, "00080104") == ["Hüfte"]
    assert "00080005" not in nested


def test_bytes_invalid_in_the_declared_character_set_are_replaced_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ds = raw_dataset(
        (0x00080005, "CS", b"ISO_IR 192"),
        (0x00100010, "PN", b"M\xfcller^J"),  # Latin-1 bytes in a UTF-8 data set
    )

    with caplog.at_level(logging.WARNING, logger="app.dicomweb.json"):
        out = dataset_to_json(ds)

    assert value_of(out, "00100010") == [{"Alphabetic": "M\ufffdller^J"}]
    assert "not valid" in caplog.text


def test_unknown_character_set_falls_back_to_the_default_repertoire() -> None:
    ds = raw_dataset(
        (0x00080005, "CS", b"ISO_IR 999"),
        (0x00100020, "LO", b"P1"),
    )

    assert value_of(dataset_to_json(ds), "00100020") == ["P1"]


# -- IS and DS (Table F.2.3-1) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (b"12", 12),
        (b" +007 ", 7),
        (b"-3", -3),
        (b"1.5 ", "1.5"),  # pydicom's to_json gives 1
        (b"abc ", "abc"),
        (b"1_000", "1_000"),  # int() accepts it, DICOM does not
        (b"123456789012345678", "123456789012345678"),  # beyond 2**53: kept exact
    ],
)
def test_integer_string(stored: bytes, expected: object) -> None:
    out = dataset_to_json(raw_dataset((0x00200013, "IS", stored)))

    assert value_of(out, "00200013") == [expected]


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (b"0.1 ", 0.1),
        (b"72.5", 72.5),
        (b"12", 12),
        (b"-0.5e-3", -0.0005),
        (b"1E3 ", 1000.0),
        (b".5", 0.5),
        (b"NaN ", "NaN"),  # pydicom's to_json gives a bare NaN: invalid JSON
        (b"inf ", "inf"),
        (b"1e999", "1e999"),
        (b"0.10000000000000000001", "0.10000000000000000001"),  # a double loses it
        (b"1,5 ", "1,5"),
    ],
)
def test_decimal_string(stored: bytes, expected: object) -> None:
    out = dataset_to_json(raw_dataset((0x00180050, "DS", stored)))

    assert value_of(out, "00180050") == [expected]
    assert type(value_of(out, "00180050")[0]) is type(expected)
    dumps([out])  # always valid JSON


def test_converted_decimal_and_integer_strings_keep_their_original_text() -> None:
    ds = Dataset()
    ds.PixelSpacing = ["0.5", "0.50"]
    ds.InstanceNumber = "007"
    ds.SliceThickness = 1 / 3

    out = dataset_to_json(ds)

    assert value_of(out, "00280030") == [0.5, 0.5]
    assert value_of(out, "00200013") == [7]
    assert value_of(out, "00180050") == [1 / 3]


# -- Empty values (F.2.5) --------------------------------------------------------------------


def test_zero_length_attributes_keep_only_their_vr() -> None:
    ds = raw_dataset(
        (0x00080050, "SH", b""),
        (0x00100010, "PN", b""),
        (0x00100030, "DA", b"  "),
        (0x00201208, "IS", b""),
        (0x00280010, "US", b""),
        (0x00081032, "SQ", b""),
        (0x7FE00010, "OB", b""),
    )

    out = dataset_to_json(ds)

    assert out == {
        "00080050": {"vr": "SH"},
        "00081032": {"vr": "SQ"},
        "00100010": {"vr": "PN"},
        "00100030": {"vr": "DA"},
        "00201208": {"vr": "IS"},
        "00280010": {"vr": "US"},
        "7FE00010": {"vr": "OB"},
    }


def test_empty_values_inside_a_multi_valued_attribute_are_null() -> None:
    ds = raw_dataset(
        (0x00080061, "CS", b"CT\\\\MR"),
        (0x00281050, "DS", b"40\\\\1.5 "),
        (0x00081060, "PN", b"Doe^J\\\\Roe^R"),
    )

    out = dataset_to_json(ds)

    assert value_of(out, "00080061") == ["CT", None, "MR"]
    assert value_of(out, "00281050") == [40, None, 1.5]
    assert value_of(out, "00081060") == [{"Alphabetic": "Doe^J"}, None, {"Alphabetic": "Roe^R"}]


def test_padding_is_removed_but_significant_spaces_are_kept() -> None:
    ds = raw_dataset(
        (0x0020000D, "UI", b"1.2.3\x00"),
        (0x00100020, "LO", b" P1 "),  # LO: leading spaces insignificant
        (0x00204000, "LT", b"  indented\\text "),  # LT: leading spaces and \ are text
    )

    out = dataset_to_json(ds)

    assert value_of(out, "0020000D") == ["1.2.3"]
    assert value_of(out, "00100020") == ["P1"]
    assert value_of(out, "00204000") == ["  indented\\text"]


# -- Sequences (F.2.2) -----------------------------------------------------------------------


def test_sequence_items_are_objects_and_an_empty_item_is_an_empty_object() -> None:
    inner = Dataset()
    inner.CodeValue = "T-D4000"
    code = Dataset()
    code.CodeValue = "X"
    code.AnatomicRegionSequence = Sequence([inner])
    ds = Dataset()
    ds.ProcedureCodeSequence = Sequence([code, Dataset()])
    ds.OtherPatientIDsSequence = Sequence([])

    for implicit in (False, True):
        out = dataset_to_json(roundtrip(ds, implicit=implicit))

        assert out["00081032"]["vr"] == "SQ"
        first, second = value_of(out, "00081032")
        assert second == {}
        assert value_of(first, "00080100") == ["X"]
        assert value_of(first, "00082218") == [{"00080100": {"vr": "SH", "Value": ["T-D4000"]}}]
        assert out["00101002"] == {"vr": "SQ"}


# -- Binary VRs: BulkDataURI (F.2.6) and InlineBinary (F.2.7) --------------------------------


def _binary_dataset() -> Dataset:
    item = Dataset()
    item.EncapsulatedDocument = b"%PDF"
    ds = Dataset()
    ds.Rows = 2
    ds.BitsAllocated = 16
    ds.ProcedureCodeSequence = Sequence([Dataset(), item])
    ds.add_new(0x7FE00010, "OW", b"\x01\x00\x02\x00\x03\x00\x04\x00")
    return roundtrip(ds)


def test_binary_values_are_inline_base64_without_a_bulk_data_handler() -> None:
    out = dataset_to_json(_binary_dataset())

    pixels = b"\x01\x00\x02\x00\x03\x00\x04\x00"
    assert out["7FE00010"] == {"vr": "OW", "InlineBinary": base64.b64encode(pixels).decode()}
    nested = value_of(out, "00081032")[1]["00420011"]
    assert nested == {"vr": "OB", "InlineBinary": base64.b64encode(b"%PDF").decode()}
    assert value_of(out, "00280010") == [2]  # numbers are never bulk data here


def test_bulk_data_uri_is_asked_for_with_the_element_path() -> None:
    asked: list[tuple[int, ...]] = []

    def uri(path: tuple[int, ...]) -> str | None:
        asked.append(path)
        return "https://gw/studies/1/bulk/" + "/".join(f"{p:X}" for p in path)

    out = dataset_to_json(_binary_dataset(), bulk_data_uri=uri, inline_threshold=1 << 20)

    assert sorted(asked) == [(0x00081032, 1, 0x00420011), (0x7FE00010,)]
    assert out["7FE00010"] == {"vr": "OW", "BulkDataURI": "https://gw/studies/1/bulk/7FE00010"}
    assert set(value_of(out, "00081032")[1]["00420011"]) == {"vr", "BulkDataURI"}


def test_small_values_are_inlined_when_the_handler_has_no_uri(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.dicomweb.json"):
        out = dataset_to_json(
            _binary_dataset(), bulk_data_uri=lambda path: None, inline_threshold=4
        )

    # 4 bytes fit under the threshold; the 8-byte Pixel Data neither fits nor has a URI.
    assert "InlineBinary" in value_of(out, "00081032")[1]["00420011"]
    assert "7FE00010" not in out
    assert "(7FE0,0010) left out" in caplog.text


def test_big_endian_words_are_sent_little_endian() -> None:
    ds = raw_dataset(
        (0x00280010, "US", b"\x01\x02"),
        (0x7FE00010, "OW", b"\x00\x01\x00\x02"),
        little=False,
    )

    out = dataset_to_json(ds)

    assert value_of(out, "00280010") == [0x0102]
    assert base64.b64decode(out["7FE00010"]["InlineBinary"]) == b"\x01\x00\x02\x00"


# -- Ambiguous VRs ---------------------------------------------------------------------------


@pytest.mark.parametrize(("pixel_representation", "vr", "value"), [(0, "US", 65534), (1, "SS", -2)])
def test_us_or_ss_follows_pixel_representation_after_an_implicit_vr_read(
    pixel_representation: int, vr: str, value: int
) -> None:
    ds = raw_dataset(
        (0x00280100, None, struct.pack("<H", 16)),
        (0x00280103, None, struct.pack("<H", pixel_representation)),
        (0x00280106, None, b"\xfe\xff"),  # SmallestImagePixelValue: "US or SS"
        (0x7FE00010, None, b"\x00\x00"),  # PixelData: "OB or OW"
    )

    out = dataset_to_json(ds)

    assert out["00280106"] == {"vr": vr, "Value": [value]}
    assert out["7FE00010"]["vr"] == "OW"  # implicit VR pixel data is OW (PS3.5 A.1)
    assert " or " not in json.dumps(out)


def test_ambiguous_vr_of_elements_built_in_code() -> None:
    ds = Dataset()
    ds.BitsAllocated = 8
    ds.PixelRepresentation = 1
    ds.add(DataElement(0x00280106, "US or SS", b"\xfe\xff"))
    ds.add(DataElement(0x7FE00010, "OB or OW", b"\x01\x02"))

    out = dataset_to_json(ds)

    assert out["00280106"] == {"vr": "SS", "Value": [-2]}
    assert out["7FE00010"]["vr"] == "OB"  # 8 bits allocated (PS3.5 A.2)


# -- Other VRs -------------------------------------------------------------------------------


def test_binary_numbers_tags_and_non_finite_floats() -> None:
    ds = raw_dataset(
        (0x00280010, "US", struct.pack("<2H", 512, 7)),
        (0x00189219, "FD", struct.pack("<3d", 1.5, float("nan"), float("-inf"))),
        (0x00186028, "FD", struct.pack("<d", float("inf"))),
        (0x00280009, "AT", struct.pack("<4H", 0x0018, 0x1063, 0x0018, 0x1065)),
        (0x00720082, "SV", struct.pack("<2q", -(2**62), 42)),
    )

    out = dataset_to_json(ds)

    assert value_of(out, "00280010") == [512, 7]
    assert value_of(out, "00189219") == [1.5, "NaN", "-Infinity"]
    assert value_of(out, "00186028") == ["Infinity"]
    assert value_of(out, "00280009") == ["00181063", "00181065"]
    assert value_of(out, "00720082") == [str(-(2**62)), 42]  # beyond 2**53: a string
    json.loads(dumps([out]))


def test_private_tags_keep_their_vr_and_unknown_ones_are_un() -> None:
    explicit = Dataset()
    block = explicit.private_block(0x0011, "ACME 1.0", create=True)
    block.add_new(0x01, "SH", "private value")
    explicit_out = dataset_to_json(roundtrip(explicit))
    implicit_out = dataset_to_json(roundtrip(explicit, implicit=True))

    assert explicit_out["00111001"] == {"vr": "SH", "Value": ["private value"]}
    assert explicit_out["00110010"] == {"vr": "LO", "Value": ["ACME 1.0"]}
    assert implicit_out["00110010"] == {"vr": "LO", "Value": ["ACME 1.0"]}
    # pydicom does not know "ACME 1.0", so the implicit VR element stays UN.
    assert implicit_out["00111001"]["vr"] == "UN"
    assert base64.b64decode(implicit_out["00111001"]["InlineBinary"]) == b"private value "


def test_public_attribute_sent_as_un_is_read_with_its_dictionary_vr() -> None:
    ds = raw_dataset((0x00100010, "UN", b"Doe^John"), (0x00280010, "UN", b"\x00\x02"))

    out = dataset_to_json(ds)

    assert out["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}
    assert out["00280010"] == {"vr": "US", "Value": [512]}
    # UN content is Implicit VR Little Endian even inside a big endian data set (PS3.5 6.2.2).
    big = raw_dataset((0x00280010, "UN", b"\x00\x02"), little=False)
    assert dataset_to_json(big)["00280010"] == {"vr": "US", "Value": [512]}


# -- Invalid values never raise --------------------------------------------------------------


def test_undecodable_elements_are_left_out_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    ds = raw_dataset(
        (0x00100020, "LO", b"P1"),
        (0x00280010, "US", b"\x01"),  # one byte: no US value
        (0x00280009, "AT", b"\x18\x00"),
        (0x00081032, "SQ", b"\x01\x02\x03"),  # not a sequence encoding
        (0x00100030, "DA", b"not a date"),  # kept: the string is what the PACS sent
    )

    with caplog.at_level(logging.WARNING, logger="app.dicomweb.json"):
        out = dataset_to_json(ds)

    assert value_of(out, "00100020") == ["P1"]
    assert value_of(out, "00100030") == ["not a date"]
    assert "00280010" not in out
    assert "00280009" not in out
    assert "(0028,0010) left out" in caplog.text
    assert "\\x01" not in caplog.text  # values stay out of WARNING lines


# -- dumps -----------------------------------------------------------------------------------


def test_dumps_is_compact_utf8_and_refuses_nan() -> None:
    body = dumps([{"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller"}]}}])

    assert body == '[{"00100010":{"vr":"PN","Value":[{"Alphabetic":"Müller"}]}}]'.encode()
    with pytest.raises(ValueError):
        dumps([{"00189219": {"vr": "FD", "Value": [float("nan")]}}])
