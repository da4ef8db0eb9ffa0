"""Cord rules shared by the run-time and the refinement: one connected cord per slice, a least
cord area below which a slice holds no cord (and the QC sentence naming such slices), and
per-slice summaries of a map over regions."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

MIN_CORD_AREA_MM2 = 8.0
"""A cord component smaller than this on a slice (mm^2) is taken as no cord: a healthy adult
cervical cord is 50-75 mm^2 and even a severely compressed one keeps more than 20."""


def min_cord_voxels(pixel_area_mm2: float) -> float:
    """``MIN_CORD_AREA_MM2`` in voxels of ``pixel_area_mm2`` (mm^2) each."""
    return MIN_CORD_AREA_MM2 / pixel_area_mm2


def missing_cord_warning(slices: tuple[int, ...] | list[int]) -> str:
    """The QC sentence for axial ``slices`` (indices) where no cord was found."""
    return (f"no spinal cord was found on slice(s) {', '.join(str(z) for z in slices)}; "
            "they carry no labels and are left out of the measures")


def keep_largest_cord(labels: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Zero every labelled component of a (H, W) slice but the largest (one connected cord,
    4-connected)."""
    components, n = ndimage.label(labels > 0)
    if n <= 1:
        return labels
    sizes = ndimage.sum_labels(np.ones_like(labels), components, index=np.arange(1, n + 1))
    keep = components == (int(np.argmax(sizes)) + 1)
    return np.where(keep, labels, 0).astype(np.uint8)


def median_by_slice(values: NDArray[np.floating], labels: NDArray[np.integer], codes: tuple[int, ...]) -> NDArray[np.float64]:
    """(Z,) per axial slice of (X, Y, Z) ``labels`` the median of ``values`` (same grid, any
    units) over its voxels labelled with one of ``codes`` and a finite value; NaN on a slice
    with none."""
    out = np.full(labels.shape[2], np.nan)
    for z in range(labels.shape[2]):
        picked = values[:, :, z][np.isin(labels[:, :, z], codes) & np.isfinite(values[:, :, z])]
        if picked.size:
            out[z] = float(np.median(picked))
    return out
