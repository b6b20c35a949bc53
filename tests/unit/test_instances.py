"""WADO-RS representations of cached files: transcoding, frames, metadata, bulk data.

Checked against real scanner files (one MR image in nine transfer syntaxes,
enhanced multi-frame MR) and small generated data sets; "right" means what
pydicom decodes from the original file.
"""

from __future__ import annotations

import io
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended, get_frame
from pydicom.pixels.encoders.base import JPEGLSLosslessEncoder, RLELosslessEncoder
from pydicom.pixels.utils import pack_bits
from pydicom.sequence import Sequence
from pydicom.uid import (
    MPEG2MPML,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from app.dicomweb.instances import (
    BULK_DATA_THRESHOLD,
    bulkdata,
    frames,
    metadata,
    pixel_data_info,
    stored_transfer_syntax,
    transcode,
)
from app.errors import NotAcceptable, NotFound

EVRLE = "1.2.840.10008.1.2.1"
JPEG_2000 = "1.2.840.10008.1.2.4.90"
PIXEL_DATA = 0x7FE00010
CSA_IMAGE_HEADER = 0x00291010  # Siemens CSA header blob, OB, several KB

TESTDATA_ENV = "DIMSE_GATEWAY_TESTDATA"
DEFAULT_TESTDATA = Path(__file__).resolve().parents[2].parent / "shared" / "testdata"


def _testdata_root() -> Path:
    override = os.environ.get(TESTDATA_ENV)
    return Path(override).expanduser().resolve() if override else DEFAULT_TESTDATA


@pytest.fixture(scope="module")
def testdata() -> Path:
    root = _testdata_root()
    if not (root / "dcm_qa_ts" / "In").is_dir():
        message = f"test data not found at {root}; set {TESTDATA_ENV} to the testdata folder"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI has the data: its absence is a broken set-up
        pytest.skip(message)
    return root


# dcm_qa_ts/README.md: the same 384x384 MR image, stored nine ways.
TS_FILES = {
    "1.dcm": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "2.dcm": "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "3.dcm": "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "4.dcm": "1.2.840.10008.1.2.5",  # RLE Lossless
    "5.dcm": "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1 (dcmcjpeg)
    "6.dcm": "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1 (gdcmconv)
    "7.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless (gdcmconv)
    "8.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless (dcmcjpls)
    "9.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
}
ENCAPSULATED = [name for name, ts in TS_FILES.items() if UID(ts).is_encapsulated]
NOT_FOR_DICOMWEB = ["2.dcm", "3.dcm"]  # implicit VR, big endian (PS3.18 §8.7.3.5.2)
CODESTREAM_START = {
    "1.2.840.10008.1.2.5": b"\x02\x00\x00\x00",  # RLE header: 2 segments (16-bit)
    "1.2.840.10008.1.2.4.70": b"\xff\xd8",  # SOI
    "1.2.840.10008.1.2.4.80": b"\xff\xd8",  # SOI
    "1.2.840.10008.1.2.4.90": b"\xff\x4f",  # J2K SOC
}


@pytest.fixture(scope="module")
def reference_pixels(testdata: Path) -> bytes:
    """The image as pydicom decodes it from the uncompressed original, little endian."""
    arr = dcmread(testdata / "dcm_qa_ts" / "In" / "1.dcm").pixel_array
    return bytes(arr.astype("<u2").tobytes())


def ts_path(testdata: Path, name: str) -> Path:
    return testdata / "dcm_qa_ts" / "In" / name


def uri(path: tuple[int, ...]) -> str:
    return "https://gw/bulk/" + "/".join(
        f"{t:08X}" if i % 2 == 0 else str(t) for i, t in enumerate(path)
    )


def read(data: bytes | Path) -> FileDataset:
    return dcmread(io.BytesIO(data) if isinstance(data, bytes) else data)


# -- transcode: the nine transfer syntaxes ----------------------------------------------------


@pytest.mark.parametrize("name", list(TS_FILES))
def test_stored_transfer_syntax_reads_the_file_meta(testdata: Path, name: str) -> None:
    assert stored_transfer_syntax(ts_path(testdata, name)) == TS_FILES[name]


@pytest.mark.parametrize("name", list(TS_FILES))
def test_default_target_is_explicit_vr_little_endian_with_every_value_kept(
    testdata: Path, name: str
) -> None:
    path = ts_path(testdata, name)
    original = dcmread(path)

    for target in (None, EVRLE):
        result = transcode(path, target)

        if name == "1.dcm":
            assert result == path  # already Explicit VR Little Endian: stream the file
            continue
        assert isinstance(result, bytes)
        assert result[128:132] == b"DICM"
        out = read(result)
        assert out.file_meta.TransferSyntaxUID == EVRLE
        assert out.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        # Every pixel as pydicom decodes the original (lossless syntaxes only here).
        assert np.array_equal(out.pixel_array, original.pixel_array)
        assert out["PixelData"].VR == "OW"
        # Every other attribute, VR and value, including the Siemens private ones.
        for elem in original:
            if elem.tag == PIXEL_DATA:
                continue
            copy = out[elem.tag]
            assert (copy.VR, copy.value) == (elem.VR, elem.value), elem.tag


@pytest.mark.parametrize("name", [n for n in TS_FILES if n not in NOT_FOR_DICOMWEB])
def test_any_syntax_is_the_stored_file_itself(testdata: Path, name: str) -> None:
    path = ts_path(testdata, name)

    assert transcode(path, "*") == path


@pytest.mark.parametrize("name", NOT_FOR_DICOMWEB)
def test_any_syntax_still_reencodes_implicit_vr_and_big_endian(testdata: Path, name: str) -> None:
    # PS3.18 §8.7.3.5.2: these two shall not be used, even when the client takes any.
    result = transcode(ts_path(testdata, name), "*")

    assert isinstance(result, bytes)
    assert read(result).file_meta.TransferSyntaxUID == EVRLE


@pytest.mark.parametrize("name", ENCAPSULATED)
def test_asking_for_the_stored_syntax_gives_the_stored_file(testdata: Path, name: str) -> None:
    path = ts_path(testdata, name)

    assert transcode(path, TS_FILES[name]) == path


@pytest.mark.parametrize("name", ["1.dcm", "2.dcm", "7.dcm"])
def test_a_syntax_we_cannot_produce_is_not_acceptable_naming_the_stored_one(
    testdata: Path, name: str
) -> None:
    with pytest.raises(NotAcceptable, match=f"stored as {TS_FILES[name]} ") as caught:
        transcode(ts_path(testdata, name), JPEG_2000)

    assert JPEG_2000 in caught.value.message


# -- frames: the nine transfer syntaxes -------------------------------------------------------


@pytest.mark.parametrize("name", list(TS_FILES))
def test_default_frames_are_raw_little_endian(
    testdata: Path, name: str, reference_pixels: bytes
) -> None:
    path = ts_path(testdata, name)

    assert frames(path, [1], None) == [reference_pixels]
    assert frames(path, [1], EVRLE) == [reference_pixels]
    assert pixel_data_info(path).delivered_syntax(None) == EVRLE


@pytest.mark.parametrize("name", list(TS_FILES))
def test_any_syntax_frames_are_the_stored_codestream(
    testdata: Path, name: str, reference_pixels: bytes
) -> None:
    path = ts_path(testdata, name)
    info = pixel_data_info(path)

    [frame] = frames(path, [1], "*")

    assert info.transfer_syntax == TS_FILES[name]
    assert info.number_of_frames == 1
    if name not in ENCAPSULATED:
        # Uncompressed frames are always little endian octets (§8.7.3.3.1).
        assert not info.encapsulated
        assert frame == reference_pixels
        assert info.delivered_syntax("*") == EVRLE
        return
    assert info.encapsulated
    assert info.delivered_syntax("*") == TS_FILES[name]
    # The bare codestream: no item tag or length in front (§8.7.3.3.2).
    assert frame.startswith(CODESTREAM_START[TS_FILES[name]])
    assert frame == get_frame(dcmread(path).PixelData, 0, number_of_frames=1)
    assert frames(path, [1], TS_FILES[name]) == [frame]


@pytest.mark.parametrize("name", ["1.dcm", "3.dcm", "7.dcm"])
@pytest.mark.parametrize("number", [0, 2, -1])
def test_a_frame_beyond_the_image_is_not_found(testdata: Path, name: str, number: int) -> None:
    with pytest.raises(NotFound, match=f"frame {number} does not exist: the instance has 1 frame$"):
        frames(ts_path(testdata, name), [1, number], None)


def test_frames_in_a_syntax_we_cannot_produce_are_not_acceptable(testdata: Path) -> None:
    with pytest.raises(NotAcceptable, match=re.escape("stored as 1.2.840.10008.1.2.4.80 ")):
        frames(ts_path(testdata, "7.dcm"), [1], JPEG_2000)
    with pytest.raises(NotAcceptable, match=re.escape("stored as 1.2.840.10008.1.2.1 ")):
        frames(ts_path(testdata, "1.dcm"), [1], JPEG_2000)


# -- metadata and bulk data: the nine transfer syntaxes ------------------------------------------


@pytest.mark.parametrize("name", list(TS_FILES))
def test_metadata_has_bulk_data_uris_and_no_file_meta(testdata: Path, name: str) -> None:
    path = ts_path(testdata, name)

    meta = metadata(path, uri)

    assert not [key for key in meta if key.startswith("0002")]
    assert meta["7FE00010"] == {
        "vr": "OB" if name in ENCAPSULATED else "OW",
        "BulkDataURI": "https://gw/bulk/7FE00010",
    }
    # The Siemens CSA blobs are bulk data too, with the VR of pydicom's private
    # dictionary where the file is implicit VR.
    assert meta["00291010"] == {"vr": "OB", "BulkDataURI": "https://gw/bulk/00291010"}
    assert meta["00291020"] == {"vr": "OB", "BulkDataURI": "https://gw/bulk/00291020"}


def test_metadata_is_the_same_whatever_the_transfer_syntax(testdata: Path) -> None:
    reference = metadata(ts_path(testdata, "1.dcm"), uri)
    # Differences by construction of the test data (README): a new SOP Instance
    # UID and series number per file; pixel data VR; for the implicit VR file
    # the VR of four Siemens private elements comes from pydicom's dictionary.
    allowed = {"00080018", "00200011", "7FE00010"}

    for name in TS_FILES:
        meta = metadata(ts_path(testdata, name), uri)
        differing = {
            key for key in reference.keys() | meta.keys() if reference.get(key) != meta.get(key)
        }
        extra = differing - allowed
        if name == "2.dcm":
            assert extra == {"0051100A", "0051100B", "0051100C", "0051100E"}
            assert all(meta[k]["Value"] == reference[k]["Value"] for k in extra)
        elif name == "5.dcm":
            # dcmcjpeg added the lossy/derivation attributes of a compressed copy.
            assert extra == {"00082111", "00089215"}
        else:
            assert extra == set(), name


@pytest.mark.parametrize("name", list(TS_FILES))
def test_bulk_data_values_are_the_attribute_values(
    testdata: Path, name: str, reference_pixels: bytes
) -> None:
    path = ts_path(testdata, name)
    original = dcmread(path)

    assert bulkdata(path, (CSA_IMAGE_HEADER,)) == original[CSA_IMAGE_HEADER].value
    # Pixel data is the uncompressed value, decoded when stored compressed.
    assert bulkdata(path, (PIXEL_DATA,)) == reference_pixels


def test_bulk_data_paths_that_lead_nowhere_are_not_found(testdata: Path) -> None:
    path = ts_path(testdata, "1.dcm")

    with pytest.raises(NotFound, match=r"\(0029,1030\)"):
        bulkdata(path, (0x00291030,))
    with pytest.raises(NotFound, match=r"\(0008,1140\)\[9\]"):
        bulkdata(path, (0x00081140, 9, 0x00081150))
    with pytest.raises(NotFound, match="is a sequence"):
        bulkdata(path, (0x00081140,))
    with pytest.raises(NotFound, match="not an attribute path"):
        bulkdata(path, (0x00081140, 0))
    with pytest.raises(NotFound, match=re.escape("no (7FE0,0008)")):
        bulkdata(path, (0x7FE00008,))


# -- enhanced multi-frame (dcm_qa_enh) ---------------------------------------------------------


ENHANCED = ["Philips/IM_0027_fMAP.dcm", *(f"Siemens/XA10/6_{n}.dcm" for n in range(1, 5))]


@pytest.mark.parametrize("name", ENHANCED)
def test_enhanced_multiframe_frames(testdata: Path, name: str) -> None:
    path = testdata / "dcm_qa_enh" / "In" / name
    original = dcmread(path)
    pixels = original.pixel_array
    count = int(original.NumberOfFrames)
    info = pixel_data_info(path)

    assert info.number_of_frames == count == len(pixels)
    assert not info.encapsulated
    wanted = [1, 2, count // 2, count]
    expected = [pixels[n - 1].astype(pixels.dtype.newbyteorder("<")).tobytes() for n in wanted]
    assert frames(path, wanted, None) == expected
    assert frames(path, wanted, "*") == expected
    assert bulkdata(path, (PIXEL_DATA,)) == original.PixelData
    with pytest.raises(NotFound, match=f"frame {count + 1} does not exist"):
        frames(path, [count + 1], None)


@pytest.mark.parametrize("name", ENHANCED)
def test_enhanced_multiframe_metadata_keeps_the_functional_groups(
    testdata: Path, name: str
) -> None:
    path = testdata / "dcm_qa_enh" / "In" / name
    original = dcmread(path, stop_before_pixels=True)

    meta = metadata(path, uri)

    per_frame = meta["52009230"]["Value"]
    assert len(per_frame) == int(original.NumberOfFrames)
    assert meta["7FE00010"]["BulkDataURI"] == "https://gw/bulk/7FE00010"


# -- generated data sets ---------------------------------------------------------------------


def image(rows: int, columns: int, count: int, bits: int = 16) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Word SC
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Test^Generated"
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = count
    return ds


def save(ds: Dataset, folder: Path, syntax: str, name: str = "x.dcm") -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


RNG = np.random.default_rng(20240)
PIXELS = RNG.integers(0, 4096, (3, 5, 7), dtype=np.uint16)


def encode_frames(encoder: Any) -> list[bytes]:
    options = {
        "rows": 5,
        "columns": 7,
        "samples_per_pixel": 1,
        "bits_allocated": 16,
        "bits_stored": 16,
        "photometric_interpretation": "MONOCHROME2",
        "pixel_representation": 0,
        "number_of_frames": 1,
    }
    return [bytes(encoder.encode(frame, **options)) for frame in PIXELS]


RLE_FRAMES = encode_frames(RLELosslessEncoder)
JLS_FRAMES = encode_frames(JPEGLSLosslessEncoder)


def encapsulated(folder: Path, how: str) -> tuple[Path, list[bytes]]:
    ds = image(5, 7, 3)
    if how == "rle, empty offset table":
        syntax, codestreams = RLELossless, RLE_FRAMES
        ds.PixelData = encapsulate(codestreams, has_bot=False)
    elif how == "rle, basic offset table":
        syntax, codestreams = RLELossless, RLE_FRAMES
        ds.PixelData = encapsulate(codestreams, has_bot=True)
    elif how == "jpeg-ls, two fragments a frame, basic offset table":
        syntax, codestreams = JPEGLSLossless, JLS_FRAMES
        ds.PixelData = encapsulate(codestreams, fragments_per_frame=2, has_bot=True)
    elif how == "jpeg-ls, two fragments a frame, empty offset table":
        # Frame boundaries found from the JPEG-LS end-of-image markers.
        syntax, codestreams = JPEGLSLossless, JLS_FRAMES
        ds.PixelData = encapsulate(codestreams, fragments_per_frame=2, has_bot=False)
    else:
        syntax, codestreams = JPEGLSLossless, JLS_FRAMES
        data, offsets, lengths = encapsulate_extended(codestreams)
        ds.PixelData = data
        ds.ExtendedOffsetTable = offsets
        ds.ExtendedOffsetTableLengths = lengths
    ds["PixelData"].VR = "OB"
    return save(ds, folder, syntax), codestreams


ENCAPSULATIONS = [
    "rle, empty offset table",
    "rle, basic offset table",
    "jpeg-ls, two fragments a frame, basic offset table",
    "jpeg-ls, two fragments a frame, empty offset table",
    "jpeg-ls, extended offset table",
]


def same_codestream(got: bytes, encoded: bytes) -> bool:
    # Fragments are padded to an even length (PS3.5 A.4): one trailing NUL may follow.
    return got in (encoded, encoded + b"\x00")


@pytest.mark.parametrize("how", ENCAPSULATIONS)
def test_multiframe_encapsulated_frames(tmp_path: Path, how: str) -> None:
    path, codestreams = encapsulated(tmp_path, how)

    info = pixel_data_info(path)
    stored = frames(path, [3, 1, 2], "*")
    decoded = frames(path, [3, 1, 2, 3], None)

    assert (info.encapsulated, info.number_of_frames) == (True, 3)
    assert all(same_codestream(g, codestreams[n]) for g, n in zip(stored, [2, 0, 1], strict=True))
    assert decoded == [PIXELS[n].astype("<u2").tobytes() for n in (2, 0, 1, 2)]
    assert bulkdata(path, (PIXEL_DATA,)) == PIXELS.astype("<u2").tobytes()
    with pytest.raises(NotFound, match="frame 4 does not exist: the instance has 3 frames"):
        frames(path, [4], "*")


@pytest.mark.parametrize("how", ENCAPSULATIONS)
def test_multiframe_encapsulated_transcode(tmp_path: Path, how: str) -> None:
    path, _ = encapsulated(tmp_path, how)

    out = read(transcode(path, None))

    assert out.file_meta.TransferSyntaxUID == EVRLE
    assert out.NumberOfFrames == 3
    assert np.array_equal(out.pixel_array, PIXELS)
    # Offsets into encapsulated data have no meaning for native pixel data.
    assert "ExtendedOffsetTable" not in out
    assert "ExtendedOffsetTableLengths" not in out
    assert transcode(path, "*") == path


BITS = RNG.integers(0, 2, (3, 3, 5), dtype=np.uint8)  # 15 bits a frame: frames share bytes


def bit_image(folder: Path, syntax: str) -> Path:
    ds = image(3, 5, 3, bits=1)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.1"  # Multi-frame Single Bit SC
    ds.PixelData = pack_bits(BITS)
    return save(ds, folder, syntax)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_single_bit_frames_are_bit_packed_from_bit_zero(tmp_path: Path, syntax: str) -> None:
    # PS3.5 §8.1.1: frames follow each other bit by bit; each frame sent starts
    # at bit 0 of its first byte, its last byte padded with zero bits.
    path = bit_image(tmp_path, syntax)

    got = frames(path, [1, 2, 3], None)

    expected = [np.packbits(BITS[n].ravel(), bitorder="little").tobytes() for n in range(3)]
    assert got == expected
    assert [len(f) for f in got] == [2, 2, 2]
    assert bulkdata(path, (PIXEL_DATA,)) == pack_bits(BITS)


def test_single_bit_implicit_vr_transcodes_without_touching_the_bits(tmp_path: Path) -> None:
    path = bit_image(tmp_path, ImplicitVRLittleEndian)

    out = read(transcode(path, None))

    assert out["PixelData"].VR == "OB"
    assert np.array_equal(out.pixel_array, BITS)


GRAPHIC_DATA = 0x00700022
LONG_FLOATS = [float(n) / 4 for n in range(20_000)]  # 80000 bytes, exact in FL


def private_implicit(folder: Path) -> tuple[Path, Dataset]:
    ds = image(4, 4, 1)
    ds.PixelRepresentation = 1
    ds.PixelData = np.arange(-8, 8, dtype="<i2").tobytes()
    ds.add_new(0x00280106, "SS", -5)  # SmallestImagePixelValue: "US or SS"
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(CSA_IMAGE_HEADER, "OB", b"CSA" * 700)  # in pydicom's private dictionary
    ds.add_new(0x00110010, "LO", "ACME 1.0")
    ds.add_new(0x00111001, "OB", b"\x01\x02\x03\x04")  # unknown: UN
    ds.add_new(0x00111002, "OB", bytes(range(256)) * 300)  # unknown and long: UN
    # A value longer than a 16-bit length: implicit VR can hold it, explicit VR
    # only as UN (PS3.5 §6.2.2). GraphicData is FL, VM 2-n.
    ds.add_new(GRAPHIC_DATA, "FL", LONG_FLOATS)
    item = Dataset()
    item.ReferencedSOPInstanceUID = generate_uid()
    item.add_new(0x00090010, "LO", "ACME 1.0")
    item.add_new(0x00091001, "OB", b"\xab" * 3000)
    ds.ReferencedImageSequence = Sequence([Dataset(), item])
    icon = Dataset()
    icon.Rows = icon.Columns = 32
    icon.BitsAllocated = 8
    icon.PixelData = b"\x7f" * 1024
    ds.IconImageSequence = Sequence([icon])
    return save(ds, folder, ImplicitVRLittleEndian), ds


def test_implicit_vr_private_and_long_values_transcode(tmp_path: Path) -> None:
    path, source = private_implicit(tmp_path)

    data = transcode(path, None)

    assert isinstance(data, bytes)
    out = read(data)
    assert out["SmallestImagePixelValue"].VR == "SS"
    assert out.SmallestImagePixelValue == -5
    assert out[CSA_IMAGE_HEADER].VR == "OB"
    assert out[0x00111001].VR == "UN"
    assert out[0x00111001].value == b"\x01\x02\x03\x04"
    assert out[0x00111002].value == source[0x00111002].value
    # (0070,0022) FL became UN holding the little endian floats.
    assert b"\x70\x00\x22\x00UN\x00\x00" + struct.pack("<I", 4 * len(LONG_FLOATS)) in data
    assert out[GRAPHIC_DATA].VR == "UN"
    assert out[GRAPHIC_DATA].value == struct.pack(f"<{len(LONG_FLOATS)}f", *LONG_FLOATS)
    assert out.ReferencedImageSequence[1][0x00091001].value == b"\xab" * 3000
    assert out.IconImageSequence[0]["PixelData"].VR == "OB"  # 8 bits allocated
    assert np.array_equal(out.pixel_array, np.arange(-8, 8).reshape(4, 4))


def test_metadata_bulk_data_uris_in_sequences_and_by_size(tmp_path: Path) -> None:
    path, source = private_implicit(tmp_path)

    meta = metadata(path, uri)

    assert meta["00111001"] == {"vr": "UN", "InlineBinary": "AQIDBA=="}
    assert meta["00111002"] == {"vr": "UN", "BulkDataURI": "https://gw/bulk/00111002"}
    assert meta["00700022"] == {"vr": "FL", "Value": LONG_FLOATS}
    item = meta["00081140"]["Value"][1]
    assert item["00091001"] == {"vr": "UN", "BulkDataURI": "https://gw/bulk/00081140/1/00091001"}
    icon = meta["00880200"]["Value"][0]
    assert icon["7FE00010"]["BulkDataURI"] == "https://gw/bulk/00880200/0/7FE00010"
    assert bulkdata(path, (0x00081140, 1, 0x00091001)) == b"\xab" * 3000
    assert bulkdata(path, (0x00880200, 0, PIXEL_DATA)) == b"\x7f" * 1024
    assert bulkdata(path, (0x00111002,)) == source[0x00111002].value


def test_metadata_inlines_binary_values_up_to_the_threshold(tmp_path: Path) -> None:
    ds = image(2, 2, 1)
    ds.PixelData = bytes(8)
    ds.add_new(0x00091010, "OB", b"a" * BULK_DATA_THRESHOLD)
    ds.add_new(0x00091011, "OB", b"b" * (BULK_DATA_THRESHOLD + 2))
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    path = save(ds, tmp_path, ExplicitVRLittleEndian)

    meta = metadata(path, uri)

    assert "InlineBinary" in meta["00091010"]
    assert meta["00091011"] == {"vr": "OB", "BulkDataURI": "https://gw/bulk/00091011"}
    # Pixel data is bulk data however small.
    assert meta["7FE00010"] == {"vr": "OW", "BulkDataURI": "https://gw/bulk/7FE00010"}


def test_big_endian_values_come_out_little_endian(tmp_path: Path) -> None:
    ds = image(5, 7, 3)
    ds.PixelData = PIXELS.astype(">u2").tobytes()
    ds["PixelData"].VR = "OW"
    ds.add_new(0x00189087, "FD", 1000.5)  # DiffusionBValue
    ds.add_new(0x00700311, "OF", np.array([1.5, -2.0], dtype=">f4").tobytes())
    path = save(ds, tmp_path, ExplicitVRBigEndian)

    assert frames(path, [2], "*") == [PIXELS[1].astype("<u2").tobytes()]
    assert bulkdata(path, (PIXEL_DATA,)) == PIXELS.astype("<u2").tobytes()
    assert bulkdata(path, (0x00189087,)) == struct.pack("<d", 1000.5)
    assert bulkdata(path, (0x00700311,)) == struct.pack("<2f", 1.5, -2.0)
    out = read(transcode(path, None))
    assert np.array_equal(out.pixel_array, PIXELS)
    assert out[0x00700311].value == struct.pack("<2f", 1.5, -2.0)
    assert out.DiffusionBValue == 1000.5


def test_deflated_files(tmp_path: Path) -> None:
    ds = image(5, 7, 3)
    ds.PixelData = PIXELS.tobytes()
    ds.add_new(0x00091010, "OB", b"z" * 5000)
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    path = save(ds, tmp_path, DeflatedExplicitVRLittleEndian)

    assert transcode(path, "*") == path  # a syntax DICOMweb may use
    assert transcode(path, DeflatedExplicitVRLittleEndian) == path
    out = read(transcode(path, None))
    assert out.file_meta.TransferSyntaxUID == EVRLE
    assert np.array_equal(out.pixel_array, PIXELS)
    assert frames(path, [3], None) == [PIXELS[2].tobytes()]
    assert bulkdata(path, (0x00091010,)) == b"z" * 5000
    assert metadata(path, uri)["00091010"]["BulkDataURI"] == "https://gw/bulk/00091010"


def test_instances_without_pixel_data(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID = generate_uid()
    ds.ContentSequence = Sequence([Dataset()])
    path = save(ds, tmp_path, ExplicitVRLittleEndian)

    with pytest.raises(NotFound, match="no pixel data"):
        frames(path, [1], None)
    with pytest.raises(NotFound, match="no pixel data"):
        bulkdata(path, (PIXEL_DATA,))
    with pytest.raises(NotFound, match="no pixel data"):
        pixel_data_info(path)
    assert metadata(path, uri)["00080016"]["Value"] == [ds.SOPClassUID]
    assert transcode(path, None) == path


def test_a_syntax_without_a_decoder_is_sent_only_as_stored(tmp_path: Path) -> None:
    ds = image(8, 8, 1, bits=8)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])  # not really MPEG-2
    ds["PixelData"].VR = "OB"
    path = save(ds, tmp_path, MPEG2MPML)

    assert transcode(path, "*") == path
    assert frames(path, [1], "*") == [b"\x00\x00\x01\xb3" + bytes(60)]
    for call in (
        lambda: transcode(path, None),
        lambda: frames(path, [1], None),
        lambda: bulkdata(path, (PIXEL_DATA,)),
    ):
        with pytest.raises(NotAcceptable, match=f"stored as {MPEG2MPML} .*cannot decode"):
            call()


def test_files_without_a_part_10_header_are_reencoded(tmp_path: Path) -> None:
    # dcm_qa-style raw data sets: no preamble, no file meta.
    ds = image(5, 7, 1)
    ds.PixelData = PIXELS[0].tobytes()
    path = tmp_path / "raw.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True)

    assert stored_transfer_syntax(path) is None
    data = transcode(path, "*")
    assert isinstance(data, bytes)
    assert np.array_equal(read(data).pixel_array, PIXELS[0])


def test_a_file_replaced_under_the_same_path_is_read_anew(tmp_path: Path) -> None:
    # Frame requests remember where the pixel data lies; a new file is a new entry.
    ds = image(5, 7, 3)
    ds.PixelData = PIXELS.tobytes()
    path = save(ds, tmp_path, ExplicitVRLittleEndian)
    assert frames(path, [3], None) == [PIXELS[2].tobytes()]

    ds = image(5, 7, 2)
    ds.PixelData = PIXELS[::-1][:2].tobytes()
    save(ds, tmp_path, ExplicitVRLittleEndian, "new.dcm").replace(path)

    assert frames(path, [1], None) == [PIXELS[2].tobytes()]
    with pytest.raises(NotFound, match="frames 3, 4 do not exist: the instance has 2 frames"):
        frames(path, [1, 3, 4], None)
    path.unlink()
    with pytest.raises(NotFound, match="gone"):
        frames(path, [1], None)
    with pytest.raises(NotFound, match="gone"):
        transcode(path, None)


def test_an_instance_without_pixel_data_in_a_compressed_syntax_needs_no_decoding(
    tmp_path: Path,
) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection
    ds.SOPInstanceUID = generate_uid()
    path = save(ds, tmp_path, JPEGLSLossless)

    out = read(transcode(path, None))

    assert out.file_meta.TransferSyntaxUID == EVRLE
    assert out.SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize("name", ["1.dcm", "2.dcm", "7.dcm"])
def test_large_values_are_read_from_disk_only_when_asked_for(
    testdata: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pydicom's deferred read loads a whole value (all of the pixel data); the
    # frames, metadata and bulk data of one attribute must not need it.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a deferred value was loaded whole")

    monkeypatch.setattr("pydicom.filereader.read_deferred_data_element", refuse)
    path = ts_path(testdata, name)

    assert metadata(path, uri)["7FE00010"]["BulkDataURI"]
    assert len(frames(path, [1], "*")[0]) > 100_000
    assert len(bulkdata(path, (CSA_IMAGE_HEADER,))) > BULK_DATA_THRESHOLD


def test_colour_frames_decode_to_interleaved_rgb(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    options = {
        "rows": 4,
        "columns": 6,
        "samples_per_pixel": 3,
        "bits_allocated": 8,
        "bits_stored": 8,
        "photometric_interpretation": "RGB",
        "pixel_representation": 0,
        "planar_configuration": 0,
        "number_of_frames": 1,
    }
    ds = image(4, 6, 2, bits=8)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    # RLE stores colour planes apart; the attribute conventionally says so.
    ds.PlanarConfiguration = 1
    ds.PixelData = encapsulate([bytes(RLELosslessEncoder.encode(f, **options)) for f in rgb])
    ds["PixelData"].VR = "OB"
    path = save(ds, tmp_path, RLELossless)

    assert frames(path, [2], None) == [rgb[1].tobytes()]
    out = read(transcode(path, None))
    assert (out.PhotometricInterpretation, out.PlanarConfiguration) == ("RGB", 0)
    assert out["PixelData"].VR == "OB"
    assert np.array_equal(out.pixel_array, rgb)
