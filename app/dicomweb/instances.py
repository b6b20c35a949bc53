"""WADO-RS representations of cached Part 10 files (PS3.18 §8.7.3, §10.4).

Framework-free and blocking (file reads, decoding): call from a worker thread.

- ``transcode(path, target_ts)``: the instance in the negotiated transfer syntax,
  either the cached file itself (a ``Path`` to stream from disk) or the bytes
  of a new Part 10 file in Explicit VR Little Endian.
- ``frames(path, numbers, target_ts)``: pixel data of some frames, raw little
  endian or the stored codestreams (§8.7.3.3).
- ``metadata(path, bulk_uri)``: the DICOM JSON of the instance with bulk data
  replaced by ``BulkDataURI`` (§10.4.1.1.2, Annex F).
- ``bulkdata(path, tag_path)``: one bulk data value, little endian (§8.7.3.3.1).
- ``pixel_data_info(path)``: stored transfer syntax, frame count and encoding,
  for deciding 404/406 before a response starts and for labelling parts.

Transfer syntax arguments (*target_ts*) are what ``app.dicomweb.accept``
negotiated: ``None`` (no parameter: the default, Explicit VR Little Endian,
§8.7.3.4), ``"*"`` (any: no transcoding, §8.7.3.5.2) or a UID. Which transfer
syntax a result is in:

- ``transcode``: a ``Path`` is in the stored syntax (``stored_transfer_syntax``),
  ``bytes`` are Explicit VR Little Endian;
- ``frames`` and pixel ``bulkdata``: ``PixelDataInfo.delivered_syntax(target_ts)``.

A target that cannot be produced for this instance raises ``NotAcceptable``
naming the stored syntax; a missing frame, attribute or pixel data raises
``NotFound``.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, private_dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.pixels.utils import iter_pixels, pack_bits
from pydicom.uid import UID

from app.dicomweb.json import dataset_to_json, resolve_ambiguous_vr
from app.errors import NotAcceptable, NotFound

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
ANY_TRANSFER_SYNTAX = "*"

# Binary values above this size become BulkDataURIs in metadata; smaller ones
# are InlineBinary (PS3.18 F.2.6, F.2.7). pydicom's reader defers the same
# values, so metadata never loads pixel data or big private blobs.
BULK_DATA_THRESHOLD = 1024

# PS3.18 §8.7.3.5.2: not to be used in DICOMweb responses, so even "*" (no
# transcoding) re-encodes instances stored in them.
_NOT_FOR_DICOMWEB = frozenset({IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN})

_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = 0x7FE00008
_DOUBLE_FLOAT_PIXEL_DATA = 0x7FE00009
_PIXEL_TAGS = (_PIXEL_DATA, _FLOAT_PIXEL_DATA, _DOUBLE_FLOAT_PIXEL_DATA)
_EXTENDED_OFFSET_TABLE = 0x7FE00001
_EXTENDED_OFFSET_TABLE_LENGTHS = 0x7FE00002
_SPECIFIC_CHARACTER_SET = 0x00080005

_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
# PS3.5 Table 7.1-1: explicit VRs with a 32-bit length (after two reserved bytes).
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
# Largest even value a 16-bit length field holds; longer values of short VRs
# are written as UN (PS3.5 §6.2.2 note, PS3.18 §8.7.3.5.2).
_MAX_SHORT_LENGTH = 0xFFFE
# Bytes per value, for VRs whose byte order a big endian source reverses and
# whose length must be a whole number of values.
_WORD_SIZE = {
    "AT": 2,
    "US": 2,
    "SS": 2,
    "OW": 2,
    "UL": 4,
    "SL": 4,
    "FL": 4,
    "OF": 4,
    "OL": 4,
    "FD": 8,
    "OD": 8,
    "SV": 8,
    "UV": 8,
    "OV": 8,
}
_KNOWN_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC"}
    | {"UI", "UR", "UT", "SQ"}
    | _BINARY_VRS
    | set(_WORD_SIZE)
)
_PAD_WITH_NUL = frozenset({"UI", *_BINARY_VRS, *_WORD_SIZE})

_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


@dataclass(frozen=True, slots=True)
class PixelDataInfo:
    """How an instance holds its pixel data."""

    transfer_syntax: str  # the stored transfer syntax UID
    encapsulated: bool  # compressed (or encapsulated uncompressed) frames, PS3.5 A.4
    number_of_frames: int

    def delivered_syntax(self, target_ts: str | None) -> str:
        """The transfer syntax ``frames`` and pixel ``bulkdata`` deliver for *target_ts*.

        Encapsulated frames asked for as ``"*"`` or in their own syntax are sent
        as stored (§8.7.3.3.2); everything else is uncompressed little endian
        bytes, which is Explicit VR Little Endian (§8.7.3.3.1). Label each part
        ``application/octet-stream; transfer-syntax=<this>``: without the
        parameter cornerstone takes octet-stream as Implicit VR Little Endian.
        """
        if self.encapsulated and target_ts in (ANY_TRANSFER_SYNTAX, self.transfer_syntax):
            return self.transfer_syntax
        return EXPLICIT_VR_LITTLE_ENDIAN


def stored_transfer_syntax(path: Path) -> str | None:
    """The Transfer Syntax UID in the file meta of *path*; None without a Part 10 header."""
    try:
        meta = read_file_meta_info(path)
    except (InvalidDicomError, EOFError, struct.error, FileNotFoundError):
        return None
    uid = meta.get("TransferSyntaxUID")
    return str(uid) if uid else None


# -- transcode -------------------------------------------------------------------------------


def transcode(path: Path, target_ts: str | None) -> bytes | Path:
    """The instance at *path* in *target_ts* (PS3.18 §8.7.3.5.2, §8.7.3.4).

    - ``"*"``: the file as stored, returned as its ``Path``; except that files
      stored in Implicit VR Little Endian or Explicit VR Big Endian (which
      DICOMweb shall not use, §8.7.3.5.2) or without a Part 10 header are
      re-encoded as for Explicit VR Little Endian.
    - ``None`` or Explicit VR Little Endian: the ``Path`` when already stored
      so; otherwise the bytes of a new Part 10 file: implicit VR and big endian
      data sets re-encoded value by value (VRs from the data dictionaries, UN
      for unknown private elements, UN for values too long for a 16-bit length,
      PS3.5 §6.2.2), deflated ones inflated, compressed pixel data decoded
      (RLE, JPEG, JPEG-LS, JPEG 2000 with the pylibjpeg/pyjpegls plugins; YBR
      colour comes out as RGB). The SOP Instance UID is kept: the client asked
      for this instance.
    - Any other UID: the ``Path`` if it is the stored syntax, else
      ``NotAcceptable`` naming the stored syntax.

    Also ``NotAcceptable`` when the stored pixel data cannot be decoded here or
    is too large for Explicit VR Little Endian (§8.7.3.3).
    """
    stored = stored_transfer_syntax(path)
    dicomweb_ok = stored is not None and stored not in _NOT_FOR_DICOMWEB
    if target_ts == ANY_TRANSFER_SYNTAX and dicomweb_ok:
        return path
    target = EXPLICIT_VR_LITTLE_ENDIAN if target_ts in (None, ANY_TRANSFER_SYNTAX) else target_ts
    if target == stored and dicomweb_ok:
        return path
    if target != EXPLICIT_VR_LITTLE_ENDIAN:
        raise NotAcceptable(
            f"the instance is stored as {_syntax_name(stored)} and cannot be delivered "
            f"in transfer syntax {target}; available: {EXPLICIT_VR_LITTLE_ENDIAN} "
            f"(Explicit VR Little Endian) or * (as stored)"
        )
    ds = _read(path)
    syntax = _syntax_of(ds)
    if UID(syntax).is_encapsulated and _PIXEL_DATA in ds:
        # (Without pixel data, an instance in a compressed syntax is plain
        # explicit VR little endian: nothing to decode.)
        _decompress(ds, syntax)
    return _encode_part10(ds)


def _read(path: Path, *, defer: bool = False) -> FileDataset:
    """Read *path*; with *defer*, values above BULK_DATA_THRESHOLD stay on disk.

    Deferred values are read back from the file at their offset, which in a
    deflated file is an offset into the inflated stream: those are read whole.
    """
    try:
        ds = dcmread(path, force=True, defer_size=BULK_DATA_THRESHOLD if defer else None)
    except FileNotFoundError as exc:
        # Evicted from the cache between look-up and read.
        raise NotFound("the cached instance is gone") from exc
    except (InvalidDicomError, EOFError, struct.error) as exc:
        raise NotFound(f"the cached instance cannot be read: {exc}") from exc
    if defer and _syntax_of(ds) == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        ds = dcmread(path, force=True)
    return ds


def _syntax_of(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return str(uid)
    # No file meta: the reader guessed the encoding from the first elements.
    implicit, little = ds.original_encoding
    if implicit:
        return IMPLICIT_VR_LITTLE_ENDIAN
    return EXPLICIT_VR_LITTLE_ENDIAN if little else EXPLICIT_VR_BIG_ENDIAN


def _syntax_name(uid: str | None) -> str:
    if uid is None:
        return "an unknown transfer syntax (no Part 10 header)"
    name = UID(uid).name
    return f"{uid} ({name})" if name != uid else uid


def _decoder_for(syntax: str) -> Decoder:
    """pydicom's decoder for *syntax*, or NotAcceptable when none is usable here."""
    decoder: Decoder | None
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        raise NotAcceptable(
            f"the instance is stored as {_syntax_name(syntax)}, which the gateway cannot "
            f"decode; ask for transfer-syntax=* to receive it as stored"
        )
    return decoder


