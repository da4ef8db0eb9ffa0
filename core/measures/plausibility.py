"""No numbers without a spinal cord, and none that no cord has.

Checks that end an analysis before anything is written (the pipeline's staging folder is then
discarded), each with a sentence naming the problem (a DICOM study of the head is refused
earlier, while it is read: :func:`core.ingest.dicom_checks.check_body_part`):

- :func:`check_b0_signal`: a b=0 image that is negative throughout (a magnitude image never
  is: a negative scl_slope or a wrong rescale) -> :class:`~core.errors.ImplausibleMeasuresError`;
- :func:`check_cord`: after segmentation and refinement, the cord must be found on enough
  slices, have a cord-like cross-section and be continuous -> ``NoSpinalCordError``;
- :func:`check_measures`: the cord's median MD must be that of living tissue, its FA not zero
  throughout, its b0 SNR not negative -> ``ImplausibleMeasuresError`` naming the likely cause.

The thresholds, and what they were chosen against (the real cervical DWI in
``tests/data/sct_tutorial_dmri``: cord on 15/15 slices, area 65-103 mm^2 per slice with or
without refinement, centroid steps at most 2.1 mm between 5 mm slices, median cord MD
0.83x10^-3 mm^2/s, FA 0.76; the simulated test studies: 4/4 slices of 120-159 mm^2, MD
0.75-1.92x10^-3 with b-values written 2.5 times too small), are the constants below.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from core.errors import ImplausibleMeasuresError, NoSpinalCordError

MIN_CORD_SLICES = 2
"""A cord is found on at least this many slices (one slice cannot show a cord's continuity)..."""

MIN_CORD_SLICE_FRACTION = 0.5
"""...and on at least this share of the slices (a cervical DTI slab is placed on the cord: the
real study finds it on all of them)."""

CORD_AREA_MM2 = (20.0, 250.0)
"""Median cord cross-section per slice (mm^2) accepted. A healthy adult cord is 50-90 mm^2
(about 63 at C2, 72 at C4, 50 at C7), a severely compressed one 30-40; the real study reads
65-103, the simulated test cord (radius 7 voxels of 1 mm) 120-159. Below 20 is a speck of
noise, above 250 is wider than the dural sac: not a cord."""

MAX_CENTROID_STEP_MM = 10.0
"""Largest in-plane move (mm) of the cord's centroid between adjacent slices. The cord is about
8 x 12 mm and curves gently (the real study: at most 2.1 mm per 5 mm slice); a 10 mm jump means
two different objects were labelled."""

CORD_MD_MM2_S = (0.2e-3, 2.5e-3)
"""Median cord MD (mm^2/s) of living tissue. Cord tissue reads 0.6-1.0x10^-3 (the real study
0.83x10^-3), free water (CSF, 37 C) about 3x10^-3; b-values in s/m^2 or multiplied by 1000 give
about 1e-6 (the real study with b x1000: 0.84x10^-6), b-values 1000 times too small no
diffusion weighting at all."""

MIN_CORD_FA = 0.01
"""A cord whose FA is below this everywhere (median and mean) has no directional signal."""


def check_b0_signal(b0: NDArray[np.floating]) -> None:
    """Refuse a mean b=0 image (X, Y, Z) that is not positive anywhere: magnitude MR signal is
    never negative, so the intensity scaling (a negative scl_slope, a wrong RescaleSlope) is.

    Raises
    ------
    ImplausibleMeasuresError : naming the scaling as the likely cause.
    """
    if b0.size and float(np.max(b0)) <= 0.0 and float(np.min(b0)) < 0.0:
        raise ImplausibleMeasuresError(
            "the b=0 image is negative throughout (magnitude signal never is): the intensity "
            "scaling is wrong, e.g. a negative scl_slope in the NIfTI header or a negative DICOM rescale"
        )


def check_cord(labels: NDArray[np.integer], *, affine: NDArray[np.float64]) -> None:
    """Refuse a segmentation that is not a spinal cord.

    Parameters
    ----------
    labels : (X, Y, Z) codes 0-8 on a closest-canonical grid (axial slices along Z).
    affine : (4, 4) voxel -> world RAS+ (mm) of that grid.

    Raises
    ------
    NoSpinalCordError : the cord is found on fewer than ``max(MIN_CORD_SLICES,
        MIN_CORD_SLICE_FRACTION x slices)`` slices, its median area per slice is outside
        :data:`CORD_AREA_MM2`, or its centroid moves more than :data:`MAX_CENTROID_STEP_MM`
        between adjacent slices.
    """
    cord = labels > 0
    nz = cord.shape[2]
    counts = cord.sum(axis=(0, 1))
    found = np.flatnonzero(counts)
    needed = max(MIN_CORD_SLICES, math.ceil(MIN_CORD_SLICE_FRACTION * nz))
    if found.size < needed:
        where = "on no slice" if found.size == 0 else f"on only {found.size} of the {nz} slices"
        raise NoSpinalCordError(
            f"no spinal cord was found: it was seen {where} (at least {needed} needed); "
            "is this a cervical spine study with the cord in the field of view?"
        )
    pixel_area = float(np.linalg.norm(np.cross(affine[:3, 0], affine[:3, 1])))
    area = float(np.median(counts[found])) * pixel_area
    low, high = CORD_AREA_MM2
    if not low <= area <= high:
        raise NoSpinalCordError(
            f"no spinal cord was found: what was segmented has a median cross-section of {area:.0f} mm^2 "
            f"per slice, outside the {low:g}-{high:g} mm^2 of a spinal cord"
        )
    centroids = {int(z): np.argwhere(cord[:, :, z]).mean(axis=0) for z in found}
    for z in found[:-1]:
        if int(z) + 1 not in centroids:
            continue
        step = affine[:3, :2] @ (centroids[int(z) + 1] - centroids[int(z)])
        if float(np.hypot(*step[:2])) > MAX_CENTROID_STEP_MM:
            raise NoSpinalCordError(
                f"no spinal cord was found: what was segmented jumps {float(np.hypot(*step[:2])):.0f} mm between "
                f"slices {z} and {z + 1} (a cord moves at most a few mm), so it is not one continuous cord"
            )


def check_measures(cord: dict[str, Any], *, b0_snr: float | None) -> None:
    """Refuse cord measures no living cord has (``cord``: the report's ``cord`` section, MD in
    mm^2/s).

    Raises
    ------
    ImplausibleMeasuresError : naming the measure and the likely cause.
    """
    md = cord.get("md", {}).get("median")
    low, high = CORD_MD_MM2_S
    if md is not None and md < low:
        raise ImplausibleMeasuresError(
            f"the cord's median MD is {md * 1e3:.3g}x10^-3 mm^2/s, below the {low * 1e3:g}x10^-3 of any living "
            "tissue: the b-values are probably in the wrong unit (s/m^2, or multiplied by 1000; they must be s/mm^2)"
        )
    if md is not None and md > high:
        raise ImplausibleMeasuresError(
            f"the cord's median MD is {md * 1e3:.3g}x10^-3 mm^2/s, above the {high * 1e3:g}x10^-3 of any living "
            "tissue: the b-values are probably too small (wrong unit) or the volumes are mislabelled as weighted"
        )
    fa = cord.get("fa", {})
    if fa.get("median") is not None and fa["median"] < MIN_CORD_FA and (fa.get("mean") or 0.0) < MIN_CORD_FA:
        raise ImplausibleMeasuresError(
            "the cord's FA is 0 throughout: the diffusion-weighted volumes carry no directional "
            "signal (wrong b-vectors, or copies of the b=0 image)"
        )
    if b0_snr is not None and b0_snr < 0:
        raise ImplausibleMeasuresError(
            f"the cord's b=0 signal-to-noise ratio is negative ({b0_snr:.1f}): the intensity scaling is "
            "wrong, e.g. a negative or tiny scl_slope in the NIfTI header or DICOM rescale"
        )
