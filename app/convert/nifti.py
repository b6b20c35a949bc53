"""DICOM series to NIfTI-1: one honest volume, or a :class:`ConversionError` saying why not.

Geometry follows PS3.3 C.7.6.2.1.1.  F = ImageOrientationPatient[0:3] is the
direction of increasing column index *i*, G = ImageOrientationPatient[3:6] that
of increasing row index *j*; PixelSpacing is (row spacing Δr, column spacing
Δc).  Slices are sorted along the slice normal n = F x G by s = n · IPP (never
by InstanceNumber or file order).  In patient coordinates (LPS, mm)::

    A_LPS = [ F·Δc | G·Δr | (IPP_last - IPP_first)/(K - 1) | IPP_first ]

and NIfTI wants RAS: ``A_RAS = diag(-1, -1, 1, 1) · A_LPS``.  :class:`Volume`
keeps everything in LPS (like ITK and highdicom); only the NIfTI writer flips.
The voxel array's axes are ``(k, j, i)`` or ``(t, k, j, i)``: C order, so its
bytes are already in NIfTI order (i fastest).

What is refused rather than silently resampled or mixed (each with a reason
that names the measured values): several series, orientations, matrix sizes,
pixel spacings, echoes or image types in one volume; missing or unevenly
spaced slices (0.2 mm tolerance, dcm2niix's ``kSliceTolerance``); duplicate
positions that do not form complete volumes of a time series; sheared stacks
other than a CT gantry tilt; non-image objects; colour and floating-point
pixel data.  Echoes and image types (magnitude, phase...) are split into
several volumes by :func:`split_series`, as dcm2niix writes ``_e2``, ``_ph``.

The one interpolation: a gantry-tilted stack (slice origins drifting along the
column direction G from slice to slice) is shifted back slice by slice onto
the orthogonal grid, linearly between rows, as dcm2niix's ``_Tilt`` output;
``Volume.resampled`` says so.

Siemens mosaics are cut into their slices with the CSA header's
NumberOfImagesInMosaic and SliceNormalVector, as dcm2niix and nibabel do.
Enhanced multi-frame objects (one file, many frames) go through the same
geometry code, with each frame's position, orientation, spacing and rescale
taken from its per-frame or the shared functional groups (PS3.3 C.7.6.16).

Values: RescaleSlope/Intercept are applied.  Integer results that fit are
written as int16 (CT in HU), uint16 or uint8 (as dcm2niix keeps them), with
``scl_slope`` 1 and ``scl_inter`` 0; a non-integer or per-slice varying rescale
gives float32.  The NIfTI header is written here (348 bytes + 4 extension
bytes), qform and sform both set to scanner anatomical (code 1); ``.nii.gz``
is deflated with ISA-L (package ``isal``) into one standard gzip member.

No HTTP here: functions take file paths and return arrays, bytes or chunks.
"""

from __future__ import annotations

import datetime as _dt
import functools
import io
import math
import mmap
import struct
from collections import Counter, deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from app.errors import ConversionError

__all__ = [
    "NIFTI_HEADER_SIZE",
    "SLICE_TOLERANCE_MM",
    "Chunk",
    "SeriesPart",
    "Volume",
    "build_part",
    "build_volume",
    "build_volumes",
    "nifti_header",
    "nifti_size",
    "split_series",
    "to_nifti",
    "write_nifti",
]

#: Largest deviation of one slice gap from the mean gap (mm), as dcm2niix's ``kSliceTolerance``.
SLICE_TOLERANCE_MM = 0.2
#: Largest difference of one direction cosine between slices of one volume.
ORIENTATION_TOLERANCE = 1e-3
#: Largest relative difference of pixel spacings between slices of one volume.
SPACING_TOLERANCE = 1e-4
#: Frames whose positions along the normal differ by less than this (mm) share a slice position.
SAME_POSITION_MM = 0.01
#: A stack whose positions leave the slice-normal line by more than both of these is sheared.
SHEAR_TOLERANCE_MM = 0.02
SHEAR_TOLERANCE_DEG = 0.05

#: 348-byte NIfTI-1 header plus the 4-byte extension flag; the voxels start here.
NIFTI_HEADER_SIZE = 352

#: One piece of a NIfTI stream: compressed output is ``bytes``; uncompressed
#: output is handed out as ``memoryview`` slices of the voxel array (no copy).
Chunk = bytes | memoryview

_CHUNK = 1 << 22  # 4 MiB of voxels per chunk handed to the compressor or the caller

_NATIVE_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "<",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": "<",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2": ">",  # Explicit VR Big Endian (retired)
}

# SOP classes refused by class, with the reason: the UID and everything below it.
# (Other images without patient geometry, e.g. CR, DX or secondary capture,
# are refused for lacking ImagePositionPatient / ImageOrientationPatient.)
_REFUSED_SOP_CLASSES = (
    ("1.2.840.10008.5.1.4.1.1.88", "a structured report or key object selection, not an image"),
    ("1.2.840.10008.5.1.4.1.1.11", "a presentation state, not an image"),
    ("1.2.840.10008.5.1.4.1.1.104", "an encapsulated document, not an image"),
    ("1.2.840.10008.5.1.4.1.1.9", "a waveform, not an image"),
    ("1.2.840.10008.5.1.4.1.1.66", "raw data, a registration or a segmentation: not converted"),
    ("1.2.840.10008.5.1.4.1.1.481.2", "an RT dose grid: not converted"),
    ("1.2.840.10008.5.1.4.1.1.481.3", "an RT structure set, not an image"),
    ("1.2.840.10008.5.1.4.1.1.481.5", "an RT plan, not an image"),
)

# NIfTI-1 datatype codes [nifti1.h] by numpy dtype.
_NIFTI_DATATYPE = {
    np.dtype(np.uint8): 2,
    np.dtype(np.int16): 4,
    np.dtype(np.int32): 8,
    np.dtype(np.float32): 16,
    np.dtype(np.float64): 64,
    np.dtype(np.int8): 256,
    np.dtype(np.uint16): 512,
    np.dtype(np.uint32): 768,
}

FloatVector = npt.NDArray[np.float64]


# ------------------------------------------------------------------------------------ result


@dataclass(frozen=True, eq=False)
class Planes:
    """Voxels kept as the 2-D planes they were read into, in ``(t, k)`` order.

    A series read while it arrived (:mod:`app.convert.intake`) has each slice in
    a buffer of its own already, in arrival order: streaming the planes in slice
    order needs no output array and no copy.  ``shape`` is the volume's.
    """

    arrays: tuple[npt.NDArray[Any], ...]
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def stack(self) -> npt.NDArray[Any]:
        out = _allocate(self.shape, self.dtype)
        flat = out.reshape(-1, *self.shape[-2:])
        for index, plane in enumerate(self.arrays):
            flat[index] = plane
        return out


