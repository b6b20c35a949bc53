"""DICOM series to NIfTI-1 (and its BIDS sidecar), free of HTTP.

:func:`build_volume` reads and checks one series into a :class:`Volume` (LPS
geometry, voxels with the rescale applied) or raises
:class:`app.errors.ConversionError`; :func:`split_series` and
:func:`build_part` do the same for series dcm2niix writes as several files
(echoes, magnitude/phase); :func:`to_nifti` streams a volume as ``.nii`` or
``.nii.gz``; :func:`sidecar` gives the BIDS JSON dcm2niix would write.
:class:`SeriesIntake` reads a series file by file while it arrives, for
:meth:`SeriesIntake.parts` and :func:`build_part` to finish once it is complete.
"""

from app.convert.intake import SeriesIntake
from app.convert.nifti import (
    Chunk,
    Planes,
    SeriesPart,
    Volume,
    build_part,
    build_volume,
    build_volumes,
    nifti_header,
    nifti_size,
    split_series,
    to_nifti,
    write_nifti,
)
from app.convert.sidecar import sidecar

__all__ = [
    "Chunk",
    "Planes",
    "SeriesIntake",
    "SeriesPart",
    "Volume",
    "build_part",
    "build_volume",
    "build_volumes",
    "nifti_header",
    "nifti_size",
    "sidecar",
    "split_series",
    "to_nifti",
    "write_nifti",
]
