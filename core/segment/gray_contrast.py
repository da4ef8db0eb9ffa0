"""Brighten the gray matter on the mean b0 by its low FA, for the second segmentation pass.

The network places the gray matter by the slightly brighter butterfly inside the cord (its
training b0s draw gray matter 1.0-1.35 x as bright as white; the manual gray matter of real
cervical T2* scans reads 1.12-1.26 x) and, where that contrast is faint, by the shape it expects
from the outline. On a DWI b0 the contrast is often faint. The tensor fit shows the gray matter
instead: its FA is lower than the white matter's around it. So the second, CSF-contrast pass
(:mod:`core.segment.csf_contrast`) also segments a copy of its image in which each voxel
inside the first pass's cord is brightened by how far its FA lies from that slice's white
matter towards its gray matter,

    b0' = b0 * (1 + GAIN * g),  g = clip((FA_wm - FA) / (FA_wm - FA_gm), 0, 1),

with FA_wm and FA_gm the slice's median FA over the first pass's white-matter and gray-matter
labels (relative, because partial volume moves both: on the real 0.9 mm tutorial DWI gray
matter reads FA 0.58-0.71 and white matter 0.70-0.79). A voxel as anisotropic as the slice's
white matter keeps its b0; one as isotropic as its gray matter is ``1 + GAIN`` times as bright.
The network then reads the gray matter from its whole neighbourhood, not from one voxel's
noisy FA (sorting voxels across the boundary by their own FA was measured and is far worse:
``models/scsnet/MODEL_CARD.md``). Only the cord's inside is touched (the first pass's cord
eroded in-plane by :data:`ERODE_VOXELS`): its outline, where partial volume with CSF lowers FA,
keeps its b0, and so does a slice whose two medians differ by less than :data:`MIN_FA_GAP` (no
gray/white contrast to read) or that lacks either tissue. Low FA that comes from free water
(CSF in a voxel, by its MD) is not gray matter: ``g`` is scaled by the voxel's tissue share
``1 - f`` (``f`` of :func:`core.segment.csf_contrast.free_water_share`). The network's input is
still one b0-like image. That copy's region probabilities then divide the cord of the CSF-contrast
image itself into the regions (:func:`repartition`); the outline stays the latter's, since a
brighter inside also moves the network's outline (on the real tutorial DWI it shrank one slice's
cord from 76 to 61 mm^2).

Chosen on the independent yardstick (``python -m models.yardstick``, seeds 0-1: gains 0.15, 0.3,
0.5 and 0.8, the inside one or two voxels in) and confirmed on a second draw (seeds 2-3) and the
generator's slice test; the figures are in the model card.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from core.labels import BACKGROUND, GRAY_MATTER_CODES, WHITE_MATTER_CODES
from core.segment.cord import median_by_slice

if TYPE_CHECKING:
    from core.segment.runtime import Segmentation

GAIN = 0.5
"""How much brighter (x ``1 + GAIN``) a voxel whose FA is its slice's gray-matter median becomes,
for the shipped model (its manifest's ``gray_contrast_gain``, which the run-time uses)."""

ERODE_VOXELS = 1
"""The cord's inside: the first pass's cord eroded in-plane (4-connected) this many voxels (two
lost more Dice on the second yardstick draw than they saved in FA error)."""

MIN_FA_GAP = 0.05
"""Smallest difference of the slice's white- and gray-matter median FA for which it is brightened."""

_IN_PLANE = ndimage.generate_binary_structure(2, 1)[:, :, None]


def gray_share(fa: NDArray[np.floating], labels: NDArray[np.integer],
               free_water: NDArray[np.floating] | None = None) -> NDArray[np.float32]:
    """Each voxel's FA-estimated gray-matter share ``g`` in [0, 1] inside the cord (see the module).

    Parameters
    ----------
    fa : (X, Y, Z) fractional anisotropy (dimensionless, 0-1); NaN reads as 0.
    labels : (X, Y, Z) region codes 0-8 of the first pass on the same grid; axial slices along Z.
    free_water : (X, Y, Z) free-water share in [0, 1] (None: none anywhere); ``g`` is scaled by
        ``1 - free_water``.

    Returns
    -------
    (X, Y, Z) float32: 0 outside the cord's eroded inside and on slices without a gray/white
    contrast of at least :data:`MIN_FA_GAP`.
    """
    fa = np.nan_to_num(np.asarray(fa, dtype=np.float64), nan=0.0)
    labels = np.asarray(labels)
    if fa.shape != labels.shape:
        raise ValueError(f"FA {fa.shape} and labels {labels.shape} are not on one grid")
    inside = ndimage.binary_erosion(labels > 0, _IN_PLANE, iterations=ERODE_VOXELS)
    fa_white = median_by_slice(fa, labels, WHITE_MATTER_CODES)  # (Z,), NaN without that tissue
    fa_gray = median_by_slice(fa, labels, GRAY_MATTER_CODES)
    gap = fa_white - fa_gray
    contrast = np.nan_to_num(gap, nan=0.0) >= MIN_FA_GAP  # (Z,) slices with a gray/white contrast
    g = np.clip((fa_white - fa) / np.where(contrast, gap, 1.0), 0.0, 1.0)
    share = np.where(inside & contrast, g, 0.0).astype(np.float32)
    if free_water is not None:
        share *= 1.0 - np.clip(np.asarray(free_water, dtype=np.float32), 0.0, 1.0)
    return share


def gray_contrast_b0(b0: NDArray[np.floating], fa: NDArray[np.floating], labels: NDArray[np.integer],
                     *, gain: float = GAIN, free_water: NDArray[np.floating] | None = None) -> NDArray[np.float32]:
    """(X, Y, Z) float32 ``b0 * (1 + gain * g)``, ``g`` from :func:`gray_share` of ``fa`` and the
    first pass's ``labels`` (all on one grid; b0 in any units)."""
    b0 = np.asarray(b0, dtype=np.float32)
    if b0.shape != np.shape(labels):
        raise ValueError(f"b0 {b0.shape} and labels {np.shape(labels)} are not on one grid")
    return (b0 * (1.0 + gain * gray_share(fa, labels, free_water))).astype(np.float32)


def repartition(outline: Segmentation, partition: Segmentation) -> Segmentation:
    """``outline``'s cord, divided into regions by ``partition`` (both (X, Y, Z), one grid).

    Each voxel of ``outline``'s cord takes the region (codes 1-8) that ``partition``'s
    probabilities rank highest; the background, the cord probability and the warnings stay
    ``outline``'s. The probabilities (for the weighted measures) are ``outline``'s background
    and its cord probability shared among the regions in ``partition``'s proportions.
    Without ``partition`` probabilities, ``outline`` is returned as it is.
    """
    if partition.probabilities is None or outline.probabilities is None:
        return outline
    regions = np.delete(partition.probabilities, BACKGROUND, axis=0)  # (8, X, Y, Z), codes 1-8
    cord = outline.labels > 0
    labels = np.where(cord, np.argmax(regions, axis=0) + 1, 0).astype(np.uint8)
    total = regions.sum(axis=0)
    shares = np.divide(regions, total, out=np.full_like(regions, 1.0 / len(regions)), where=total > 0)
    probabilities = np.empty_like(outline.probabilities)
    probabilities[BACKGROUND] = outline.probabilities[BACKGROUND]
    probabilities[np.arange(len(probabilities)) != BACKGROUND] = shares * (1.0 - outline.probabilities[BACKGROUND])
    return replace(outline, labels=labels, probabilities=probabilities)