@dataclass(frozen=True, eq=False)
class Volume:
    """A stack of slices (or of volumes) on one regular grid, in LPS patient coordinates.

    ``voxels`` has axes ``(k, j, i)`` or ``(t, k, j, i)``: *i* runs along the
    rows (direction F, column index), *j* down the columns (G, row index), *k*
    along the slice normal and *t* over repeated volumes.  Values are final
    (rescale applied).  ``origin`` is the centre of voxel (0, 0, 0), ``spacing``
    the distances (mm) along i, j, k, and ``direction`` a 3x3 matrix whose
    columns are the unit vectors of i, j and k, as SimpleITK's ``SetDirection``
    expects them (row-major flattened).  ``repetition_time`` (s) is the time
    between volumes of a 4-D series.  ``headers`` are the source data sets (no
    pixel data) in slice order of the first volume, one per file.

    ``data`` holds the voxels as one array or, for a series read while it
    arrived, as :class:`Planes`; ``voxels`` stacks those into one array on
    first use, while :func:`to_nifti` streams them as they are.
    """

    data: npt.NDArray[Any] | Planes
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]
    headers: tuple[Dataset, ...]
    repetition_time: float | None = None
    rescale_slope: float | None = 1.0
    rescale_intercept: float | None = 0.0
    notes: tuple[str, ...] = field(default=())
    resampled: str | None = None  # why and how voxels were interpolated (gantry tilt), if so

    @property
    def voxels(self) -> npt.NDArray[Any]:
        data = self.data
        if isinstance(data, Planes):
            data = data.stack()
            object.__setattr__(self, "data", data)  # the planes are no longer needed
        return data

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.data.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def affine_lps(self) -> FloatVector:
        """4x4 voxel (i, j, k) to LPS (mm) matrix."""
        affine = np.eye(4)
        affine[:3, :3] = np.array(self.direction) * np.array(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    @property
    def affine_ras(self) -> FloatVector:
        """4x4 voxel (i, j, k) to RAS (mm) matrix, as NIfTI's sform holds it."""
        flip: FloatVector = np.diag([-1.0, -1.0, 1.0, 1.0])
        result: FloatVector = flip @ self.affine_lps
        return result


# ------------------------------------------------------------------------------------ frames


@dataclass
class _Source:
    """One input file and how to get its pixels."""

    path: Path
    ds: Dataset
    frames: int
    rows: int
    cols: int
    dtype: np.dtype[Any]  # stored values, native byte order
    byte_order: str | None  # "<" or ">" when pixels can be read straight from the file
    offset: int | None  # file offset of the pixel data value
    mosaic_tiles: int = 0  # tiles per side of a Siemens mosaic, 0 if not a mosaic
    sign_bits: int = 0  # shift that sign-extends BitsStored within BitsAllocated
    # Every frame's stored values (frames x rows x cols), read ahead while the series
    # was still arriving (app.convert.intake), with each frame's (min, max); None:
    # the pixels are read from the file when the volume is stacked.
    stored: npt.NDArray[Any] | None = None
    extremes: list[tuple[int, int]] | None = None
    # An intercept already added (modulo 2**bits) to ``stored``, as the file's own
    # rescale asks: the likely final values, ready before the series is complete.
    added: int = 0


@dataclass
class _Frame:
    """One 2-D image: a slice of a classic file, a frame of a multi-frame file or a mosaic tile."""

    source: _Source
    index: int  # frame number in the file, or tile number in a mosaic
    position: FloatVector
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    rows: int
    cols: int
    slope: float
    intercept: float
    echo: str
    image_type: str
    temporal: tuple[float, ...]
    tilt: float
    thickness: float | None
    spacing_between: float | None
    echo_number: float | None = None  # EchoNumbers (0018,0086), for naming split volumes
    echo_time: float | None = None  # EchoTime or EffectiveEchoTime (ms)
    image_type_values: tuple[str, ...] = ()  # ImageType / FrameType as stored

    def describe(self) -> str:
        name = self.source.path.name
        return f"{name} frame {self.index + 1}" if self.source.frames > 1 else name


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _number(value: Any, default: float) -> float:
    result = _float(value)
    return default if result is None else result


def _floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    try:
        items = value.split("\\") if isinstance(value, str) else list(value)
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return None


def _seconds(date: Any, time_of_day: Any) -> float | None:
    """Seconds since an epoch for a DA + TM pair (or a DT in ``date`` alone)."""
    text = (str(date or "") + str(time_of_day or "")).strip().replace(":", "")
    if not text:
        return None
    head, _, fraction = text.partition(".")
    digits = "".join(c for c in head if c.isdigit())
    if date and len(digits) >= 8:
        day_part, tm = digits[:8], digits[8:]
        try:
            day = _dt.date(int(day_part[:4]), int(day_part[4:6]), int(day_part[6:8]))
        except ValueError:
            return None
        days = day.toordinal()
    else:
        days, tm = 0, digits
    tm = (tm + "000000")[:6]
    seconds = int(tm[:2]) * 3600 + int(tm[2:4]) * 60 + int(tm[4:6])
    frac = float("0." + fraction) if fraction.isdigit() else 0.0
    return days * 86400.0 + seconds + frac


@functools.cache
def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag


def _text(ds: Dataset, keyword: str) -> str | None:
    """A text attribute (CS, DS, IS, UI, DA, TM...) as written, values joined by backslashes.

    Reads the raw bytes when pydicom has not converted the element yet: for
    hundreds of slices this is much cheaper than pydicom's value conversion.
    """
    element = ds.get_item(_tag(keyword), keep_deferred=True)
    if element is None:
        return None
    value = element.value
    if isinstance(value, bytes):
        text = value.decode("latin-1").strip(" \0")
    elif value is None:
        return None
    elif isinstance(value, str):
        text = value.strip()
    else:
        try:
            text = "\\".join(str(v) for v in value)
        except TypeError:
            text = str(value)
    return text or None


def _ushort(ds: Dataset, keyword: str, default: int) -> int:
    """An US attribute (Rows, BitsAllocated...), from the raw bytes when still raw."""
    element = ds.get_item(_tag(keyword), keep_deferred=True)
    if element is None or element.value is None:
        return default
    value = element.value
    if isinstance(value, bytes):
        if len(value) < 2:
            return default
        little = getattr(element, "is_little_endian", True)
        return int.from_bytes(value[:2], "little" if little else "big")
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _item(seq_owner: Dataset | None, keyword: str) -> Dataset | None:
    if seq_owner is None or keyword not in seq_owner:
        return None
    seq = seq_owner[keyword].value
    return seq[0] if seq else None


def _functional_group(
    per_frame: Dataset | None, shared: Dataset | None, keyword: str
) -> Dataset | None:
    """The first item of a functional group macro, per-frame before shared (PS3.3 C.7.6.16)."""
    return _item(per_frame, keyword) or _item(shared, keyword)


def _sop_class_problem(sop_class: str) -> str | None:
    for base, why in _REFUSED_SOP_CLASSES:
        if sop_class == base or sop_class.startswith(base + "."):
            return why
    return None


def _read_header(path: Path) -> Dataset:
    # Pixel data (and other long values) are deferred: only their file offset is kept.
    try:
        return dcmread(path, defer_size=4096)
    except InvalidDicomError:
        pass  # many scanner files lack the preamble and "DICM": parse without it
    except (OSError, ValueError, EOFError) as exc:
        raise ConversionError(f"{path.name}: cannot read the file ({exc})") from exc
    try:
        ds = dcmread(path, defer_size=4096, force=True)
    except Exception as exc:  # pydicom raises nearly anything on non-DICOM input
        raise ConversionError(f"{path.name}: not a DICOM file ({exc})") from exc
    if "SOPClassUID" not in ds and "Rows" not in ds:
        raise ConversionError(f"{path.name}: not a DICOM file")
    return ds


def _stored_dtype(ds: Dataset, name: str) -> np.dtype[Any]:
    bits = _ushort(ds, "BitsAllocated", 0)
    signed = _ushort(ds, "PixelRepresentation", 0) == 1
    if bits not in (8, 16, 32):
        raise ConversionError(f"{name}: BitsAllocated {bits} is not supported (8, 16 or 32 only)")
    return np.dtype(f"{'i' if signed else 'u'}{bits // 8}")


def _source(path: Path, ds: Dataset) -> _Source:
    name = path.name
    sop_class = _text(ds, "SOPClassUID") or ""
    problem = _sop_class_problem(sop_class)
    if problem:
        raise ConversionError(f"{name} ({UID(sop_class).name}) is {problem}")
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise ConversionError(f"{name}: floating-point pixel data is not supported")
    if "PixelData" not in ds:
        what = UID(sop_class).name if sop_class else "object"
        raise ConversionError(f"{name} has no pixel data ({what}): not an image")
    samples = _ushort(ds, "SamplesPerPixel", 1)
    if samples != 1:
        photometric = ds.get("PhotometricInterpretation", "")
        raise ConversionError(
            f"{name}: colour images ({samples} samples per pixel, {photometric}) are not converted"
        )
    rows, cols = _ushort(ds, "Rows", 0), _ushort(ds, "Columns", 0)
    if rows < 1 or cols < 1:
        raise ConversionError(f"{name}: no image matrix (Rows {rows}, Columns {cols})")
    dtype = _stored_dtype(ds, name)
    frames = int(_number(_text(ds, "NumberOfFrames"), 1))

    element = ds.get_item("PixelData", keep_deferred=True)
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax:
        byte_order = _NATIVE_TRANSFER_SYNTAXES.get(syntax)
    else:  # no file meta: pydicom worked out the encoding of the raw file
        _implicit, little = ds.original_encoding
        byte_order = None if little is None else ("<" if little else ">")
    # A deferred element is a RawDataElement (value_tell); a read one a DataElement (file_tell).
    offset = getattr(element, "value_tell", getattr(element, "file_tell", None))
    length = getattr(element, "length", None)
    expected = frames * rows * cols * dtype.itemsize
    if (
        byte_order is None
        or offset is None
        or getattr(element, "is_undefined_length", False)
        or (length is not None and length < expected)
    ):
        byte_order, offset = None, None  # decode with pydicom (compressed or unusual)
    bits_stored = _ushort(ds, "BitsStored", 0) or dtype.itemsize * 8
    sign_bits = dtype.itemsize * 8 - bits_stored if dtype.kind == "i" else 0
    return _Source(path, ds, frames, rows, cols, dtype, byte_order, offset, sign_bits=sign_bits)


# ----------------------------------------------------------------- Siemens CSA and mosaics


def _csa_tags(raw: bytes) -> dict[str, list[str]]:
    """Decode a Siemens CSA header (``SV10`` or CSA1) into name -> item strings."""
    tags: dict[str, list[str]] = {}
    csa2 = raw[:4] == b"SV10"
    pos = 8 if csa2 else 0
    if len(raw) < pos + 8:
        return tags
    n_tags = struct.unpack_from("<I", raw, pos)[0]
    pos += 8
    if not 0 < n_tags <= 1000:
        return tags
    first_items = 0
    for tag_no in range(n_tags):
        if pos + 84 > len(raw):
            break
        name_raw, vm, _vr, _syngodt, n_items, _xx = struct.unpack_from("<64si4s3i", raw, pos)
        pos += 84
        name = name_raw.split(b"\0", 1)[0].decode("latin-1")
        if tag_no == 1:
            first_items = n_items
        items: list[str] = []
        for _ in range(max(0, min(n_items, 1000))):
            if pos + 16 > len(raw):
                break
            x0, x1, _x2, _x3 = struct.unpack_from("<4i", raw, pos)
            pos += 16
            length = x1 if csa2 else x0 - first_items
            if length < 0 or pos + length > len(raw):
                break
            value = raw[pos : pos + length].split(b"\0", 1)[0].decode("latin-1").strip()
            if len(items) < max(vm, 1) or vm == 0:
                items.append(value)
            pos += length + (-length % 4)
        tags[name] = [v for v in items if v != ""]
    return tags


def _private_value(ds: Dataset, group: int, creator: str, element: int) -> Any:
    try:
        block = ds.private_block(group, creator)
        return block[element].value
    except KeyError:
        return None


def _is_mosaic(ds: Dataset) -> bool:
    return "MOSAIC" in (_text(ds, "ImageType") or "").upper().split("\\")


def _mosaic_geometry(src: _Source) -> tuple[int, FloatVector]:
    """Number of slices in a Siemens mosaic and the direction they are stacked in."""
    ds, name = src.ds, src.path.name
    csa_raw = _private_value(ds, 0x0029, "SIEMENS CSA HEADER", 0x10)
    csa = _csa_tags(bytes(csa_raw)) if isinstance(csa_raw, bytes) else {}
    count = _float(next(iter(csa.get("NumberOfImagesInMosaic") or []), None))
    if count is None:
        count = _float(_private_value(ds, 0x0019, "SIEMENS MR HEADER", 0x0A))
    normal_items = csa.get("SliceNormalVector") or []
    if count is None or count < 1:
        raise ConversionError(
            f"{name}: Siemens mosaic without NumberOfImagesInMosaic (CSA header missing?): "
            "cannot cut it into slices"
        )
    if len(normal_items) != 3:
        raise ConversionError(
            f"{name}: Siemens mosaic without the CSA SliceNormalVector: slice order unknown"
        )
    normal = np.array([float(v) for v in normal_items])
    norm = float(np.linalg.norm(normal))
    if not math.isfinite(norm) or norm < 0.5:
        raise ConversionError(f"{name}: Siemens mosaic with an invalid SliceNormalVector")
    return int(count), normal / norm


# ------------------------------------------------------------------------- frame extraction


def _values(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split("\\") if isinstance(value, str) else list(value)
    return tuple(str(v).strip() for v in items)


def _first(value: Any) -> Any:
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return value
    items = list(value)
    return items[0] if items else None


def _image_type(values: Any) -> str:
    if values is None:
        return ""
    items = values.split("\\") if isinstance(values, str) else list(values)
    # Values 1 and 2 (ORIGINAL/DERIVED, PRIMARY/SECONDARY) do not change what a voxel means.
    return "\\".join(str(v).upper() for v in items[2:])


def _echo_time(value: Any) -> float | None:
    # A zero echo time marks a derived image (a field map), not an echo.
    te = _float(_first(value))
    return te if te else None


def _echo_key(echo_number: Any, echo_time: Any) -> str:
    parts = []
    number = _float(echo_number)
    if number is not None:
        parts.append(f"echo {number:g}")
    te = _float(echo_time)
    if te is not None:
        parts.append(f"TE {te:g} ms")
    return ", ".join(parts)


def _geometry(
    name: str, position: Any, orientation: Any, spacing: Any
) -> tuple[FloatVector, tuple[float, ...], tuple[float, float]]:
    ipp, iop, ps = _floats(position), _floats(orientation), _floats(spacing)
    if ipp is None or len(ipp) != 3 or iop is None or len(iop) != 6:
        raise ConversionError(
            f"{name} has no patient geometry (ImagePositionPatient / ImageOrientationPatient): "
            "not a cross-sectional image"
        )
    if ps is None or len(ps) != 2 or min(ps) <= 0:
        raise ConversionError(f"{name} has no valid PixelSpacing")
    return np.array(ipp), tuple(iop), (ps[0], ps[1])


def _classic_frames(src: _Source) -> list[_Frame]:
    ds, name = src.ds, src.path.name
    if src.frames > 1:
        raise ConversionError(
            f"{name}: multi-frame object ({src.frames} frames) without per-frame functional "
            "groups: its frame geometry is not supported"
        )
    position, orientation, spacing = _geometry(
        name,
        _text(ds, "ImagePositionPatient"),
        _text(ds, "ImageOrientationPatient"),
        _text(ds, "PixelSpacing"),
    )
    temporal = (
        _number(_text(ds, "TemporalPositionIdentifier"), -math.inf),
        _number(_text(ds, "TriggerTime"), -math.inf),
        _seconds(_text(ds, "AcquisitionDate"), _text(ds, "AcquisitionTime"))
        or _seconds(_text(ds, "AcquisitionDateTime"), None)
        or -math.inf,
        _number(_text(ds, "AcquisitionNumber"), -math.inf),
    )
    common: dict[str, Any] = {
        "orientation": orientation,
        "pixel_spacing": spacing,
        # A zero slope is invalid DICOM; like a missing one it means "no scaling".
        "slope": _number(_text(ds, "RescaleSlope"), 1.0) or 1.0,
        "intercept": _number(_text(ds, "RescaleIntercept"), 0.0),
        "echo": _echo_key(_text(ds, "EchoNumbers"), _text(ds, "EchoTime")),
        "echo_number": _float((_text(ds, "EchoNumbers") or "").split("\\")[0]),
        "echo_time": _echo_time(_text(ds, "EchoTime")),
        "image_type": _image_type(_text(ds, "ImageType")),
        "image_type_values": _values(_text(ds, "ImageType")),
        "temporal": temporal,
        "tilt": _number(_text(ds, "GantryDetectorTilt"), 0.0),
        "thickness": _float(_text(ds, "SliceThickness")),
        "spacing_between": _float(_text(ds, "SpacingBetweenSlices")),
    }
    if not _is_mosaic(ds):
        return [_Frame(src, 0, position, rows=src.rows, cols=src.cols, **common)]

    count, normal = _mosaic_geometry(src)
    tiles = math.ceil(math.sqrt(count))
    if src.rows % tiles or src.cols % tiles:
        raise ConversionError(
            f"{name}: a {src.rows}x{src.cols} mosaic does not split into {tiles}x{tiles} tiles"
        )
    src.mosaic_tiles = tiles
    rows, cols = src.rows // tiles, src.cols // tiles
    f, g = np.array(orientation[:3]), np.array(orientation[3:])
    # ImagePositionPatient is the corner of the whole mosaic; move it to the first tile's.
    first = (
        position + g * spacing[0] * (src.rows - rows) / 2 + f * spacing[1] * (src.cols - cols) / 2
    )
    step = common["spacing_between"] or common["thickness"]
    if not step:
        raise ConversionError(f"{name}: mosaic without SpacingBetweenSlices or SliceThickness")
    return [
        _Frame(src, t, first + t * step * normal, rows=rows, cols=cols, **common)
        for t in range(count)
    ]


def _enhanced_frames(src: _Source) -> list[_Frame]:
    ds, name = src.ds, src.path.name
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame_seq = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame_seq) != src.frames:
        raise ConversionError(
            f"{name}: {len(per_frame_seq)} per-frame functional groups for {src.frames} frames"
        )
    top_type = ds.get("ImageType")
    top_echo = _echo_key(ds.get("EchoNumbers"), ds.get("EchoTime"))
    frames = []
    for index, pf in enumerate(per_frame_seq):
        plane_position = _functional_group(pf, shared, "PlanePositionSequence")
        plane_orientation = _functional_group(pf, shared, "PlaneOrientationSequence")
        measures = _functional_group(pf, shared, "PixelMeasuresSequence")
        transform = _functional_group(pf, shared, "PixelValueTransformationSequence")
        content = _functional_group(pf, shared, "FrameContentSequence")
        echo = _functional_group(pf, shared, "MREchoSequence")
        frame_type: Any = top_type
        for element in pf:
            if element.keyword.endswith("FrameTypeSequence") and element.value:
                frame_type = element.value[0].get("FrameType", top_type)
        label = f"{name} frame {index + 1}"
        position, orientation, spacing = _geometry(
            label,
            plane_position.get("ImagePositionPatient") if plane_position else None,
            plane_orientation.get("ImageOrientationPatient") if plane_orientation else None,
            measures.get("PixelSpacing") if measures else None,
        )
        temporal = (
            _number(content.get("TemporalPositionIndex") if content else None, -math.inf),
            _number(ds.get("TemporalPositionIdentifier"), -math.inf),
            _seconds(content.get("FrameAcquisitionDateTime") if content else None, None)
            or -math.inf,
        )
        slope = _float(transform.get("RescaleSlope") if transform else None)
        intercept = _float(transform.get("RescaleIntercept") if transform else None)
        frames.append(
            _Frame(
                src,
                index,
                position,
                orientation,
                spacing,
                src.rows,
                src.cols,
                slope or _number(ds.get("RescaleSlope"), 1.0) or 1.0,
                intercept if intercept is not None else _number(ds.get("RescaleIntercept"), 0.0),
                _echo_key(None, echo.get("EffectiveEchoTime")) if echo else top_echo,
                _image_type(frame_type),
                temporal,
                _number(ds.get("GantryDetectorTilt"), 0.0),
                _float(measures.get("SliceThickness")) if measures else None,
                _float(measures.get("SpacingBetweenSlices")) if measures else None,
                echo_number=None if echo else _float(_first(ds.get("EchoNumbers"))),
                echo_time=_echo_time(echo.get("EffectiveEchoTime") if echo else ds.get("EchoTime")),
                image_type_values=_values(frame_type),
            )
        )
    return frames


def _frames_of(path: Path) -> list[_Frame]:
    ds = _read_header(path)
    src = _source(path, ds)
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_frames(src)
    return _classic_frames(src)


# ------------------------------------------------------------------------------ validation


def _summary(counter: Counter[Any], unit: str = "images") -> str:
    parts = [f"{key or 'none'} ({count} {unit})" for key, count in counter.most_common()]
    return "; ".join(parts)


def _require_same(frames: Sequence[_Frame], what: str, key: Any, unit: str = "images") -> None:
    counter: Counter[Any] = Counter(key(f) for f in frames)
    if len(counter) > 1:
        raise ConversionError(f"mixed {what}: {_summary(counter, unit)}; not one volume")


def _check_uniform(frames: Sequence[_Frame]) -> None:
    def uid(keyword: str) -> Any:
        return lambda f: _text(f.source.ds, keyword) or ""

    _require_same(frames, "series (SeriesInstanceUID)", uid("SeriesInstanceUID"))
    _require_same(frames, "frames of reference", uid("FrameOfReferenceUID"))
    _require_same(frames, "matrix sizes", lambda f: f"{f.cols}x{f.rows}")
    _require_same(frames, "echoes", lambda f: f.echo)
    _require_same(frames, "image types (ImageType values 3 and up)", lambda f: f.image_type)
    reference = frames[0]
    ref_iop = np.array(reference.orientation)
    ref_ps = np.array(reference.pixel_spacing)
    odd_iop = [
        f
        for f in frames
        if np.max(np.abs(np.array(f.orientation) - ref_iop)) > ORIENTATION_TOLERANCE
    ]
    if odd_iop:
        counter: Counter[Any] = Counter(
            "\\".join(f"{v:.4g}" for v in f.orientation) for f in frames
        )
        raise ConversionError(
            f"mixed orientations (ImageOrientationPatient): {_summary(counter)}; "
            "not one volume (a localizer in the series?)"
        )
    odd_ps = [
        f
        for f in frames
        if np.max(np.abs(np.array(f.pixel_spacing) / ref_ps - 1)) > SPACING_TOLERANCE
    ]
    if odd_ps:
        counter = Counter("\\".join(f"{v:g}" for v in f.pixel_spacing) for f in frames)
        raise ConversionError(f"mixed pixel spacings (PixelSpacing): {_summary(counter)}")


def _unit(vector: FloatVector) -> FloatVector:
    norm = float(np.linalg.norm(vector))
    if norm < 1e-6:
        raise ConversionError("ImageOrientationPatient holds a zero vector")
    result: FloatVector = vector / norm
    return result


def _gap_report(positions: Sequence[float], gaps: FloatVector) -> str:
    rounded: Counter[str] = Counter(f"{g:.2f} mm" for g in gaps)
    parts = ", ".join(f"{gap} ({count}x)" for gap, count in rounded.most_common(6))
    typical = float(np.median(gaps))
    odd = [k for k, g in enumerate(gaps) if abs(g - typical) > SLICE_TOLERANCE_MM]
    where = "; ".join(
        f"{gaps[k]:.2f} mm after the slice at s = {positions[k]:.2f} mm" for k in odd[:5]
    )
    more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
    hint = " (missing slices?)" if any(gaps[k] > 1.5 * typical for k in odd) else ""
    return f"measured gaps {parts}; odd ones: {where}{more}{hint}"


def _shear(
    grid: list[list[_Frame]], normal: FloatVector, f: FloatVector, g: FloatVector, ref: _Frame
) -> float:
    """Rows per slice by which a sheared (gantry-tilted) stack drifts along G, or 0.

    CT gantry tilt leaves the image plane axial but moves each slice's origin
    along the column direction G (PS3.3 C.8.2.1.1.1 GantryDetectorTilt).  Such
    a stack is resampled (see :func:`_deshear`); any other departure of the
    positions from the line along the slice normal is refused.
    """
    frames = [fr for volume in grid for fr in volume]
    first = grid[0][0].position
    offsets = np.array([fr.position - first for fr in frames])
    along = offsets @ normal
    lateral = offsets - np.outer(along, normal)
    distance = np.linalg.norm(lateral, axis=1)
    angles = np.degrees(np.arctan2(distance, np.maximum(np.abs(along), 1e-12)))
    sheared = (distance > SHEAR_TOLERANCE_MM) & (angles > SHEAR_TOLERANCE_DEG)
    if not sheared.any():
        return 0.0
    worst = int(np.argmax(np.where(sheared, distance, 0.0)))
    stated = f"; GantryDetectorTilt {ref.tilt:g}" if ref.tilt else ""
    what = (
        f"gantry tilt or sheared stack: slice positions run {angles[worst]:.2f} degrees off "
        f"the slice normal ({frames[worst].describe()} lies {distance[worst]:.2f} mm beside it"
        f"{stated})"
    )
    across = np.abs(lateral @ f)
    if float(np.max(across)) > SHEAR_TOLERANCE_MM:
        raise ConversionError(
            f"{what}, and {float(np.max(across)):.2f} mm along the rows (F) too: only a shear "
            "along the columns (G), as a CT gantry tilt makes, is resampled"
        )
    if len(grid) > 1:
        raise ConversionError(f"{what}: a sheared stack is resampled only in a single volume")
    depth = len(grid[0])
    drift = lateral @ g
    step = float(drift[-1] - drift[0]) / (depth - 1)
    residual = drift - drift[0] - step * np.arange(depth)
    if float(np.max(np.abs(residual))) > SHEAR_TOLERANCE_MM:
        raise ConversionError(f"{what}, by unequal amounts from slice to slice: not resampled")
    return step / ref.pixel_spacing[0]


@dataclass
class _Layout:
    grid: list[list[_Frame]]  # [t][k]
    first: FloatVector
    last: FloatVector
    normal: FloatVector
    slice_step: float | None
    shear_rows: float = 0.0  # rows each slice lies further along G than the one before


def _layout(frames: list[_Frame]) -> _Layout:
    reference = frames[0]
    f = _unit(np.array(reference.orientation[:3]))
    g = _unit(np.array(reference.orientation[3:]))
    if abs(float(f @ g)) > 1e-2:
        raise ConversionError(
            "ImageOrientationPatient row and column directions are not perpendicular"
        )
    normal = _unit(np.cross(f, g))
    s = np.array([float(fr.position @ normal) for fr in frames])
    order = np.argsort(s, kind="stable")

    # Group frames at (nearly) the same position along the normal.
    positions: list[list[_Frame]] = []
    centres: list[float] = []
    for idx in order:
        if centres and s[idx] - centres[-1] < SAME_POSITION_MM:
            positions[-1].append(frames[idx])
        else:
            positions.append([frames[idx]])
            centres.append(float(s[idx]))

    counts = Counter(len(group) for group in positions)
    repeats = max(counts, key=lambda c: (counts[c], c))
    if len(counts) > 1 and repeats == 1:
        k = next(k for k, group in enumerate(positions) if len(group) > 1)
        names = ", ".join(fr.describe() for fr in positions[k][:4])
        raise ConversionError(
            f"duplicate slices: {len(positions[k])} images at s = {centres[k]:.2f} mm ({names})"
        )
    if len(counts) > 1:
        odd = [
            (centres[k], len(group)) for k, group in enumerate(positions) if len(group) != repeats
        ]
        where = ", ".join(f"s = {c:.2f} mm has {n}" for c, n in odd[:5])
        raise ConversionError(
            f"incomplete volumes: {len(positions)} slice positions hold {repeats} images each "
            f"except {where}: missing or duplicate images"
        )
    if repeats > 1:
        for k, group in enumerate(positions):
            group.sort(key=lambda fr: fr.temporal)
            keys = [fr.temporal for fr in group]
            if len(set(keys)) != len(keys):
                names = ", ".join(fr.describe() for fr in group[:4])
                raise ConversionError(
                    f"duplicate slices: {len(group)} images at s = {centres[k]:.2f} mm ({names}) "
                    "that no temporal position, trigger or acquisition time tells apart"
                )

    grid = [[group[t] for group in positions] for t in range(repeats)]
    first, last = grid[0][0].position, grid[0][-1].position
    step: float | None = None
    if len(positions) > 1:
        gaps = np.diff(np.array(centres))
        step = (centres[-1] - centres[0]) / (len(positions) - 1)
        if float(np.max(np.abs(gaps - step))) > SLICE_TOLERANCE_MM:
            raise ConversionError(
                f"slice spacing is not uniform within {SLICE_TOLERANCE_MM} mm: "
                + _gap_report(centres, gaps)
            )
        shear_rows = _shear(grid, normal, f, g, reference)
        if shear_rows:
            return _Layout(grid, first, last, normal, step, shear_rows)
    return _Layout(grid, first, last, normal, step)


# ------------------------------------------------------------------------------ pixel data


@dataclass
class _Plan:
    """How stored values become voxels."""

    out_dtype: np.dtype[Any]
    slope: float | None  # uniform rescale, or None when it varies
    intercept: float | None
    in_place: bool  # stored values are read straight into the output array


def _plan(frames: Sequence[_Frame]) -> _Plan:
    dtypes = {fr.source.dtype for fr in frames}
    rescales = {(fr.slope, fr.intercept) for fr in frames}
    if len(rescales) == 1 and len(dtypes) == 1:
        slope, intercept = next(iter(rescales))
        stored = next(iter(dtypes))
        if stored.itemsize <= 2 and slope.is_integer() and intercept.is_integer():
            return _Plan(stored, slope, intercept, in_place=True)
        return _Plan(np.dtype(np.float32), slope, intercept, in_place=False)
    return _Plan(np.dtype(np.float32), None, None, in_place=False)


def _readinto(fh: io.FileIO, target: npt.NDArray[Any]) -> None:
    view = target.data.cast("B")
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise ConversionError(f"{getattr(fh, 'name', 'file')}: pixel data is truncated")
        done += n


def _decoded(src: _Source) -> npt.NDArray[Any]:
    """All frames of a file decoded by pydicom (compressed or unusual encodings)."""
    try:
        ds = dcmread(src.path, force=True)
        array = ds.pixel_array
    except Exception as exc:  # decoders raise many types
        raise ConversionError(f"{src.path.name}: cannot decode the pixel data ({exc})") from exc
    return np.asarray(array).reshape(src.frames, src.rows, src.cols)


class _FileFrames:
    """Stored 2-D frames of one source, read straight from the file when possible."""

    def __init__(self, src: _Source) -> None:
        self.src = src
        self._fh: io.FileIO | None = None
        self._decoded: npt.NDArray[Any] | None = None
        self._mosaic: npt.NDArray[Any] | None = None

    def __enter__(self) -> _FileFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()
        self._decoded = self._mosaic = None

    def _raw_frame(self, index: int, target: npt.NDArray[Any]) -> None:
        src = self.src
        if src.stored is not None:
            np.copyto(target, src.stored[index])  # read ahead: already sign-extended
            if src.added:
                with np.errstate(over="ignore"):
                    target -= _wrapped(src.added, target.dtype)  # exact: modular
            return
        if src.offset is not None and src.byte_order is not None:
            if self._fh is None:
                self._fh = open(src.path, "rb", buffering=0)  # noqa: SIM115 - closed in __exit__
            self._fh.seek(src.offset + index * src.rows * src.cols * src.dtype.itemsize)
            _readinto(self._fh, target)
            if src.byte_order == ">" and src.dtype.itemsize > 1:
                target.byteswap(inplace=True)
        else:
            if self._decoded is None:
                self._decoded = _decoded(src)
            np.copyto(target, self._decoded[index], casting="unsafe")
        if src.sign_bits:
            target <<= src.sign_bits
            target >>= src.sign_bits

    def read(self, frame: _Frame, target: npt.NDArray[Any]) -> None:
        """Stored values of ``frame`` into ``target`` (shape rows x cols, stored dtype)."""
        src = self.src
        if not src.mosaic_tiles:
            self._raw_frame(frame.index, target)
            return
        if self._mosaic is None:
            self._mosaic = np.empty((src.rows, src.cols), src.dtype)
            self._raw_frame(0, self._mosaic)
        r0 = (frame.index // src.mosaic_tiles) * frame.rows
        c0 = (frame.index % src.mosaic_tiles) * frame.cols
        target[...] = self._mosaic[r0 : r0 + frame.rows, c0 : c0 + frame.cols]

    def extremes(self, frame: _Frame) -> tuple[int, int] | None:
        """(min, max) of the stored values of ``frame`` when known from reading ahead."""
        src = self.src
        if src.extremes is None or src.mosaic_tiles:
            return None  # a tile's range is not its mosaic's
        return src.extremes[frame.index]


def read_ahead(src: _Source, buffer: npt.NDArray[Any] | None = None, *, intercept: int = 0) -> None:
    """Read every frame's stored values of ``src`` now, and their extremes.

    What :func:`_load` would read from the file later, byte for byte, into
    ``buffer`` (frames x rows x cols of the stored type) or a new array.  A file
    whose pixels cannot be read is left alone, so that the same error is raised
    at the same point of the checks as without reading ahead.  A 16-bit file
    whose own rescale is ``stored + intercept`` can have the intercept added at
    once (modulo 2**16, undone exactly where the stored values are needed), so
    that a CT is in Hounsfield units before its last slice arrives.
    """
    shape = (src.frames, src.rows, src.cols)
    stored = np.empty(shape, src.dtype) if buffer is None else buffer
    if stored.shape != shape or stored.dtype != src.dtype:
        raise ValueError(f"a {stored.dtype} buffer of {stored.shape} for {src.dtype} {shape}")
    try:
        with _FileFrames(src) as reader:
            for index in range(src.frames):
                reader._raw_frame(index, stored[index])
    except (ConversionError, OSError):
        return
    flat = stored.reshape(src.frames, -1)
    src.extremes = list(zip(flat.min(axis=1).tolist(), flat.max(axis=1).tolist(), strict=True))
    if intercept and stored.dtype.itemsize == 2:
        with np.errstate(over="ignore"):
            stored += _wrapped(intercept, stored.dtype)
        src.added = intercept
    src.stored = stored


def _fits(dtype: np.dtype[Any], low: float, high: float) -> bool:
    info = np.iinfo(dtype)
    return info.min <= low and high <= info.max


def _allocate(shape: tuple[int, ...], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """An uninitialised array; large ones are mapped with their pages populated at once.

    Faulting 150 MB in page by page costs 0.06 s, and numpy's transparent huge
    pages sometimes 0.1-0.3 s when the kernel has to compact memory first;
    MAP_POPULATE (Linux) costs a steady 0.04 s.
    """
    size = math.prod(shape) * dtype.itemsize
    if size < 1 << 24:
        return np.empty(shape, dtype)
    return populated(size).view(dtype).reshape(shape)


def populated(size: int) -> npt.NDArray[np.uint8]:
    """``size`` bytes of anonymous memory, faulted in at once where Linux allows it."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if not populate:
        return np.empty(size, np.uint8)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate
    return np.frombuffer(mmap.mmap(-1, size, flags=flags), np.uint8)


def _load(layout: _Layout, plan: _Plan) -> tuple[npt.NDArray[Any], str]:
    grid = layout.grid
    times, depth = len(grid), len(grid[0])
    rows, cols = grid[0][0].rows, grid[0][0].cols
    out = _allocate((times, depth, rows, cols), plan.out_dtype)

    by_source: dict[int, list[tuple[_Frame, int, int]]] = {}
    sources: dict[int, _Source] = {}
    for t, volume in enumerate(grid):
        for k, fr in enumerate(volume):
            by_source.setdefault(id(fr.source), []).append((fr, t, k))
            sources[id(fr.source)] = fr.source

    # A bare intercept on 16-bit values (CT) is added to each slice while it is
    # still in cache: modular arithmetic, exact whenever the result fits 16 bits,
    # and undone below if it does not.
    shift = None
    if plan.in_place and plan.slope == 1 and plan.intercept and out.dtype.itemsize == 2:
        shift = _wrapped(int(plan.intercept), out.dtype)
    low, high = math.inf, -math.inf
    for key, items in by_source.items():
        src = sources[key]
        items.sort(key=lambda item: item[0].index)  # sequential reads
        scratch = None if plan.in_place else np.empty((rows, cols), src.dtype)
        with _FileFrames(src) as reader, np.errstate(over="ignore"):
            for fr, t, k in items:
                if scratch is None:
                    target = out[t, k]
                    reader.read(fr, target)
                    extremes = reader.extremes(fr)
                    if extremes is None:
                        extremes = int(target.min()), int(target.max())
                    low, high = min(low, extremes[0]), max(high, extremes[1])
                    if shift is not None:
                        target += shift
                else:
                    reader.read(fr, scratch)
                    values = scratch * np.float64(fr.slope) + np.float64(fr.intercept)
                    np.copyto(out[t, k], values, casting="unsafe")
        src.stored = src.extremes = None  # in the output now: free it
        src.added = 0
    if not plan.in_place:
        return out, "float32 (rescale is not integral or varies between slices)"
    return _rescale_integers(out, plan, low, high, shifted=shift)


def _wrapped(value: int, dtype: np.dtype[Any]) -> Any:
    """``value`` modulo 2**bits as a scalar of ``dtype`` (exact when the final result fits)."""
    bits = dtype.itemsize * 8
    value %= 1 << bits
    if dtype.kind == "i" and value >= 1 << (bits - 1):
        value -= 1 << bits
    return dtype.type(value)


_INTEGER_TYPES = (np.dtype(np.int16), np.dtype(np.uint16))


def _integer_how(slope: int, intercept: int) -> str:
    return f"stored x {slope} + {intercept}" if (slope, intercept) != (1, 0) else "stored values"


def _take_planes(layout: _Layout, plan: _Plan) -> tuple[Planes, str] | None:
    """The planes read ahead as the voxels themselves, rescaled in place: no copy.

    Only where :func:`_load` would give the same values without interpolation:
    16-bit stored values of single-frame files (no mosaic), an integral rescale
    whose results fit 16 bits, no shear.  The planes become the volume's: their
    sources forget them (a later build reads the files again).  None otherwise.
    """
    if not plan.in_place or layout.shear_rows or plan.out_dtype.itemsize != 2:
        return None
    frames = [fr for volume in layout.grid for fr in volume]
    sources = [fr.source for fr in frames]
    for src in sources:
        if src.stored is None or src.extremes is None or src.frames != 1 or src.mosaic_tiles:
            return None
    if len({id(src) for src in sources}) != len(sources):
        return None
    assert plan.slope is not None and plan.intercept is not None
    slope, intercept = int(plan.slope), int(plan.intercept)
    low = min(src.extremes[0][0] for src in sources if src.extremes)
    high = max(src.extremes[0][1] for src in sources if src.extremes)
    a, b = low * slope + intercept, high * slope + intercept
    candidate = next((c for c in _INTEGER_TYPES if _fits(c, min(a, b), max(a, b))), None)
    if candidate is None:
        return None  # float32: _load widens
    planes = []
    with np.errstate(over="ignore"):
        for src in sources:
            assert src.stored is not None
            # Same width: modular arithmetic in place is exact because the results fit.
            plane = src.stored[0].view(candidate)
            added, src.stored, src.extremes, src.added = src.added, None, None, 0
            if slope != 1:
                if added:
                    plane -= _wrapped(added, candidate)
                plane *= _wrapped(slope, candidate)
                added = 0
            if intercept != added:
                plane += _wrapped(intercept - added, candidate)
            planes.append(plane)
    grid = layout.grid
    shape = (len(grid), len(grid[0]), frames[0].rows, frames[0].cols)
    return Planes(
        tuple(planes), shape, candidate
    ), f"{candidate} ({_integer_how(slope, intercept)})"


def _rescale_integers(
    out: npt.NDArray[Any], plan: _Plan, low: float, high: float, shifted: Any = None
) -> tuple[npt.NDArray[Any], str]:
    """Apply an integral rescale to stored integers, keeping the narrowest fitting type.

    ``low``/``high`` are the stored extremes; ``shifted`` is the intercept that
    was already added (modulo 2**16) to every 16-bit value, if any.
    """
    assert plan.slope is not None and plan.intercept is not None
    slope, intercept = int(plan.slope), int(plan.intercept)
    a, b = low * slope + intercept, high * slope + intercept
    low, high = min(a, b), max(a, b)
    stored = out.dtype
    identity = slope == 1 and intercept == 0
    if stored.itemsize == 1 and identity:
        return out, f"{stored} (stored values, no rescale)"
    how = _integer_how(slope, intercept)
    for candidate in _INTEGER_TYPES:
        if not _fits(candidate, low, high):
            continue
        # Same width: modular arithmetic in place gives the exact result because
        # the final values fit the type; narrower stored values are widened first.
        result = out.view(candidate) if stored.itemsize == 2 else out.astype(candidate)
        if not identity and shifted is None:
            flat = result.reshape(-1)
            with np.errstate(over="ignore"):
                for start in range(0, flat.shape[0], _CHUNK):
                    part = flat[start : start + _CHUNK]
                    if slope != 1:
                        part *= _wrapped(slope, candidate)
                    part += _wrapped(intercept, candidate)
        return result, f"{candidate} ({how})"
    if shifted is not None:
        with np.errstate(over="ignore"):
            out -= shifted  # back to the stored values
    widened = out.astype(np.float32)
    widened *= np.float32(slope)
    widened += np.float32(intercept)
    return widened, f"float32 (values {low:g}..{high:g} do not fit 16 bits)"


# --------------------------------------------------------------------------------- volume


def _repetition_time(ds: Dataset) -> float | None:
    tr = _float(ds.get("RepetitionTime"))
    if tr is None:
        shared = _item(ds, "SharedFunctionalGroupsSequence")
        timing = _item(shared, "MRTimingAndRelatedParametersSequence")
        if timing is None and "PerFrameFunctionalGroupsSequence" in ds:
            timing = _item(
                ds.PerFrameFunctionalGroupsSequence[0], "MRTimingAndRelatedParametersSequence"
            )
        tr = _float(timing.get("RepetitionTime")) if timing is not None else None
    return tr / 1000.0 if tr else None


def _read_frames(paths: Sequence[Path]) -> list[_Frame]:
    if not paths:
        raise ConversionError("no files given")
    return _join_frames((Path(path), _frames_of(Path(path))) for path in paths)


def _join_frames(files: Iterable[tuple[Path, list[_Frame]]]) -> list[_Frame]:
    """The frames of each file, in the order given; the same instance twice is refused."""
    frames: list[_Frame] = []
    seen: dict[str, Path] = {}
    for path, file_frames in files:
        uid = _text(file_frames[0].source.ds, "SOPInstanceUID") or ""
        if uid and uid in seen:
            raise ConversionError(
                f"duplicate slices: {path.name} and {seen[uid].name} are the same instance ({uid})"
            )
        seen[uid] = path
        frames.extend(file_frames)
    return frames


def _strip_pixels(volumes: Sequence[Volume]) -> None:
    for volume in volumes:
        for ds in volume.headers:
            if "PixelData" in ds:
                del ds.PixelData  # keep headers light; pixels live in the voxel array


def build_volume(paths: Sequence[Path]) -> Volume:
    """Read, check and stack one series into a :class:`Volume` (see the module docstring).

    Headers are parsed first with the pixel data deferred; pixels are then read
    straight into the output array (or decoded with pydicom for compressed
    transfer syntaxes).  Raises :class:`ConversionError` with a readable reason
    when the files do not make one regular volume.
    """
    volume = _assemble(_read_frames(paths))
    _strip_pixels([volume])
    return volume


def _split_key(frame: _Frame) -> tuple[str, str]:
    # Only the dimensions dcm2niix writes as separate files of one acquisition
    # (_e2, _ph...).  Mixed series, orientations or matrix sizes stay in one
    # group, for _assemble to refuse: they are not parts of one volume.
    return frame.echo, frame.image_type


@dataclass(frozen=True, eq=False)
class SeriesPart:
    """One of the volumes dcm2niix writes for a series it splits (one echo, one image type...).

    ``number`` counts from 1 in the order of :func:`split_series`; ``echo_number``
    is EchoNumbers (or the rank of the echo time when the files carry none),
    ``echo_time`` in ms; ``image_type`` is ImageType (FrameType) as stored;
    ``suffix`` is the file-name suffix dcm2niix would add (``_e2``, ``_ph``...).
    """

    number: int
    echo_number: int | None
    echo_time: float | None
    image_type: tuple[str, ...]
    images: int
    suffix: str
    frames: tuple[_Frame, ...] = field(repr=False)


def _part_order(frames: Sequence[_Frame]) -> tuple[float, float, str]:
    first = frames[0]
    number = first.echo_number if first.echo_number is not None else math.inf
    time = first.echo_time if first.echo_time is not None else math.inf
    return number, time, first.image_type


_PHASE_TYPES = {"P", "PHASE"}
_REAL_TYPES = {"R", "REAL"}
_IMAGINARY_TYPES = {"I", "IMAGINARY"}
_FIELD_MAP_TYPES = {"FIELD_MAP", "B0", "B0MAP"}


def _type_suffix(image_type: str) -> str:
    values = set(image_type.split("\\"))
    if values & _PHASE_TYPES:
        return "_ph"
    if values & _REAL_TYPES:
        return "_real"
    if values & _IMAGINARY_TYPES:
        return "_imaginary"
    if values & _FIELD_MAP_TYPES:
        return "_fieldmap"
    return ""


def _parts(frames: list[_Frame]) -> list[SeriesPart]:
    groups: dict[tuple[Any, ...], list[_Frame]] = {}
    for frame in frames:
        groups.setdefault(_split_key(frame), []).append(frame)
    # Echo number, echo time, image type: the order of dcm2niix's _e1, _e2...,
    # and independent of the order the files arrived in.
    ordered = sorted(groups.values(), key=_part_order)
    echoes = sorted(
        {(f[0].echo_number, f[0].echo_time) for f in ordered if f[0].echo_time is not None},
        key=_echo_sort,
    )
    types = {f[0].image_type for f in ordered}
    parts = []
    for number, group in enumerate(ordered, start=1):
        first = group[0]
        echo_number: int | None = None
        if first.echo_number is not None:
            echo_number = int(first.echo_number)
        elif first.echo_time is not None:
            echo_number = echoes.index((None, first.echo_time)) + 1
        suffix = f"_e{echo_number}" if len(echoes) > 1 and echo_number is not None else ""
        if len(types) > 1:
            suffix += _type_suffix(first.image_type)
        parts.append(
            SeriesPart(
                number=number,
                echo_number=echo_number,
                echo_time=first.echo_time,
                image_type=first.image_type_values,
                images=len(group),
                suffix=suffix,
                frames=tuple(group),
            )
        )
    suffixes = [p.suffix for p in parts]
    if len(set(suffixes)) != len(suffixes):
        # Image types without a dcm2niix name (e.g. ORIGINAL vs DERIVED maps): number them.
        parts = [replace(p, suffix=f"{p.suffix}_i{p.number}") for p in parts]
    return parts


def _echo_sort(echo: tuple[float | None, float | None]) -> tuple[float, float]:
    number, time = echo
    return (math.inf if number is None else number, math.inf if time is None else time)


def split_series(paths: Sequence[Path]) -> list[SeriesPart]:
    """The volumes dcm2niix would write for these files, from their headers only.

    Frames are grouped by echo and image type (ImageType / FrameType values
    3 and up, e.g. magnitude vs. phase or field map) and ordered by echo
    number, then echo time, then image type (dcm2niix's ``_e1``/``_e2``/...
    order).  No pixel data is read: :func:`build_part` stacks one part.
    """
    return _parts(_read_frames(paths))


def build_part(part: SeriesPart) -> Volume:
    """Stack one part of :func:`split_series` (``ConversionError`` if it is not one volume)."""
    volume = _assemble(list(part.frames))
    _strip_pixels([volume])
    return volume


def build_volumes(paths: Sequence[Path]) -> list[Volume]:
    """Like :func:`build_volume`, but split what dcm2niix would split into several outputs.

    One volume per :class:`SeriesPart` of :func:`split_series`, in its order;
    each part must make one regular volume on its own, else :class:`ConversionError`.
    """
    return [build_part(part) for part in split_series(paths)]


def _deshear(
    voxels: npt.NDArray[Any], layout: _Layout, reference: _Frame
) -> tuple[npt.NDArray[Any], float, str]:
    """Resample a gantry-tilted stack onto the orthogonal grid (F, G, slice normal).

    Slice k's row j lies at ``k * shear + j`` rows along G from the first
    slice's origin; each slice is shifted back along G by linear interpolation
    between neighbouring rows, with as many rows added as the whole stack
    drifts (the volume's lowest value outside the scanned field), as dcm2niix
    does for its ``_Tilt`` output.  The new grid is aligned with the slice
    that lies furthest along G, as dcm2niix's is.  Returns the voxels, the
    grid's first row in rows along G from the first slice's origin, and a note.
    """
    data = voxels[0]  # one volume: _shear refuses sheared time series
    depth, rows, cols = data.shape
    drift = layout.shear_rows * np.arange(depth)
    added = math.ceil(abs(float(drift[-1])) - 1e-6)
    start = float(drift.max()) - added
    out = np.empty((depth, rows + added, cols), data.dtype)
    fill = data.min()
    integral = data.dtype.kind in "iu"
    target = np.arange(rows + added, dtype=np.float64)
    for k in range(depth):
        source = target + (start - drift[k])  # input row of each output row, fractional
        # Rows up to one pixel before the first repeat it (as dcm2niix's do); none past the last.
        inside = (source > -1.0 + 1e-6) & (source < rows - 1 + 1e-6)
        upper = np.clip(np.ceil(source - 1e-6), 0, rows - 1).astype(np.intp)
        lower = np.maximum(upper - 1, 0)
        weight = np.clip(upper - source, 0.0, 1.0)[:, None]  # share of the lower row
        values = data[k, upper] * (1.0 - weight) + data[k, lower] * weight
        if integral:
            values = np.sign(values) * np.floor(np.abs(values) + 0.5)  # half away from zero
        out[k] = fill
        out[k, inside] = values[inside].astype(data.dtype)
    angle = math.degrees(
        math.atan(abs(layout.shear_rows) * reference.pixel_spacing[0] / (layout.slice_step or 1.0))
    )
    note = (
        f"gantry-tilt {angle:.2f} deg (measured from ImagePositionPatient"
        + (f", GantryDetectorTilt {reference.tilt:g}" if reference.tilt else "")
        + f"): each slice shifted along the columns by linear interpolation onto an orthogonal "
        f"grid, {added} rows added"
    )
    return out[np.newaxis], start, note


def _assemble(frames: list[_Frame]) -> Volume:
    _check_uniform(frames)
    layout = _layout(frames)
    plan = _plan(frames)
    voxels: npt.NDArray[Any] | Planes
    voxels, how = _take_planes(layout, plan) or _load(layout, plan)

    reference = layout.grid[0][0]
    f = np.array(reference.orientation[:3])
    g = np.array(reference.orientation[3:])
    depth = len(layout.grid[0])
    origin = layout.first
    resampled = None
    if layout.shear_rows:
        assert not isinstance(voxels, Planes)  # sheared stacks are never taken as planes
        voxels, start, resampled = _deshear(voxels, layout, reference)
        origin = layout.first + start * reference.pixel_spacing[0] * _unit(g)
    if layout.shear_rows and layout.slice_step:
        k_vector = layout.normal * layout.slice_step
    elif depth > 1:
        k_vector = (layout.last - layout.first) / (depth - 1)
    else:
        thickness = reference.spacing_between or reference.thickness or 1.0
        k_vector = layout.normal * thickness
    row_spacing, col_spacing = reference.pixel_spacing
    spacing = (
        col_spacing * float(np.linalg.norm(f)),
        row_spacing * float(np.linalg.norm(g)),
        float(np.linalg.norm(k_vector)),
    )
    columns = (_unit(f), _unit(g), _unit(k_vector))
    rows_of = [(float(columns[0][r]), float(columns[1][r]), float(columns[2][r])) for r in range(3)]
    direction = (rows_of[0], rows_of[1], rows_of[2])

    headers: list[Dataset] = []
    known: set[int] = set()
    for fr in layout.grid[0] + [fr for volume in layout.grid[1:] for fr in volume]:
        if id(fr.source.ds) not in known:
            known.add(id(fr.source.ds))
            headers.append(fr.source.ds)

    times = len(layout.grid)
    repetition_time = None
    if times > 1:
        repetition_time = _repetition_time(headers[0])
        if repetition_time is None:
            starts = [min(fr.temporal[2] for fr in vol) for vol in layout.grid]
            deltas = np.diff(np.array(starts))
            if len(deltas) and np.all(np.isfinite(deltas)) and float(np.median(deltas)) > 0:
                repetition_time = float(np.median(deltas))
    elif isinstance(voxels, Planes):
        voxels = replace(voxels, shape=voxels.shape[1:])
    else:
        voxels = voxels[0]

    notes = [f"voxels: {how}"]
    if times > 1:
        notes.append(f"{times} volumes of {depth} slices")
    if reference.source.mosaic_tiles:
        notes.append("Siemens mosaic cut into slices")
    if resampled:
        notes.append(resampled)
    return Volume(
        data=voxels,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        spacing=spacing,
        direction=direction,
        headers=tuple(headers),
        repetition_time=repetition_time,
        rescale_slope=plan.slope,
        rescale_intercept=plan.intercept,
        notes=tuple(notes),
        resampled=resampled,
    )


# ---------------------------------------------------------------------------------- NIfTI


def _quaternion(rotation: FloatVector) -> tuple[float, float, float, float]:
    """(b, c, d, qfac) of a 3x3 direction matrix, as ``nifti_mat44_to_quatern`` computes them."""
    u, _, vt = np.linalg.svd(rotation)
    r = u @ vt  # the nearest orthogonal matrix (rounded cosines are rarely exactly orthogonal)
    qfac = 1.0
    if np.linalg.det(r) < 0:
        qfac = -1.0
        r[:, 2] = -r[:, 2]
    r11, r12, r13 = r[0]
    r21, r22, r23 = r[1]
    r31, r32, r33 = r[2]
    a = r11 + r22 + r33 + 1.0
    if a > 0.5:
        a = 0.5 * math.sqrt(a)
        b = 0.25 * (r32 - r23) / a
        c = 0.25 * (r13 - r31) / a
        d = 0.25 * (r21 - r12) / a
    else:
        xd = 1.0 + r11 - (r22 + r33)
        yd = 1.0 + r22 - (r11 + r33)
        zd = 1.0 + r33 - (r11 + r22)
        if xd > 1.0:
            b = 0.5 * math.sqrt(xd)
            c = 0.25 * (r12 + r21) / b
            d = 0.25 * (r13 + r31) / b
            a = 0.25 * (r32 - r23) / b
        elif yd > 1.0:
            c = 0.5 * math.sqrt(yd)
            b = 0.25 * (r12 + r21) / c
            d = 0.25 * (r23 + r32) / c
            a = 0.25 * (r13 - r31) / c
        else:
            d = 0.5 * math.sqrt(zd)
            b = 0.25 * (r13 + r31) / d
            c = 0.25 * (r23 + r32) / d
            a = 0.25 * (r21 - r12) / d
        if a < 0.0:
            b, c, d = -b, -c, -d
    return float(b), float(c), float(d), qfac


def nifti_header(volume: Volume, *, description: str = "dimse-gateway") -> bytes:
    """The 348-byte NIfTI-1 header and the 4-byte extension flag for ``volume``.

    qform and sform are both NIFTI_XFORM_SCANNER_ANAT (1), as dcm2niix writes
    them; sform holds ``volume.affine_ras`` exactly, qform its nearest rotation.
    """
    dtype = volume.dtype
    if dtype not in _NIFTI_DATATYPE:
        raise ConversionError(f"no NIfTI-1 datatype for {dtype}")
    shape = volume.shape  # (t,) k, j, i
    dims = [len(shape), shape[-1], shape[-2], shape[-3], shape[0] if len(shape) == 4 else 1]
    affine = volume.affine_ras
    b, c, d, qfac = _quaternion(np.array(volume.direction) * np.array([[-1.0], [-1.0], [1.0]]))
    repetition = (volume.repetition_time or 0.0) if len(shape) == 4 else 0.0
    pixdim = [qfac, *volume.spacing, repetition]

    header = bytearray(NIFTI_HEADER_SIZE)
    struct.pack_into("<i", header, 0, 348)
    header[38] = ord("r")  # "regular", as every writer sets it
    struct.pack_into("<8h", header, 40, *(dims + [1] * (8 - len(dims))))
    struct.pack_into("<hh", header, 70, _NIFTI_DATATYPE[dtype], dtype.itemsize * 8)
    struct.pack_into("<8f", header, 76, *(pixdim + [0.0] * (8 - len(pixdim))))
    struct.pack_into("<fff", header, 108, float(NIFTI_HEADER_SIZE), 1.0, 0.0)  # vox_offset, scl
    header[123] = 2 | 8  # xyzt_units: mm and s
    descrip = description.encode("ascii", "replace")[:79]
    header[148 : 148 + len(descrip)] = descrip
    struct.pack_into("<hh", header, 252, 1, 1)  # qform_code, sform_code: scanner anatomical
    struct.pack_into("<6f", header, 256, b, c, d, *affine[:3, 3])
    struct.pack_into("<12f", header, 280, *affine[:3, :].reshape(-1))
    header[344:348] = b"n+1\0"
    # bytes 348..351: extension flag 0 (no extensions)
    return bytes(header)


def nifti_size(volume: Volume) -> int:
    """Size in bytes of the uncompressed ``.nii`` (for Content-Length)."""
    return NIFTI_HEADER_SIZE + volume.nbytes


def _voxel_chunks(volume: Volume) -> Iterator[memoryview]:
    planes = volume.data
    if isinstance(planes, Planes) and planes.dtype.byteorder != ">":
        # One slice per chunk, straight from the buffer it was read into.
        for plane in planes.arrays:
            yield np.ascontiguousarray(plane).reshape(-1).view(np.uint8).data
        return
    voxels = volume.voxels
    if voxels.dtype.byteorder == ">" or not voxels.flags.c_contiguous:
        voxels = np.ascontiguousarray(voxels, dtype=voxels.dtype.newbyteorder("<"))
    data = voxels.reshape(-1).view(np.uint8).data
    for start in range(0, len(data), _CHUNK):
        yield data[start : start + _CHUNK]


def _pieces(volume: Volume) -> Generator[Chunk, None, None]:
    yield nifti_header(volume)
    yield from _voxel_chunks(volume)


class _Collector(io.RawIOBase):
    """Write end for ISA-L's threaded gzip writer; its writer thread appends, we drain."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: deque[bytes] = deque()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        part = bytes(data)
        self._parts.append(part)
        return len(part)

    def drain(self) -> Iterator[bytes]:
        while self._parts:
            yield self._parts.popleft()


def _deflate_threaded(
    pieces: Iterator[Chunk], level: int, threads: int
) -> Generator[bytes, None, None]:
    from isal import igzip_threaded  # deferred: only .nii.gz needs it

    sink = _Collector()
    # One gzip member; blocks are deflated in parallel with the previous block as
    # dictionary (as pigz does), so any gzip reader opens it.
    writer = igzip_threaded.open(  # type: ignore[no-untyped-call]  # isal leaves it unannotated
        sink, "wb", compresslevel=level, threads=threads
    )
    try:
        for piece in pieces:
            writer.write(piece)
            yield from sink.drain()
        writer.close()
        yield from sink.drain()
    finally:
        writer.close()


def _deflate(pieces: Iterator[Chunk], level: int) -> Generator[bytes, None, None]:
    from isal import isal_zlib  # deferred: only .nii.gz needs it

    deflate = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 16 + isal_zlib.MAX_WBITS)
    for piece in pieces:
        out = deflate.compress(piece)
        if out:
            yield out
    yield deflate.flush()


def to_nifti(
    volume: Volume, *, compress: bool, level: int = 1, threads: int = 2
) -> Generator[Chunk, None, None]:
    """Stream ``volume`` as a NIfTI-1 file (``.nii``, or ``.nii.gz`` with ``compress``).

    Uncompressed chunks are the header and then memoryviews of the voxel array
    (no copy, at most 4 MiB each).  Compressed output is one standard gzip
    member deflated by ISA-L (package ``isal``) at ``level`` 0..3, on
    ``threads`` threads (the GIL is released while compressing; 1 = inline),
    in chunks of about 1 MiB.  On CT, level 1 gives about 54 % of the size at
    several hundred MB/s per thread (docs/benchmarks.md).
    """
    if not 0 <= level <= 3:
        raise ValueError(f"ISA-L compression level must be 0..3, not {level}")
    pieces = _pieces(volume)
    if not compress:
        return pieces
    if threads > 1:
        return _deflate_threaded(pieces, level, threads)
    return _deflate(pieces, level)


def write_nifti(
    volume: Volume, path: Path, *, compress: bool | None = None, level: int = 1, threads: int = 2
) -> Path:
    """Write ``volume`` to ``path`` (compressed when the name ends in ``.gz`` unless told)."""
    if compress is None:
        compress = path.name.endswith(".gz")
    with open(path, "wb") as fh:
        for chunk in to_nifti(volume, compress=compress, level=level, threads=threads):
            fh.write(chunk)
    return path
