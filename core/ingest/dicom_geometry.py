"""Plane geometry of DICOM source images and where they sit on the converted NIfTI grid.

A DICOM SEG over the original images must reference, for every slice of the segmentation, the
source image (or frame) it lies on. :func:`frame_planes` reads each frame's plane from a single- or
multi-frame (enhanced) image, and :func:`frame_voxel_indices` maps every pixel of such a plane to
the NIfTI voxel it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from core.errors import UnsupportedInputError
from core.ingest.dicom_series import int_or_none

GEOMETRY_TOLERANCE = 0.1
"""Largest misfit (voxels) accepted when placing a source image on the NIfTI grid."""


# ----------------------------------------------------------------------------------------------
# Geometry: where each source image sits on the NIfTI grid
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlaneGeometry:
    """The plane of one source image or frame, in DICOM patient coordinates (LPS, mm).

    Attributes
    ----------
    position : (3,) ImagePositionPatient, centre of the first (top-left) pixel.
    orientation : (6,) ImageOrientationPatient: row direction (along a row, i.e. increasing
        column index) then column direction (down a column, increasing row index).
    spacing : (row spacing, column spacing) from PixelSpacing, mm.
    rows, columns : image size.
    """

    position: NDArray[np.float64]
    orientation: NDArray[np.float64]
    spacing: tuple[float, float]
    rows: int
    columns: int


def frame_voxel_indices(
    plane: PlaneGeometry, *, affine: NDArray[np.float64], shape: tuple[int, int, int]
) -> NDArray[np.intp]:
    """For every pixel of a source image, the NIfTI voxel it is.

    The pixel at (row r, column c) lies at ``P + c * dc * R + r * dr * C`` (LPS), which becomes RAS+
    by negating x and y, and then a voxel index through the inverse of ``affine``. The source
    plane must lie exactly on the grid (axis-aligned, integer positions within
    :data:`GEOMETRY_TOLERANCE` voxels, inside the volume) — true for dcm2niix output of a
    single-frame or enhanced series, false for a mosaic.

    Parameters
    ----------
    plane : geometry of the source image.
    affine : (4, 4) NIfTI voxel -> world RAS+ (mm).
    shape : (X, Y, Z) grid size.

    Returns
    -------
    (3, rows, columns) integer voxel indices (i, j, k) of each source pixel.

    Raises
    ------
    UnsupportedInputError : the source plane does not coincide with a slice of the grid.
    """
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    row_dir = lps_to_ras @ plane.orientation[:3]
    col_dir = lps_to_ras @ plane.orientation[3:]
    origin = lps_to_ras @ plane.position
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    step_c = inv[:3, :3] @ (row_dir * plane.spacing[1])  # one column to the right
    step_r = inv[:3, :3] @ (col_dir * plane.spacing[0])  # one row down
    start = inv[:3, :3] @ origin + inv[:3, 3]
    rows = np.arange(plane.rows)[:, None, None]
    cols = np.arange(plane.columns)[None, :, None]
    coords = start + cols * step_c + rows * step_r  # (rows, columns, 3)
    indices = np.rint(coords)
    misfit = float(np.abs(coords - indices).max())
    for step in (step_c, step_r):
        if np.count_nonzero(np.abs(step) > GEOMETRY_TOLERANCE) != 1:
            raise UnsupportedInputError(
                "the source images are not aligned with the converted volume's slices, so the "
                "segmentation cannot be placed on them"
            )
    if misfit > GEOMETRY_TOLERANCE or indices.min() < 0 or np.any(indices.max(axis=(0, 1)) >= np.asarray(shape)):
        raise UnsupportedInputError(
            "the source images do not coincide with the converted volume's slices (mosaic or "
            "resampled images), so the segmentation cannot be placed on them"
        )
    return np.moveaxis(indices.astype(np.intp), 2, 0)


def _plane_from_dataset(ds: Dataset) -> PlaneGeometry | None:
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
        return None
    return PlaneGeometry(
        position=np.asarray(ds.ImagePositionPatient, dtype=np.float64),
        orientation=np.asarray(ds.ImageOrientationPatient, dtype=np.float64),
        spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
    )


def _frame_item(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """A functional group item for ``frame`` (0-based), per-frame first, else shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    items = ([per_frame[frame]] if per_frame and frame < len(per_frame) else []) + ([shared[0]] if shared else [])
    for item in items:
        seq = item.get(keyword)
        if seq:
            return seq[0]
    return None


def frame_planes(ds: Dataset) -> list[PlaneGeometry | None]:
    """The plane geometry of every frame of a single- or multi-frame image (None where absent)."""
    n_frames = int_or_none(ds.get("NumberOfFrames")) or 1
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return [_plane_from_dataset(ds)] * n_frames
    planes: list[PlaneGeometry | None] = []
    for f in range(n_frames):
        pos = _frame_item(ds, f, "PlanePositionSequence")
        ori = _frame_item(ds, f, "PlaneOrientationSequence")
        meas = _frame_item(ds, f, "PixelMeasuresSequence")
        if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
            planes.append(None)
            continue
        planes.append(
            PlaneGeometry(
                position=np.asarray(pos.ImagePositionPatient, dtype=np.float64),
                orientation=np.asarray(ori.ImageOrientationPatient, dtype=np.float64),
                spacing=(float(meas.PixelSpacing[0]), float(meas.PixelSpacing[1])),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
            )
        )
    return planes
