"""DICOM series to NIfTI-1 (and its BIDS sidecar), free of HTTP.

:func:`build_volume` reads and checks one series into a :class:`Volume` (LPS
geometry, voxels with the rescale applied) or raises
:class:`app.errors.ConversionError`; :func:`to_nifti` streams it as ``.nii`` or
``.nii.gz``; :func:`sidecar` gives the BIDS JSON dcm2niix would write.
"""

from app.convert.nifti import (
    Chunk,
    Volume,
    build_volume,
    build_volumes,
    nifti_header,
    nifti_size,
    to_nifti,
    write_nifti,
)
from app.convert.sidecar import sidecar

__all__ = [
    "Chunk",
    "Volume",
    "build_volume",
    "build_volumes",
    "nifti_header",
    "nifti_size",
    "sidecar",
    "to_nifti",
    "write_nifti",
]
