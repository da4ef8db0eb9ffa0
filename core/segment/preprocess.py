"""Pre-processing shared by training (models/) and run-time inference: one definition of how a
b0 slice is brought to the model's grid and intensity scale.

Array convention for 2D slices everywhere in scsnet: a slice of an image in closest-canonical
RAS orientation, indexed ``[i, j]`` with ``i`` along world +x (towards the patient's right) and
``j`` along world +y (anterior). The network sees ``[N, 1, i, j]``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

FloatArray = NDArray[np.float32]


def normalise(image: NDArray[np.floating], *, mask: NDArray[np.bool_] | None = None) -> FloatArray:
    """Robust intensity normalisation of a b0 slice or crop.

    ``(x - p50) / (p99 - p1)`` with percentiles over ``mask`` (or the whole image), then clipped
    to [-3, 3]. Robust to a few very bright voxels (vessels, fat) and to the absolute scale that
    differs between scanners.

    Parameters
    ----------
    image : (H, W) float array, any scale (arbitrary scanner units).
    mask : optional (H, W) bool, the voxels whose percentiles define the scale.

    Returns
    -------
    (H, W) float32, dimensionless.
    """
    values = image[mask] if mask is not None and mask.any() else image.ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.zeros(image.shape, dtype=np.float32)
    p1, p50, p99 = np.percentile(values, [1.0, 50.0, 99.0])
    scale = float(p99 - p1)
    if scale <= 0.0:
        scale = 1.0
    out = (np.nan_to_num(image, nan=p50) - p50) / scale
    return np.clip(out, -3.0, 3.0).astype(np.float32)


def zoom_factors(spacing_mm: tuple[float, float], target_mm: tuple[float, float]) -> tuple[float, float]:
    """Factors that take a grid of ``spacing_mm`` to ``target_mm`` (output size = input * factor)."""
    return (spacing_mm[0] / target_mm[0], spacing_mm[1] / target_mm[1])


def resample_slice(
    image: NDArray[np.floating],
    *,
    spacing_mm: tuple[float, float],
    target_mm: tuple[float, float],
    order: int = 1,
) -> FloatArray:
    """Resample a 2D slice from ``spacing_mm`` to ``target_mm`` voxels (mm), keeping the field
    of view; linear interpolation by default.

    Returns an array of shape ``round(H * sx / tx), round(W * sy / ty)``.
    """
    fx, fy = zoom_factors(spacing_mm, target_mm)
    out_shape = (max(1, int(round(image.shape[0] * fx))), max(1, int(round(image.shape[1] * fy))))
    return resample_to_shape(image, out_shape, order=order)


def resample_to_shape(
    image: NDArray[np.floating], out_shape: tuple[int, int], *, order: int = 1
) -> FloatArray:
    """Resample a 2D array (or a stack ``(C, H, W)`` along its last two axes) to ``out_shape``
    so that voxel *edges* align (field of view preserved, as when changing the voxel size).

    ``order`` 1 (linear) is separable: two small interpolation matrices applied to the whole
    stack at once; ``order`` 0 (nearest, for label maps) uses :func:`scipy.ndimage.map_coordinates`.
    Values beyond the edge are the edge's (``mode="nearest"``).
    """
    image = np.asarray(image, dtype=np.float32)
    in_shape = image.shape[-2:]
    if order == 1:
        rows = linear_matrix(in_shape[0], out_shape[0])
        cols = linear_matrix(in_shape[1], out_shape[1])
        return np.matmul(np.matmul(rows, image), cols.T).astype(np.float32, copy=False)
    sx = in_shape[0] / out_shape[0]
    sy = in_shape[1] / out_shape[1]
    # Output voxel centre i maps to input coordinate (i + 0.5) * s - 0.5.
    ii = (np.arange(out_shape[0]) + 0.5) * sx - 0.5
    jj = (np.arange(out_shape[1]) + 0.5) * sy - 0.5
    grid = np.meshgrid(ii, jj, indexing="ij")
    if image.ndim == 2:
        return ndimage.map_coordinates(image, grid, order=order, mode="nearest").astype(np.float32)
    return np.stack([ndimage.map_coordinates(c, grid, order=order, mode="nearest") for c in image]).astype(np.float32)


def linear_matrix(n_in: int, n_out: int) -> FloatArray:
    """(n_out, n_in) weights of linear interpolation at output voxel centres
    ``(i + 0.5) * n_in / n_out - 0.5``, clamped to the edge voxels."""
    x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (x - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - w)
    np.add.at(m, (rows, hi), w)
    return m