def _decompress(ds: FileDataset, syntax: str) -> None:
    """Decode encapsulated pixel data in place, as pydicom's ``decompress`` does,
    keeping the SOP Instance UID and bit-packing single-bit frames (PS3.5 §8.1.1)."""
    decoder = _decoder_for(syntax)
    arrays: list[np.ndarray[Any, Any]] = []
    image_pixel: dict[str, Any] = {}
    try:
        for arr, pixel_attributes in decoder.iter_array(ds, as_rgb=True):
            arrays.append(arr)
            image_pixel = pixel_attributes
    except Exception as exc:
        raise NotAcceptable(
            f"the pixel data stored as {_syntax_name(syntax)} could not be decoded: {exc}"
        ) from exc
    bits = int(ds.BitsAllocated)
    data = _native_bytes(arrays, bits)
    if len(data) >= 0xFFFFFFFE:
        # PS3.18 §8.7.3.3: too large for Explicit VR Little Endian → 406.
        raise NotAcceptable(
            f"the decompressed pixel data ({len(data)} bytes) does not fit in Explicit VR "
            f"Little Endian; ask for transfer-syntax=* to receive {_syntax_name(syntax)}"
        )
    if len(data) % 2:
        data += b"\x00"
    ds.add_new(_PIXEL_DATA, "OB" if bits <= 8 else "OW", data)
    for tag in (_EXTENDED_OFFSET_TABLE, _EXTENDED_OFFSET_TABLE_LENGTHS):
        # Offsets into encapsulated data mean nothing for native pixel data.
        if tag in ds:
            del ds[tag]
    ds.PhotometricInterpretation = image_pixel["photometric_interpretation"]
    if int(image_pixel["samples_per_pixel"]) > 1:
        ds.PlanarConfiguration = int(image_pixel["planar_configuration"])
    if "NumberOfFrames" in ds or len(arrays) > 1:
        ds.NumberOfFrames = len(arrays)
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)


