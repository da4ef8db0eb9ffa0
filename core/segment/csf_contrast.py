"""Brighten the CSF on the mean b0 by its mean diffusivity, for a second segmentation pass.

The network finds the cord's outline on the b0 by its contrast with the CSF ring around it.
Where the CSF is about as bright as the cord (short TR, T2 shine-through of an oedematous cord,
coarse voxels) that edge is not on the b0 and the network guesses it, and with it the regions
inside, whose layout follows the outline. The tensor fit sees the edge plainly: cord tissue
has MD about 0.6-1.0e-3 mm^2/s, CSF about 3e-3. So once the tensor is fitted, each voxel of
the b0 is brightened by the share of free water its MD suggests,

    b0' = b0 * (1 + f),  f = clip((MD - MD_low) / (MD_high - MD_low), 0, 1),

and the network segments ``b0'`` again: pure CSF doubles, cord tissue (MD <= ``MD_low``) is
unchanged, and a voxel part cord, part CSF lies in between, as on a b0 with bright CSF, which
the network reads well. The inside of the first pass's cord (its labelled voxels off the
outline) keeps its b0, so neither gray matter nor an oedematous cord (MD up to about 1.4e-3)
is brightened and then taken for CSF. The network's input is still one normalised b0-like
image.

Chosen on held-out simulated studies (seeds 2 011 000 000 onwards; three sets of 30 cases of
12 slices; the outline trimmed, and grown by a voxel onto cord-like MD, after either pass):
pooled region Dice 0.842 -> 0.859 and 0.844 -> 0.858 with the whole b0 brightened,
0.825 -> 0.853 on the third set with the cord interior left as it is (0.854 without that).
After the second pass that growth added nothing (0.8613 -> 0.8614 on the second set), so the
service only trims (:mod:`core.segment.csf_rim`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from core.segment.cord import missing_cord_warning
from core.segment.csf_rim import cord_median_md, md_is_cord_like
from core.segment.gray_contrast import gray_contrast_b0, repartition

if TYPE_CHECKING:
    from core.segment.runtime import Segmentation, Segmenter

MD_LOW_MM2_S = 1.0e-3
"""MD (mm^2/s) at and below which a voxel keeps its b0: healthy cord tissue."""

MD_HIGH_MM2_S = 2.0e-3
"""MD (mm^2/s) at and above which a voxel's b0 is doubled: mostly free water (CSF 3e-3)."""


LOST_SHARE = 0.5
"""A slice where the second pass keeps less than this share of the first pass's voxels of cord
tissue (MD below :data:`TISSUE_MD_MM2_S`) keeps the first pass's masks
(:func:`keep_first_where_lost`)."""

TISSUE_MD_MM2_S = 1.2e-3
"""MD (mm^2/s) below which a voxel counts as cord tissue for :func:`keep_first_where_lost`:
healthy cord 0.6-1.0e-3; not CSF (3e-3), its partial-volume rim (about 1.5e-3) or epidural
tissue (1.0-1.6e-3), which the second pass is right to drop."""

_IN_PLANE = ndimage.generate_binary_structure(2, 1)[:, :, None]


def free_water_share(md: NDArray[np.floating]) -> NDArray[np.float32]:
    """(X, Y, Z) the free-water share ``f`` in [0, 1] that each voxel's MD (mm^2/s; 0 or NaN where
    not fitted, read as 0) suggests: 0 at :data:`MD_LOW_MM2_S` and below, 1 at
    :data:`MD_HIGH_MM2_S` and above, linear between."""
    md = np.nan_to_num(np.asarray(md, dtype=np.float32), nan=0.0)
    return np.clip((md - MD_LOW_MM2_S) / (MD_HIGH_MM2_S - MD_LOW_MM2_S), 0.0, 1.0).astype(np.float32)


def csf_contrast_b0(
    b0: NDArray[np.floating], md: NDArray[np.floating], cord: NDArray[np.bool_],
    *, free_water: NDArray[np.floating] | None = None,
) -> NDArray[np.float32]:
    """The b0 with each voxel brightened by its MD-estimated free-water share.

    Parameters
    ----------
    b0 : (X, Y, Z) mean b=0 image, any units; axial slices along Z.
    md : (X, Y, Z) mean diffusivity (mm^2/s) on the same grid; voxels the fit did not reach
        (0, NaN) keep their b0.
    cord : (X, Y, Z) the first pass's cord; its voxels off the in-plane (4-connected) outline
        keep their b0.
    free_water : (X, Y, Z) :func:`free_water_share` of ``md`` when the caller has it already
        (not modified); computed here otherwise.

    Returns
    -------
    (X, Y, Z) float32, ``b0 * (1 + f)`` with ``f`` in [0, 1] (see the module).
    """
    b0 = np.asarray(b0, dtype=np.float32)
    md = np.asarray(md, dtype=np.float32)
    if md.shape != b0.shape or cord.shape != b0.shape:
        raise ValueError(f"b0 {b0.shape}, MD {md.shape} and cord {cord.shape} are not on one grid")
    share = free_water_share(md) if free_water is None else np.array(free_water, dtype=np.float32)
    share[ndimage.binary_erosion(cord, _IN_PLANE)] = 0.0
    return (b0 * (1.0 + share)).astype(np.float32)


