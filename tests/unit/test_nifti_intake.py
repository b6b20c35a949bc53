"""app.convert.intake: a series read file by file as it arrives converts exactly as after.

Each case feeds the files to a SeriesIntake in a shuffled arrival order and in
uneven batches, and compares every part, volume, NIfTI byte and refusal with
split_series / build_part on the same files in the same order.
"""

from __future__ import annotations

import copy
import gzip
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from app.convert.intake import SeriesIntake, _Slabs
from app.convert.nifti import Planes, Volume, build_part, split_series, to_nifti
from app.errors import ConversionError
from tests.unit.test_nifti import (
    _ct,
    _enhanced,
    _mr,
    _renew_uid,
    _tilted,
    _two_volumes,
    _write,
)


def _arrival(paths: list[Path], seed: int) -> list[Path]:
    order = list(paths)
    random.Random(seed).shuffle(order)
    return order


def _intake(paths: list[Path], seed: int = 0) -> SeriesIntake:
    intake = SeriesIntake()
    rng = random.Random(seed)
    start = 0
    while start < len(paths):  # batches of 1 to 4, as arrivals pile up behind a read
        size = rng.randint(1, 4)
        intake.add(paths[start : start + size])
        start += size
    return intake


def _nifti(volume: Volume, compress: bool = False) -> bytes:
    return b"".join(bytes(chunk) for chunk in to_nifti(volume, compress=compress))


def _assert_same(ours: Volume, reference: Volume) -> None:
    assert ours.shape == reference.shape
    assert ours.dtype == reference.dtype
    assert ours.notes == reference.notes
    assert ours.resampled == reference.resampled
    assert ours.repetition_time == reference.repetition_time
    assert (ours.rescale_slope, ours.rescale_intercept) == (
        reference.rescale_slope,
        reference.rescale_intercept,
    )
    assert [ds.SOPInstanceUID for ds in ours.headers] == [
        ds.SOPInstanceUID for ds in reference.headers
    ]
    np.testing.assert_array_equal(ours.affine_ras, reference.affine_ras)
    assert _nifti(ours) == _nifti(reference)
    np.testing.assert_array_equal(ours.voxels, reference.voxels)


def _rescaled(slope: str, intercept: str) -> Callable[[list[Dataset]], list[Dataset]]:
    def apply(datasets: list[Dataset]) -> list[Dataset]:
        for ds in datasets:
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        return datasets

    return apply


def _varying(datasets: list[Dataset]) -> list[Dataset]:
    for index, ds in enumerate(datasets):
        ds.RescaleSlope, ds.RescaleIntercept = str(index + 1), "0"
    return datasets


def _varying_intercepts(datasets: list[Dataset]) -> list[Dataset]:
    for index, ds in enumerate(datasets):
        ds.RescaleSlope, ds.RescaleIntercept = "1", str(-1024 + index)
    return datasets


def _beyond_int16(datasets: list[Dataset]) -> list[Dataset]:
    for ds in datasets:
        pixels = ds.pixel_array.astype(np.uint16) * 40  # up to ~43000
        ds.BitsStored, ds.HighBit = 16, 15
        ds.PixelData = pixels.tobytes()
    return datasets