def _native_bytes(arrays: Sequence[np.ndarray[Any, Any]], bits_allocated: int) -> bytes:
    """Decoded frames as native little endian pixel data (PS3.5 §8.1.1, §8.2)."""
    if not arrays:
        return b""
    if bits_allocated == 1:
        # Single-bit frames follow each other without padding between them.
        return pack_bits(np.concatenate([a.ravel() for a in arrays]), pad=False)
    parts = []
    for arr in arrays:
        little = arr.dtype.newbyteorder("<")
        parts.append(arr.astype(little, copy=False).tobytes())
    return b"".join(parts)


# -- Explicit VR Little Endian encoder -------------------------------------------------------


def _encode_part10(ds: FileDataset) -> bytes:
    """A Part 10 file of *ds* in Explicit VR Little Endian (PS3.10 §7.1, PS3.5 §7.1.2).

    Raw elements are written from their bytes: little endian values are copied
    as they are, big endian ones byte-swapped by VR. Values are not decoded, so
    nothing is re-formatted and nothing warns. Sequences and items get
    undefined lengths; group lengths are left out (PS3.5 §7.2).
    """
    meta = deepcopy(ds.file_meta) if getattr(ds, "file_meta", None) else FileMetaDataset()
    meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
    if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    head = DicomBytesIO()
    head.is_little_endian = True
    head.is_implicit_VR = False
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    chunks = [head.getvalue()]
    _Writer(chunks).dataset(ds, (), ["ISO_IR 6"])
    return b"".join(chunks)


