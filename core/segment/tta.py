"""Agreement of a segmentation with its test-time augmentations, per region and per slice.

A region whose mask changes when the image moves by one voxel, or is mirrored (and mirrored
back, sides swapped), is one the network is unsure of, whatever its softmax says. The
agreement is the Dice coefficient of each region between the main labels and each augmented
labelling,

    Dice = 2 |A n B| / (|A| + |B|),

over the whole volume and per axial slice; NaN where the region is in neither labelling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from core.labels import REGIONS


@dataclass(frozen=True)
class Agreement:
    """Dice of each region between the main labels and each augmented labelling.

    names : the augmentations, e.g. ("shift", "flip").
    volume : (A, 8) Dice over the whole volume, regions in code order 1-8 (NaN: in neither).
    slices : (A, Z, 8) Dice per axial slice (NaN: in neither on that slice).
    """

    names: tuple[str, ...]
    volume: NDArray[np.float64]
    slices: NDArray[np.float64]

    def mean_volume(self) -> NDArray[np.float64]:
        """(8,) mean Dice over the augmentations (NaN where every one is NaN)."""
        return _nanmean(self.volume, axis=0)

    def mean_slices(self) -> NDArray[np.float64]:
        """(Z, 8) mean Dice over the augmentations per slice."""
        return _nanmean(self.slices, axis=0)


def _nanmean(a: NDArray[np.float64], *, axis: int) -> NDArray[np.float64]:
    finite = np.isfinite(a)
    total = np.where(finite, a, 0.0).sum(axis=axis)
    count = finite.sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_], *, axis: tuple[int, ...] | None = None) -> NDArray[np.float64]:
    """Dice of two boolean masks (over ``axis``, default all); NaN where both are empty."""
    inter = np.logical_and(a, b).sum(axis=axis, dtype=np.float64)
    total = a.sum(axis=axis, dtype=np.float64) + b.sum(axis=axis, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * inter / np.where(total > 0, total, 1.0), np.nan)


def agreement(labels: NDArray[np.uint8], augmented: Mapping[str, NDArray[np.uint8]]) -> Agreement:
    """The :class:`Agreement` of (X, Y, Z) ``labels`` with each labelling in ``augmented``
    (same grid, already mapped back onto it)."""
    names = tuple(augmented)
    nz = labels.shape[2]
    volume = np.full((len(names), len(REGIONS)), np.nan)
    slices = np.full((len(names), nz, len(REGIONS)), np.nan)
    for a, name in enumerate(names):
        other = augmented[name]
        for r, region in enumerate(REGIONS):
            main, aug = labels == region.code, other == region.code
            volume[a, r] = dice(main, aug)
            slices[a, :, r] = dice(main, aug, axis=(0, 1))
    return Agreement(names=names, volume=volume, slices=slices)