def contrast_pass(
    segmenter: Segmenter, b0: NDArray[np.floating], md: NDArray[np.floating], first: Segmentation,
    *, zooms_mm: tuple[float, float, float], fa: NDArray[np.floating] | None = None,
) -> Segmentation | None:
    """The segmentation of :func:`csf_contrast_b0` of ``b0`` (X, Y, Z), or None where the pass
    should not run: the first pass found no cord, or its cord's median MD is not cord-like (the
    MD map, or the masks, cannot be trusted; :func:`core.segment.csf_rim.md_is_cord_like`).

    ``md`` (mm^2/s, same grid) is what the tensor fit gave, 0 where it did not fit. With ``fa``
    (same grid) and a model whose manifest sets a ``gray_contrast_gain``, that image with the
    cord's inside also brightened by its gray-matter share (:mod:`core.segment.gray_contrast`;
    the CSF brightening leaves that inside as it is) is segmented too, and divides the first
    image's cord into the regions (:func:`core.segment.gray_contrast.repartition`): the
    outline stays that of the CSF contrast (a brighter inside moved it, on the real DWI
    shrinking one slice's cord by a fifth). Both are also seen turned back by the angle the first
    pass found the cord lying at (``first.turn_deg``), and both centre their crops on the first
    pass's cord: the brightening changes only the cord's outline and its CSF, so the whole-slice
    pass that locates the cord is not run again (on a full field of view about a sixth of the
    analysis's network work; the yardstick's 256 studies score as before).
    """
    if not first.labels.any() or not md_is_cord_like(cord_median_md(first.labels, md)):
        return None
    water = free_water_share(md)
    image = csf_contrast_b0(b0, md, first.labels > 0, free_water=water)
    second = segmenter.segment(image, zooms_mm=zooms_mm, ventral_lean=True, cord=first.labels > 0, turn_deg=first.turn_deg)
    if fa is None or segmenter.gray_contrast_gain <= 0 or not second.labels.any():
        return second
    gray = gray_contrast_b0(image, fa, first.labels, gain=segmenter.gray_contrast_gain, free_water=water)
    partition = segmenter.segment(gray, zooms_mm=zooms_mm, ventral_lean=True, cord=second.labels > 0,
                                  turn_deg=first.turn_deg)
    return repartition(second, partition)


def keep_first_where_lost(first: Segmentation, second: Segmentation, md: NDArray[np.floating]
                          ) -> tuple[Segmentation, tuple[int, ...]]:
    """``second`` with the first pass's labels and probabilities on every axial slice where the
    second pass lost the cord, and those slices (its QC sentence on slices without cord then
    names only those still without).

    The second pass is there to move the outline by the CSF rim, a voxel or two. On a slice
    where it keeps less than :data:`LOST_SHARE` of the first pass's voxels whose MD (mm^2/s,
    (X, Y, Z) like the labels) says cord tissue (:data:`TISSUE_MD_MM2_S`), it has lost the cord
    rather than a rim, and the first pass stands there. (Seen on very flat, severely compressed
    cords of the independent yardstick, ``models/yardstick``.)
    """
    tissue = (first.labels > 0) & (np.nan_to_num(np.asarray(md), nan=np.inf) < TISSUE_MD_MM2_S)
    before = tissue.sum(axis=(0, 1))
    after = (tissue & (second.labels > 0)).sum(axis=(0, 1))
    lost = tuple(int(z) for z in np.flatnonzero((before > 0) & (after < LOST_SHARE * before)))
    if not lost:
        return second, ()
    labels = second.labels.copy()
    labels[:, :, lost] = first.labels[:, :, lost]
    cord_probability = second.cord_probability.copy()
    cord_probability[:, :, lost] = first.cord_probability[:, :, lost]
    probabilities = second.probabilities
    if probabilities is not None and first.probabilities is not None:
        probabilities = probabilities.copy()
        probabilities[:, :, :, lost] = first.probabilities[:, :, :, lost]
    missing = tuple(z for z in second.slices_without_cord if z not in lost)
    # The second pass's sentence on slices without cord names the lost ones too: say it anew.
    stale = missing_cord_warning(second.slices_without_cord) if second.slices_without_cord else None
    warnings = tuple(w for w in second.warnings if w != stale) + ((missing_cord_warning(missing),) if missing else ())
    return replace(second, labels=labels, cord_probability=cord_probability, probabilities=probabilities,
                   slices_without_cord=missing, warnings=warnings), lost