class _Writer:
    __slots__ = ("chunks",)

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def dataset(self, ds: Dataset, ancestors: tuple[Dataset, ...], charset: list[str]) -> None:
        charset = _charset_of(ds, charset)
        for key in sorted(ds.keys()):
            tag = int(key)
            # No command or file meta elements in a data set; group lengths
            # would be wrong after re-encoding and are retired (PS3.5 §7.2).
            if tag < 0x00030000 or not tag & 0xFFFF:
                continue
            elem: DataElement | RawDataElement = ds.get_item(key)
            if isinstance(elem, RawDataElement):
                self.raw(tag, elem, ds, ancestors, charset)
            else:
                self.converted(tag, elem, ds, ancestors, charset)

    def raw(
        self,
        tag: int,
        elem: RawDataElement,
        ds: Dataset,
        ancestors: tuple[Dataset, ...],
        charset: list[str],
    ) -> None:
        value = elem.value
        if value is None:
            # A deferred value: read it now (only when the caller deferred).
            self.converted(tag, ds[tag], ds, ancestors, charset)
            return
        vr = elem.VR or _implicit_vr(tag, elem.length, elem.value, ds, ancestors)
        if vr == "SQ":
            try:
                seq = ds[tag]
            except Exception:
                # Not parseable as items after all: keep the bytes as UN,
                # which holds an implicit VR little endian encoding (PS3.5 §6.2.2).
                seq = None
            if seq is not None and seq.VR == "SQ":
                self.converted(tag, seq, ds, ancestors, charset)
                return
            vr = "UN"
        if not elem.is_little_endian and vr in _WORD_SIZE:
            value = _swap(value, _WORD_SIZE[vr])
        undefined = elem.length == 0xFFFFFFFF
        self.element(tag, vr, value, undefined)

    def converted(
        self,
        tag: int,
        elem: DataElement,
        ds: Dataset,
        ancestors: tuple[Dataset, ...],
        charset: list[str],
    ) -> None:
        vr = str(elem.VR)
        if vr == "SQ":
            header = struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"SQ", 0, 0xFFFFFFFF)
            self.chunks.append(header)
            for item in elem.value:
                self.chunks.append(_ITEM)
                self.dataset(item, (*ancestors, ds), charset)
                self.chunks.append(_ITEM_END)
            self.chunks.append(_SEQUENCE_END)
            return
        if " or " in vr:
            size = len(elem.value) if isinstance(elem.value, bytes | bytearray) else 2
            vr = _resolve_ambiguous(vr, tag, size, elem.is_undefined_length, ds, ancestors)
            elem = DataElement(elem.tag, vr, elem.value, is_undefined_length=False)
        # pydicom encodes the value; the implicit VR little endian encoding of a
        # value is its explicit VR little endian encoding, and needs no decision
        # about 16- or 32-bit lengths, which element() makes.
        buffer = DicomBytesIO()
        buffer.is_little_endian = True
        buffer.is_implicit_VR = True
        write_data_element(buffer, elem, charset)
        self.element(tag, vr, buffer.getvalue()[8:], False)

    def element(self, tag: int, vr: str, value: bytes, undefined: bool) -> None:
        if vr not in _KNOWN_VRS:
            vr = "UN"
        if len(value) % 2 and not undefined:
            value += b"\x00" if vr in _PAD_WITH_NUL else b" "
        if vr not in _LONG_VRS and len(value) > _MAX_SHORT_LENGTH:
            vr = "UN"
        group, number = tag >> 16, tag & 0xFFFF
        if vr in _LONG_VRS:
            length = 0xFFFFFFFF if undefined else len(value)
            header = struct.pack("<HH2sHI", group, number, vr.encode(), 0, length)
        else:
            header = struct.pack("<HH2sH", group, number, vr.encode(), len(value))
        self.chunks.append(header)
        self.chunks.append(value)
        if undefined:
            self.chunks.append(_SEQUENCE_END)


def _implicit_vr(
    tag: int, length: int, value: bytes | None, ds: Dataset, ancestors: tuple[Dataset, ...]
) -> str:
    """The VR of an implicit VR element: public or private dictionary, else UN (PS3.5 §6.2.2)."""
    group, number = tag >> 16, tag & 0xFFFF
    vr: str
    if group & 1:
        if 0x0010 <= number <= 0x00FF:
            return "LO"  # Private Creator (PS3.5 §7.8.1)
        creator = _private_creator(ds, tag) if number >= 0x1000 else None
        try:
            vr = private_dictionary_VR(tag, creator) if creator else "UN"
        except KeyError:
            vr = "UN"
    else:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"
    if " or " in vr:
        vr = _resolve_ambiguous(vr, tag, length, length == 0xFFFFFFFF, ds, ancestors)
    if vr not in _KNOWN_VRS:
        return "UN"
    size = _WORD_SIZE.get(vr)
    if size is not None and length != 0xFFFFFFFF and length % size:
        # The dictionary's VR does not fit the value: keep the bytes as UN.
        return "UN"
    return vr


def _private_creator(ds: Dataset, tag: int) -> str | None:
    creator_tag = (tag & 0xFFFF0000) | ((tag & 0xFF00) >> 8)
    elem: DataElement | RawDataElement | None = ds.get_item(creator_tag)
    if elem is None or elem.value is None:
        return None
    value = elem.value
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return text.strip(" \x00") or None


def _resolve_ambiguous(
    vr: str,
    tag: int,
    size: int,
    undefined: bool,
    ds: Dataset,
    ancestors: tuple[Dataset, ...],
) -> str:
    """The VR the standard prescribes where the dictionary gives a choice
    (explicit VR output: the rules of ``json.resolve_ambiguous_vr``)."""
    return resolve_ambiguous_vr(vr, tag, size, False, undefined, ds, ancestors)