CASES: dict[str, tuple[Callable[[], list[Dataset]], type | None]] = {
    # name: (the series, the voxel type when it is taken as planes, else None)
    "ct in HU": (lambda: _ct(slices=12), np.int16),
    "ct into uint16": (lambda: _rescaled("1", "40000")(_ct(slices=5)), np.uint16),
    "ct beyond 16 bits": (lambda: _rescaled("1", "-40000")(_ct(slices=5)), None),
    "ct varying intercepts": (lambda: _varying_intercepts(_ct(slices=5)), None),
    "oblique mr": (lambda: _mr(), np.int16),
    "mr uint16": (lambda: _beyond_int16(_mr(slices=4)), np.uint16),
    "mr slope x2": (lambda: _rescaled("2", "-7")(_mr(slices=4)), np.int16),
    "mr fraction": (lambda: _rescaled("0.5", "-3.25")(_mr(slices=4)), None),
    "mr varying": (lambda: _varying(_mr(slices=4)), None),
    "mr wide": (lambda: _rescaled("100", "0")(_mr(slices=3)), None),
    "4d": (lambda: _two_volumes(_mr(slices=5, rows=32, cols=32)), np.int16),
    "gantry tilt": (lambda: _tilted(_ct(slices=9, rows=40, cols=24), 15.0), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_volume_as_converting_afterwards(tmp_path: Path, name: str) -> None:
    make, planes = CASES[name]
    arrival = _arrival(_write(make(), tmp_path), seed=len(name))
    (reference_part,) = split_series(arrival)
    reference = build_part(reference_part)

    (part,) = _intake(arrival, seed=len(name)).parts()
    assert part.suffix == reference_part.suffix and part.images == reference_part.images
    ours = build_part(part)
    # The slices read ahead are the voxels themselves where no copy is needed.
    assert isinstance(ours.data, Planes) == (planes is not None)
    if planes is not None:
        assert ours.dtype == planes
    _assert_same(ours, reference)
    # The planes became the volume's: building the part again reads the files.
    _assert_same(build_part(part), reference)


def test_planes_stream_as_one_gzip_and_stack_on_demand(tmp_path: Path) -> None:
    arrival = _arrival(_write(_ct(slices=7), tmp_path), seed=1)
    reference = build_part(split_series(arrival)[0])
    volume = build_part(_intake(arrival).parts()[0])
    assert isinstance(volume.data, Planes) and len(volume.data.arrays) == 7
    assert gzip.decompress(_nifti(volume, compress=True)) == _nifti(reference)
    stacked = volume.voxels
    assert isinstance(volume.data, np.ndarray) and stacked.flags.c_contiguous
    np.testing.assert_array_equal(stacked, reference.voxels)


def test_enhanced_multi_frame_and_echoes_split_the_same(tmp_path: Path) -> None:
    datasets = _mr(slices=6, rows=32, cols=40)
    enhanced = tmp_path / "enhanced.dcm"
    _enhanced(datasets, [3, 0, 5, 1, 4, 2]).save_as(enhanced, enforce_file_format=True)
    (part,) = _intake([enhanced]).parts()
    _assert_same(build_part(part), build_part(split_series([enhanced])[0]))

    second = []
    for ds in _mr(slices=4, rows=32, cols=32, echo_time=90.0):
        clone = _renew_uid(ds, "echo-2")
        clone.EchoNumbers = 2
        second.append(clone)
    arrival = _arrival(_write(_mr(slices=4, rows=32, cols=32) + second, tmp_path / "e"), seed=5)
    reference = split_series(arrival)
    parts = _intake(arrival, seed=5).parts()
    assert [(p.number, p.echo_number, p.suffix, p.images) for p in parts] == [
        (p.number, p.echo_number, p.suffix, p.images) for p in reference
    ]
    for ours, theirs in zip(parts, reference, strict=True):
        _assert_same(build_part(ours), build_part(theirs))


def _refusal(build: Callable[[], object]) -> str:
    with pytest.raises(ConversionError) as info:
        build()
    return info.value.message


def _both_refuse(arrival: list[Path]) -> str:
    def after() -> object:
        return [build_part(p) for p in split_series(arrival)]

    def during() -> object:
        return [build_part(p) for p in _intake(arrival).parts()]

    expected = _refusal(after)
    assert _refusal(during) == expected
    return expected


def test_refusals_are_the_same(tmp_path: Path) -> None:
    axial = _mr(oblique=False, slices=4, rows=32, cols=32)
    oblique = [_renew_uid(ds, "oblique") for ds in _mr(oblique=True, slices=4, rows=32, cols=32)]
    mixed = _both_refuse(_arrival(_write(axial + oblique, tmp_path / "mixed"), seed=2))
    assert "mixed orientations" in mixed

    gap = _ct(slices=10)
    del gap[4]
    assert "missing slices" in _both_refuse(_arrival(_write(gap, tmp_path / "gap"), seed=3))

    uneven = _ct(slices=6)
    z = float(uneven[3].ImagePositionPatient[2])
    uneven[3].ImagePositionPatient[2] = f"{z + 0.6:g}"
    reason = _both_refuse(_arrival(_write(uneven, tmp_path / "uneven"), seed=4))
    assert "not uniform" in reason

    sheared = _tilted(_ct(slices=6, rows=32, cols=32), 10.0, axis=0)
    assert "only a shear" in _both_refuse(_write(sheared, tmp_path / "shear"))

    paths = _write(_ct(slices=4), tmp_path / "twice")
    assert "same instance" in _both_refuse([*paths[:2], paths[0], *paths[2:]])


def test_the_first_unusable_file_in_arrival_order_is_named(tmp_path: Path) -> None:
    paths = _write(_ct(slices=5), tmp_path / "ct")
    report = get_testdata_file("reportsi.dcm")
    assert report is not None
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM at all\n")
    no_pixels = copy.deepcopy(_ct(slices=1)[0])
    del no_pixels.PixelData
    (bare,) = _write([_renew_uid(no_pixels, "bare")], tmp_path / "bare")

    arrival = [paths[0], Path(report), *paths[1:3], text, bare, *paths[3:]]
    reason = _both_refuse(arrival)
    assert "reportsi.dcm" in reason and "structured report" in reason
    reason = _both_refuse([*paths[:2], text, Path(report), *paths[2:]])
    assert "notes.txt" in reason
    intake = _intake([*paths[:2], text, *paths[2:]])
    assert len(intake) == 6  # every arrival counted, none read after the refusal


def test_nothing_added_is_refused() -> None:
    with pytest.raises(ConversionError, match="no files"):
        SeriesIntake().parts()


def test_buffers_cut_from_one_block_do_not_overlap() -> None:
    slabs = _Slabs()
    buffers = [slabs.take((1, 100, 37), np.dtype(np.int16)) for _ in range(300)]
    buffers.append(slabs.take((3, 1024, 1024), np.dtype(np.uint16)))  # bigger than a block
    for index, buffer in enumerate(buffers):
        assert buffer.flags.writeable and buffer.flags.c_contiguous
        buffer[...] = index
    for index, buffer in enumerate(buffers):
        assert int(buffer.min()) == int(buffer.max()) == index
