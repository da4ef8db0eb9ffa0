"""The refinement of a segmentation by the tensor fit's mean diffusivity, in one function used
by the pipeline and by the model's evaluation alike.

The network segments the mean b0, where the cord's edge is only as clear as its contrast with
the CSF; the MD map shows that edge plainly (cord tissue 0.6-1.0e-3 mm^2/s, CSF about 3e-3).
So, once the tensor is fitted:

1. a second network pass on the b0 with its CSF brightened by MD
   (:mod:`core.segment.csf_contrast`; given the FA, its cord divided into the regions by the
   segmentation of a copy whose cord inside is brightened by its FA-estimated gray-matter share,
   :mod:`core.segment.gray_contrast`), skipped when the first found no cord or its MD is not
   cord-like; a slice where it lost the cord keeps the first pass's masks
   (:func:`core.segment.csf_contrast.keep_first_where_lost`); where the second cord reaches
   beyond the voxels the tensor was fitted on, the tensor is fitted again on both cords
   (``refit``);
2. the CSF rim trimmed off the outline by MD and FA (:mod:`core.segment.csf_rim`): an outline
   voxel goes when its MD is above 1.8e-3 mm^2/s or, given the b-value, above what a voxel half
   cord and half CSF reads on its slice (:mod:`core.segment.half_cord`), whichever is lower;
   and, given the FA, when its FA is below 0.4 of its slice's white-matter median FA.

The soft probabilities follow the labels: the refined segmentation keeps those of the pass its
labels come from, and a voxel the trim gave back to the background (CSF by its MD or FA) gets
probability 0 in every region (1 for the background), so it weighs nothing in the
probability-weighted measures (:mod:`core.measures.weighted`). The test-time-augmentation
agreement stays the first pass's (the augmentations segment the plain b0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from core.labels import BACKGROUND
from core.segment.csf_contrast import contrast_pass, keep_first_where_lost
from core.segment.csf_rim import CSF_MD_MM2_S, FA_FRACTION, RimTrim, trim_csf_rim
from core.segment.half_cord import half_cord_md
from core.segment.runtime import Segmentation, Segmenter


class FittedMD(Protocol):
    """What the refinement needs of a tensor fit (:class:`core.tensor.fit.TensorMaps` is one)."""

    @property
    def md(self) -> NDArray[np.float32]:
        """(X, Y, Z) mean diffusivity, mm^2/s, 0 outside ``mask``."""
        ...

    @property
    def mask(self) -> NDArray[np.bool_]:
        """(X, Y, Z) the voxels that were fitted."""
        ...

    @property
    def fa(self) -> NDArray[np.float32] | None:
        """(X, Y, Z) fractional anisotropy, 0 outside ``mask``; None: not known (no gray-matter
        contrast in the second pass)."""
        ...


@dataclass(frozen=True)
class MDMap:
    """A bare :class:`FittedMD`: an MD map (mm^2/s), the voxels it holds and, if known, the FA."""

    md: NDArray[np.float32]
    mask: NDArray[np.bool_]
    fa: NDArray[np.float32] | None = None


M = TypeVar("M", bound=FittedMD)


@dataclass(frozen=True)
class Refinement(Generic[M]):
    """A refined segmentation and how it came about.

    segmentation : the second pass's (the first's where it did not run or lost the cord),
        trimmed; its warnings include the trim's.
    maps : the fit the trim used: the first, or the refit when the second cord reached beyond it.
    second_pass : whether the CSF-contrast pass ran.
    first_pass_slices : axial slices where that pass lost the cord and the first pass's masks
        stand (:func:`core.segment.csf_contrast.keep_first_where_lost`).
    refitted : whether the tensor was fitted again.
    trim : the CSF-rim trim.
    """

    segmentation: Segmentation
    maps: M
    second_pass: bool
    refitted: bool
    trim: RimTrim
    first_pass_slices: tuple[int, ...] = ()


def refine(
    first: Segmentation,
    *,
    b0: NDArray[np.floating],
    maps: M,
    segmenter: Segmenter,
    zooms_mm: tuple[float, float, float],
    refit: Callable[[NDArray[np.uint8]], M],
    bval_s_mm2: float | None = None,
) -> Refinement[M]:
    """Refine ``first`` by the MD of ``maps`` (see the module).

    Parameters
    ----------
    first : the network's segmentation of ``b0`` (labels (X, Y, Z), canonical grid).
    b0 : (X, Y, Z) the mean b=0 image that was segmented.
    maps : the tensor fit on ``first``'s cord (MD in mm^2/s, 0 where not fitted).
    segmenter : the network, for the second pass.
    zooms_mm : voxel size (mm) of the grid.
    refit : fits the tensor again on the given (X, Y, Z) labels' cord (plus its margin).
    bval_s_mm2 : the b-value (s/mm^2) the MD was fitted at; with it each slice's trim threshold
        is lowered to its half-cord MD (:func:`core.segment.half_cord.half_cord_md`) where that
        is below ``CSF_MD_MM2_S``; None: the fixed threshold alone.
    """
    second = contrast_pass(segmenter, b0, maps.md, first, zooms_mm=zooms_mm, fa=maps.fa)
    segmentation, refitted, lost = first, False, ()
    if second is not None:
        second, lost = keep_first_where_lost(first, second, maps.md)
        segmentation = second
        if np.any((second.labels > 0) & ~maps.mask):
            maps = refit(((first.labels > 0) | (second.labels > 0)).astype(np.uint8))
            refitted = True
    threshold: float | NDArray[np.float64] = CSF_MD_MM2_S
    if bval_s_mm2 is not None:
        threshold = np.fmin(half_cord_md(segmentation.labels, maps.md, b0, bval_s_mm2=bval_s_mm2), CSF_MD_MM2_S)
    fa = None if maps.fa is None else np.where(maps.mask, maps.fa, np.nan)
    trim = trim_csf_rim(segmentation.labels, maps.md, pixel_area_mm2=zooms_mm[0] * zooms_mm[1], threshold_mm2_s=threshold,
                        fa=fa)
    warnings = segmentation.warnings
    if lost:
        warnings += (
            f"the second, CSF-contrast pass lost most of the cord on slice(s) {', '.join(map(str, lost))}; "
            "the first pass's masks were kept there: check them",
        )
    if trim.skipped:
        warnings += (
            f"the segmented cord's median mean diffusivity is {trim.cord_median_md * 1e3:.2f} x10^-3 mm^2/s, "
            "which no spinal cord has; the masks were not refined by MD: check the b-values and the masks",
        )
    if trim.kept_slices:
        warnings += (
            f"the cord outline on slice(s) {', '.join(map(str, trim.kept_slices))} has CSF-like "
            "diffusivity almost all round; left as segmented, check the b-values and the masks",
        )
    refined = replace(
        segmentation,
        labels=trim.labels,
        warnings=warnings,
        probabilities=without_removed(segmentation.probabilities, before=segmentation.labels, after=trim.labels),
        agreement=first.agreement,
    )
    return Refinement(segmentation=refined, maps=maps, second_pass=second is not None, refitted=refitted, trim=trim,
                      first_pass_slices=lost)


def without_removed(
    probabilities: NDArray[np.float32] | None, *, before: NDArray[np.uint8], after: NDArray[np.uint8]
) -> NDArray[np.float32] | None:
    """(9, X, Y, Z) ``probabilities`` with every voxel labelled in ``before`` but not in
    ``after`` made certain background (a copy; None stays None)."""
    if probabilities is None:
        return None
    removed = (before > 0) & (after == 0)
    if not removed.any():
        return probabilities
    out = probabilities.copy()
    out[:, removed] = 0.0
    out[BACKGROUND, removed] = 1.0
    return out


def refinement_section(refinement: Refinement[Any] | None, labels: NDArray[np.uint8]) -> dict[str, Any]:
    """The report's ``refinement`` section (``refinement`` None: switched off with
    ``--no-refine``); ``labels`` are the final masks."""
    return {
        "applied": refinement is not None,
        "csf_contrast_pass": refinement is not None and refinement.second_pass,
        "refit": refinement is not None and refinement.refitted,
        "md_threshold_mm2_s": None if refinement is None else CSF_MD_MM2_S,
        "md_threshold_by_slice_mm2_s": [] if refinement is None else [_rounded(t) for t in refinement.trim.thresholds_mm2_s],
        "fa_fraction_of_white_matter": None if refinement is None or not refinement.trim.fa_thresholds else FA_FRACTION,
        "fa_threshold_by_slice": [] if refinement is None else [_rounded(t) for t in refinement.trim.fa_thresholds],
        "voxels_removed": 0 if refinement is None else refinement.trim.voxels_removed,
        "cord_voxels": int(np.count_nonzero(labels)),
        "first_pass_slices": [] if refinement is None else list(refinement.first_pass_slices),
    }


def _rounded(value: float) -> float | None:
    """``value`` to 4 significant digits, None when not finite (JSON has no NaN)."""
    return float(f"{value:.4g}") if np.isfinite(value) else None