def _charset_of(ds: Dataset, parent: list[str]) -> list[str]:
    elem: DataElement | RawDataElement | None = ds.get_item(_SPECIFIC_CHARACTER_SET)
    if elem is None or not elem.value:
        return parent
    value = elem.value
    if isinstance(value, bytes):
        terms = [t.strip(" \x00") for t in value.decode("latin-1").split("\\")]
    elif isinstance(value, str):
        terms = [value]
    else:
        terms = [str(t) for t in value]
    return terms if any(terms) else parent


def _swap(data: bytes, size: int) -> bytes:
    if len(data) % size:
        return data
    dtype = {2: "u2", 4: "u4", 8: "u8"}[size]
    return np.frombuffer(data, dtype=f">{dtype}").astype(f"<{dtype}").tobytes()


# -- pixel data --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pixels:
    info: PixelDataInfo
    tag: int
    offset: int | None  # of the value in the file, when deferred
    value: bytes | None  # the value, when it was read
    length: int
    little_endian: bool
    vr: str
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    ybr_422: bool
    extended_offsets: tuple[bytes, bytes] | None


def pixel_data_info(path: Path) -> PixelDataInfo:
    """Stored transfer syntax, encapsulation and frame count of *path* (NotFound without pixels)."""
    return _pixels_at(path).info


