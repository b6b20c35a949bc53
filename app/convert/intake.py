"""A series converted while it arrives: each file read once, as soon as it is stored.

Converting after a retrieve means reading 300 headers and 300 slices once the
last instance is in, while the CPU sat mostly idle during the transfer.  A
:class:`SeriesIntake` is given each file as it lands (off the event loop, in
arrival order): its header is parsed there, once, into the frames the converter
works with, and its stored pixel values are read into memory with their
extremes.  When the retrieve has ended, :meth:`SeriesIntake.parts` and
:func:`app.convert.nifti.build_part` have only the checks, the sort along the
slice normal, the rescale and the copy into the output array left to do.

Nothing is decided early: the grouping into volumes, every refusal and its
reason come from the same code on the complete set, in the same order of files,
as :func:`app.convert.nifti.split_series` on the cached files would give.  A
file that cannot be read is remembered and its error raised there, as it would
have been; once one is, later files are not read any more (the first error in
arrival order is the one raised).  Memory: the stored values (the size of the
volume, for 16-bit images) until they are copied into the output array, which
frees them file by file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app.convert.nifti import (
    SeriesPart,
    _Frame,
    _frames_of,
    _join_frames,
    _parts,
    populated,
    read_ahead,
)
from app.errors import ConversionError

__all__ = ["SeriesIntake"]


@dataclass(frozen=True)
class _File:
    path: Path
    frames: list[_Frame] | None
    error: ConversionError | None


class _Slabs:
    """Buffers for the planes read ahead, cut from larger blocks mapped at once.

    A new 512x512 slice faults in 128 pages one by one; taking it from a
    block whose pages were populated in one call (MAP_POPULATE) costs a
    fraction of that, and it is paid while the series arrives.  Blocks start at
    4 MiB and double up to 64 MiB, so a small series does not reserve much; a
    block is freed with the last plane cut from it.
    """

    _FIRST = 1 << 22
    _LARGEST = 1 << 26
    _ALIGN = 64

    def __init__(self) -> None:
        self._block: npt.NDArray[np.uint8] | None = None
        self._used = 0
        self._next = self._FIRST

    def take(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
        size = math.prod(shape) * dtype.itemsize
        if self._block is None or self._used + size > len(self._block):
            self._block = populated(max(self._next, size))
            self._used = 0
            self._next = min(self._next * 2, self._LARGEST)
        start = self._used
        self._used += -(-size // self._ALIGN) * self._ALIGN
        return self._block[start : start + size].view(dtype).reshape(shape)


def _own_intercept(frames: list[_Frame]) -> int:
    """The intercept a single 16-bit slice asks to add to its stored values, else 0."""
    if len(frames) != 1 or frames[0].source.frames != 1 or frames[0].source.mosaic_tiles:
        return 0
    frame = frames[0]
    if frame.slope != 1 or not frame.intercept.is_integer():
        return 0
    return int(frame.intercept)


class SeriesIntake:
    """The files of one series, read one by one as they arrive.

    Not thread-safe: one :meth:`add` at a time (each call off the event loop),
    then :meth:`parts` once every file has been added.
    """

    def __init__(self) -> None:
        self._files: list[_File] = []
        self._failed = False
        self._slabs = _Slabs()

    def __len__(self) -> int:
        return len(self._files)

    def add(self, paths: Iterable[Path]) -> None:
        """Read the header and the stored pixels of each file, in the order given."""
        for path in paths:
            # Parsing holds the GIL; between files, let the threads that receive the
            # rest of the series (C-MOVE responses, arrivals) take it without waiting
            # for the interpreter's switch interval.
            time.sleep(0)
            if self._failed:
                # An earlier file already decides the outcome: only count this one.
                self._files.append(_File(path, None, None))
                continue
            try:
                frames = _frames_of(path)
            except ConversionError as exc:
                self._failed = True
                self._files.append(_File(path, None, exc))
                continue
            src = frames[0].source
            buffer = self._slabs.take((src.frames, src.rows, src.cols), src.dtype)
            read_ahead(src, buffer, intercept=_own_intercept(frames))
            self._files.append(_File(path, frames, None))

    def _read(self) -> Iterator[tuple[Path, list[_Frame]]]:
        for file in self._files:
            if file.error is not None:
                raise file.error
            assert file.frames is not None  # unread files only follow an error
            yield file.path, file.frames

    def parts(self) -> list[SeriesPart]:
        """What :func:`app.convert.nifti.split_series` gives for the files added, in that order.

        Raises :class:`ConversionError` as it would: for the first file (in
        arrival order) that is not a usable image, or an instance given twice.
        """
        if not self._files:
            raise ConversionError("no files given")
        return _parts(_join_frames(self._read()))