class _PixelsCache:
    """Where the pixel data of recently used files lies, so that one request per
    frame (OHIF, CONFORMANCE-NOTES §3.4) does not parse the header each time:
    an enhanced MR header with per-frame functional groups takes ~40 ms.

    Keyed by path, inode, size and modification time, so a file replaced in the
    cache is read anew. Only offsets are kept, never pixel values.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[tuple[str, int, int, int], _Pixels] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, path: Path) -> _Pixels:
        try:
            st = path.stat()
        except FileNotFoundError as exc:
            raise NotFound("the cached instance is gone") from exc
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        with self.lock:
            found = self.entries.get(key)
            if found is not None:
                self.entries.move_to_end(key)
                return found
        pixels = _pixels(_read(path, defer=True))
        if pixels.value is None or len(pixels.value) <= BULK_DATA_THRESHOLD:
            with self.lock:
                self.entries[key] = pixels
                while len(self.entries) > self.size:
                    self.entries.popitem(last=False)
        return pixels


_PIXELS_CACHE = _PixelsCache(4096)


def _pixels_at(path: Path) -> _Pixels:
    return _PIXELS_CACHE.get(path)


def _pixels(ds: FileDataset) -> _Pixels:
    syntax = _syntax_of(ds)
    for tag in _PIXEL_TAGS:
        elem: DataElement | RawDataElement | None = ds.get_item(tag, keep_deferred=True)
        if elem is not None:
            break
    else:
        raise NotFound("the instance holds no pixel data")
    try:
        rows = int(ds.Rows)
        columns = int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames_value = ds.get("NumberOfFrames", 1)
        number_of_frames = int(frames_value) if frames_value not in (None, "") else 1
    except (AttributeError, TypeError, ValueError) as exc:
        raise NotFound(f"the instance's pixel data is not usable: {exc}") from exc
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if isinstance(elem, RawDataElement):
        value = elem.value
        length = elem.length
        little = elem.is_little_endian
        offset = elem.value_tell if value is None else None
        vr = elem.VR or ("OB" if length == 0xFFFFFFFF else "OW")
        undefined = length == 0xFFFFFFFF
    else:
        value = bytes(elem.value)
        length = len(value)
        little = syntax != EXPLICIT_VR_BIG_ENDIAN
        offset = None
        vr = str(elem.VR)
        undefined = elem.is_undefined_length
    extended = None
    table = ds.get_item(_EXTENDED_OFFSET_TABLE)
    lengths = ds.get_item(_EXTENDED_OFFSET_TABLE_LENGTHS)
    if table is not None and lengths is not None and table.value and lengths.value:
        extended = (bytes(table.value), bytes(lengths.value))
    return _Pixels(
        info=PixelDataInfo(syntax, undefined, max(number_of_frames, 1)),
        tag=tag,
        offset=offset,
        value=value,
        length=length,
        little_endian=little,
        vr=vr,
        rows=rows,
        columns=columns,
        samples=samples,
        bits_allocated=bits,
        ybr_422=photometric == "YBR_FULL_422" and not undefined,
        extended_offsets=extended,
    )


def frames(path: Path, numbers: Sequence[int], target_ts: str | None) -> list[bytes]:
    """Pixel data of frames *numbers* (1-based) of the instance (PS3.18 §8.7.3.3, §10.4.1.1.3).

    - Native pixel data: raw little endian bytes of each frame, whatever
      *target_ts* ("*", None or Explicit VR Little Endian; §8.7.3.3.1). With
      BitsAllocated 1, a frame is bit-packed starting at bit 0 of its first
      byte and its last byte is padded with zero bits; frames are not padded to
      an even length.
    - Encapsulated pixel data, *target_ts* "*" or the stored syntax: the bare
      codestream of each frame, the fragments of a frame joined without item
      headers (§8.7.3.3.2); frames are found through the Extended or Basic
      Offset Table, or fragment by fragment when the table is empty.
    - Encapsulated, *target_ts* None or Explicit VR Little Endian: each frame
      decoded to raw little endian bytes (RGB for YBR colour).

    ``NotFound`` names a frame number beyond NumberOfFrames (or below 1);
    ``NotAcceptable`` a target that cannot be produced from the stored syntax.
    Use ``PixelDataInfo.delivered_syntax`` for the parts' transfer syntax.
    """
    pixels = _pixels_at(path)
    info = pixels.info
    bad = [n for n in numbers if not 1 <= n <= info.number_of_frames]
    if bad:
        listed = ", ".join(str(n) for n in bad)
        count = info.number_of_frames
        raise NotFound(
            f"{'frame' if len(bad) == 1 else 'frames'} {listed} "
            f"{'does' if len(bad) == 1 else 'do'} not exist: "
            f"the instance has {count} frame{'s' if count != 1 else ''}"
        )
    delivered = info.delivered_syntax(target_ts)
    if target_ts not in (None, ANY_TRANSFER_SYNTAX, EXPLICIT_VR_LITTLE_ENDIAN, delivered):
        raise NotAcceptable(
            f"the instance's pixel data is stored as {_syntax_name(info.transfer_syntax)} and "
            f"cannot be delivered in transfer syntax {target_ts}; available: "
            f"{EXPLICIT_VR_LITTLE_ENDIAN} (uncompressed) or * (as stored)"
        )
    if not info.encapsulated:
        with _ValueSource(path, pixels) as source:
            return [_native_frame(source, pixels, n - 1) for n in numbers]
    if delivered == info.transfer_syntax:
        return _codestreams(path, pixels, [n - 1 for n in numbers])
    return _decoded_frames(path, pixels, [n - 1 for n in numbers])


class _ValueSource:
    """Random access to a pixel data value, in memory or in the file."""

    def __init__(self, path: Path, pixels: _Pixels) -> None:
        self.pixels = pixels
        self.fp: BufferedReader | None = None
        if pixels.value is None:
            self.fp = path.open("rb")

    def __enter__(self) -> _ValueSource:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fp is not None:
            self.fp.close()

    def read(self, start: int, size: int) -> bytes:
        size = max(0, min(size, self.pixels.length - start))
        if self.pixels.value is not None:
            return self.pixels.value[start : start + size]
        assert self.fp is not None and self.pixels.offset is not None
        self.fp.seek(self.pixels.offset + start)
        return self.fp.read(size)


def _frame_bits(pixels: _Pixels) -> int:
    # YBR_FULL_422 native data holds two samples per pixel (PS3.3 C.7.6.3.1.2).
    samples = 2 if pixels.ybr_422 and pixels.samples == 3 else pixels.samples
    return pixels.rows * pixels.columns * samples * pixels.bits_allocated


def _native_frame(source: _ValueSource, pixels: _Pixels, index: int) -> bytes:
    frame_bits = _frame_bits(pixels)
    start_bit = index * frame_bits
    if (start_bit + frame_bits + 7) // 8 > pixels.length:
        raise NotFound(
            f"frame {index + 1} does not exist: the pixel data ends before it "
            f"({pixels.length} bytes)"
        )
    if pixels.bits_allocated == 1:
        # Frames of single-bit data need not start on a byte boundary (PS3.5
        # §8.1.1): shift the frame's bits down to bit 0 of its first byte.
        first, shift = divmod(start_bit, 8)
        size = (shift + frame_bits + 7) // 8
        number = int.from_bytes(source.read(first, size), "little") >> shift
        number &= (1 << frame_bits) - 1
        return number.to_bytes((frame_bits + 7) // 8, "little")
    frame_bytes = frame_bits // 8
    data = source.read(index * frame_bytes, frame_bytes)
    if not pixels.little_endian:
        # A big endian source holds words of BitsAllocated bits; 8-bit data in
        # OW is swapped in 16-bit words (PS3.5 §8.1.1, §8.2).
        size = pixels.bits_allocated // 8 if pixels.bits_allocated > 8 else 2
        if pixels.bits_allocated > 8 or pixels.vr == "OW":
            data = _swap(data, size)
    return data


def _codestreams(path: Path, pixels: _Pixels, indices: Iterable[int]) -> list[bytes]:
    number = pixels.info.number_of_frames
    out = []
    with path.open("rb") as fp:
        buffer: DicomBytesIO | BufferedReader
        if pixels.value is not None:
            buffer = DicomBytesIO(pixels.value)
        else:
            assert pixels.offset is not None
            fp.seek(pixels.offset)
            buffer = fp
        for index in indices:
            try:
                frame = get_frame(
                    buffer,
                    index,
                    extended_offsets=pixels.extended_offsets,
                    number_of_frames=number,
                )
            except (ValueError, EOFError, struct.error) as exc:
                raise NotFound(
                    f"frame {index + 1} cannot be found in the pixel data: {exc}"
                ) from exc
            out.append(frame)
    return out


def _decoded_frames(path: Path, pixels: _Pixels, indices: Sequence[int]) -> list[bytes]:
    arrays = _decode(path, pixels, indices)
    return [_native_bytes([arrays[i]], pixels.bits_allocated) for i in indices]


def _decode(path: Path, pixels: _Pixels, indices: Sequence[int]) -> dict[int, np.ndarray[Any, Any]]:
    """Frames *indices* (0-based) decoded, each once; pydicom reads only their fragments."""
    _decoder_for(pixels.info.transfer_syntax)
    wanted = sorted(set(indices))
    try:
        decoded = iter_pixels(path, indices=wanted, as_rgb=True)
        return dict(zip(wanted, decoded, strict=True))
    except Exception as exc:
        raise NotAcceptable(
            f"the pixel data stored as {_syntax_name(pixels.info.transfer_syntax)} could not "
            f"be decoded: {exc}"
        ) from exc


# -- metadata and bulk data ----------------------------------------------------------------------


def metadata(path: Path, bulk_uri: Callable[[tuple[int, ...]], str]) -> dict[str, Any]:
    """The DICOM JSON object of the instance (PS3.18 §10.4.1.1.2, Annex F).

    Group 0002 is left out (§10.4.1.1.2). Pixel Data (also Float and Double
    Float Pixel Data) and every binary value (OB OD OF OL OV OW UN) longer than
    ``BULK_DATA_THRESHOLD`` bytes become ``{"vr", "BulkDataURI": bulk_uri(path)}``
    (F.2.6), shorter binary values ``InlineBinary`` (F.2.7). *path* is ``(tag,)``
    at the top level and ``(sequence tag, item index, tag)`` below it, item
    indexes from 0, as ``bulkdata`` takes it. The file is read with values
    above the threshold left on disk, so pixel data is never loaded.
    """
    ds = _read(path, defer=True)
    bulk: set[tuple[int, ...]] = set()
    with path.open("rb") as fp:
        _mark_bulk(ds, (), (), fp, bulk)

    def uri(tag_path: tuple[int, ...]) -> str | None:
        return bulk_uri(tag_path) if tag_path in bulk else None

    return dataset_to_json(ds, bulk_data_uri=uri, inline_threshold=BULK_DATA_THRESHOLD)


def _mark_bulk(
    ds: Dataset,
    prefix: tuple[int, ...],
    ancestors: tuple[Dataset, ...],
    fp: BinaryIO,
    bulk: set[tuple[int, ...]],
) -> None:
    """Collect the paths of bulk data values, and stand-ins for deferred ones.

    A deferred binary value gets a short placeholder (the JSON encoder only asks
    for its URI); a deferred non-binary value (a long text, an FD array) is read
    from the file, since it appears in the JSON as values.
    """
    for key in list(ds.keys()):
        tag = int(key)
        path = (*prefix, tag)
        elem: DataElement | RawDataElement = ds.get_item(key, keep_deferred=True)
        if isinstance(elem, RawDataElement):
            vr = _effective_vr(tag, elem, ds, ancestors)
            if vr == "SQ":
                try:
                    elem = ds[key]
                except Exception:
                    continue  # the JSON encoder reports it
            elif vr in _BINARY_VRS or tag in _PIXEL_TAGS:
                if elem.value is None or elem.length > BULK_DATA_THRESHOLD or tag in _PIXEL_TAGS:
                    bulk.add(path)
                if elem.value is None:
                    ds[key] = elem._replace(VR=vr, value=b"\x00\x00\x00\x00")
                continue
            else:
                if elem.value is None:
                    fp.seek(elem.value_tell)
                    ds[key] = elem._replace(value=fp.read(elem.length))
                continue
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value):
                _mark_bulk(item, (*path, index), (*ancestors, ds), fp, bulk)
        elif isinstance(elem.value, bytes | bytearray) and (
            tag in _PIXEL_TAGS
            or (str(elem.VR) in _BINARY_VRS and len(elem.value) > BULK_DATA_THRESHOLD)
        ):
            bulk.add(path)


def _effective_vr(
    tag: int, elem: RawDataElement, ds: Dataset, ancestors: tuple[Dataset, ...]
) -> str:
    """The VR the JSON encoder will give a raw element (public UN is read as its real VR)."""
    vr = elem.VR
    if vr is None:
        return _implicit_vr(tag, elem.length, elem.value, ds, ancestors)
    if vr == "UN" and not (tag >> 16) & 1:
        try:
            known = dictionary_VR(tag)
        except KeyError:
            return vr
        if " or " in known:
            return _resolve_ambiguous(
                known, tag, elem.length, elem.length == 0xFFFFFFFF, ds, ancestors
            )
        return known
    return vr


def bulkdata(path: Path, tag_path: tuple[int, ...]) -> bytes:
    """The value of the attribute at *tag_path*, little endian (PS3.18 §8.7.3.3.1, §10.4.1.1.5).

    *tag_path* is ``(tag,)`` or ``(sequence tag, item index, tag, ...)`` as in
    ``metadata``. Numbers and OW/OF/OL/OD/OV words of a big endian source are
    byte-swapped; text and OB/UN values are sent as stored.

    Pixel Data: native pixel data is the whole value, little endian.
    Encapsulated pixel data is decoded, and the result is what the Pixel Data
    value is in Explicit VR Little Endian, all frames (§8.7.3.3: uncompressed is
    the default for bulk data). Compressed frames as stored are a multipart of
    one part per frame (§8.7.3.3.2): for ``transfer-syntax=*`` call
    ``frames(path, range(1, n + 1), "*")`` instead.

    ``NotFound`` when the path leads nowhere or to a sequence.
    """
    if not tag_path or len(tag_path) % 2 == 0:
        raise NotFound(f"{_path_text(tag_path)} is not an attribute path")
    if len(tag_path) == 1 and tag_path[0] in _PIXEL_TAGS:
        pixels = _pixels_at(path)
        if pixels.tag != tag_path[0]:
            raise NotFound(f"the instance holds no {_path_text(tag_path)}")
        if pixels.info.encapsulated:
            arrays = _decode(path, pixels, range(pixels.info.number_of_frames))
            data = _native_bytes([arrays[i] for i in sorted(arrays)], pixels.bits_allocated)
            if len(data) >= 0xFFFFFFFE:
                raise NotAcceptable(
                    f"the decompressed pixel data ({len(data)} bytes) does not fit in Explicit "
                    f"VR Little Endian; retrieve the frames with transfer-syntax=* instead"
                )
            return data
        with _ValueSource(path, pixels) as source:
            data = source.read(0, pixels.length)
        if not pixels.little_endian and (pixels.bits_allocated > 8 or pixels.vr == "OW"):
            data = _swap(data, max(pixels.bits_allocated // 8, 2))
        return data
    ds = _read(path, defer=True)
    owner: Dataset = ds
    ancestors: tuple[Dataset, ...] = ()
    for depth in range(0, len(tag_path) - 1, 2):
        seq_tag, index = tag_path[depth], tag_path[depth + 1]
        if seq_tag not in owner:
            raise NotFound(f"the instance holds no {_path_text(tag_path[: depth + 1])}")
        seq = owner[seq_tag]
        if seq.VR != "SQ" or not 0 <= index < len(seq.value):
            raise NotFound(f"the instance holds no {_path_text(tag_path[: depth + 2])}")
        ancestors = (*ancestors, owner)
        owner = seq.value[index]
    tag = tag_path[-1]
    elem: DataElement | RawDataElement | None = owner.get_item(tag, keep_deferred=True)
    if elem is None:
        raise NotFound(f"the instance holds no {_path_text(tag_path)}")
    if isinstance(elem, RawDataElement):
        vr = _effective_vr(tag, elem, owner, ancestors)
        if vr == "SQ":
            raise NotFound(f"{_path_text(tag_path)} is a sequence, not bulk data")
        value = elem.value
        if value is None:
            with path.open("rb") as fp:
                fp.seek(elem.value_tell)
                value = fp.read(elem.length)
        if not elem.is_little_endian and vr in _WORD_SIZE:
            value = _swap(value, _WORD_SIZE[vr])
        return value
    if elem.VR == "SQ":
        raise NotFound(f"{_path_text(tag_path)} is a sequence, not bulk data")
    if isinstance(elem.value, bytes | bytearray):
        return bytes(elem.value)
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = True
    write_data_element(buffer, elem, _charset_of(owner, ["ISO_IR 6"]))
    return buffer.getvalue()[8:]


def _path_text(path: tuple[int, ...]) -> str:
    parts = [
        f"({t >> 16:04X},{t & 0xFFFF:04X})" if i % 2 == 0 else f"[{t}]" for i, t in enumerate(path)
    ]
    return "".join(parts) or "()"
