"""Trim the CSF rim off a segmentation with the mean diffusivity and FA of the tensor fit.

The network segments the mean b0, where the edge between cord and CSF is only as clear as
their contrast; where CSF is about as bright as the cord the masks take in edge voxels that
are mostly CSF, and partial volume with CSF is the main error source of region FA (low FA,
high MD). The tensor fit sees that edge plainly: cord tissue has MD about 0.6-1.0e-3 mm^2/s
(1.2-1.4e-3 in an oedematous cord), CSF about 3e-3. An outline voxel whose MD exceeds
``CSF_MD_MM2_S`` (or a slice's own, lower line: the pipeline passes each slice's half-cord MD,
:mod:`core.segment.half_cord`) is mostly CSF and is given back to the background, at most ``MAX_LAYERS``
voxels deep from the outline per slice, so the inside of the cord (a syrinx, a noisy voxel)
is never carved out.

Given the FA, an outline voxel also goes when its FA is below ``FA_FRACTION`` of its slice's
white-matter median FA: CSF is isotropic, so a voxel that is mostly CSF has lost most of the
anisotropy of the funiculus it borders, while its MD can stay below the MD line (the diffusion-
weighted signal comes from the tissue share, whose MD dominates the fit). The line is relative
to the slice's own white matter, so a cord whose FA is low throughout (myelopathy, low SNR)
moves its line with it; gray matter (FA about 0.6-0.75 of white matter) lies above it.

Measured on simulated studies (``python -m models.evaluate``; the threshold was chosen on
separate held-out cases, seeds 2 011 000 000 onwards): the white-matter columns' FA bias
drops from about -3.5 % to about -1 %, and region Dice rises slightly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from core.labels import WHITE_MATTER_CODES
from core.segment.cord import keep_largest_cord, median_by_slice, min_cord_voxels

CSF_MD_MM2_S = 1.8e-3
"""MD (mm^2/s) above which an outline voxel counts as mostly CSF. At b = 800 s/mm^2 a voxel
whose b0 signal is half cord (MD 0.9e-3) and half CSF (3e-3) fits to about 1.55e-3."""

MAX_LAYERS = 2
"""Outline layers (voxels) that may be trimmed per slice: partial volume is one voxel deep,
and a second layer takes a CSF band the network added to a cord outline it could not see."""

CORD_MD_MAX_MM2_S = 1.5e-3
"""A study whose labelled voxels have a median MD above this is not trimmed: no cord reads so
(healthy 0.6-1.0e-3, oedema 1.2-1.4e-3), so the MD map itself is off (wrong b-values or
units) or the masks are mostly not cord, and a trim by MD would take the wrong voxels."""

FA_FRACTION = 0.4
"""Share of the slice's white-matter median FA below which an outline voxel counts as mostly
CSF. On the independent yardstick (models/scsnet/MODEL_CARD.md) the outline voxels a ventral
funiculus had beyond the truth read FA 0.27-0.59 of the slice's white matter (10th-90th
percentile), its true outline voxels 0.52-1.11; chosen from 0.3-0.45 on seeds 0-1 and confirmed
on seeds 2-3."""

_CROSS = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class RimTrim:
    """A trimmed segmentation.

    labels : (X, Y, Z) uint8 region codes, the input's minus the trimmed voxels.
    removed : (Z,) int, voxels given back to the background per axial slice.
    kept_slices : axial slices left untrimmed because the trim would have taken the cord
        below the least cord area (:data:`core.segment.cord.MIN_CORD_AREA_MM2`).
    cord_median_md : median MD (mm^2/s) of the labelled voxels before the trim (NaN if none).
    skipped : True when that median is not cord-like (``CORD_MD_MAX_MM2_S``) and nothing was
        trimmed.
    thresholds_mm2_s : the MD threshold each axial slice was trimmed at (empty when skipped).
    fa_thresholds : the FA below which each axial slice's outline voxels were trimmed
        (``fa_fraction`` x its white-matter median FA; NaN: no white matter or no FA); empty when
        no FA was given or the trim was skipped.
    """

    labels: NDArray[np.uint8]
    removed: NDArray[np.int64]
    kept_slices: tuple[int, ...] = ()
    cord_median_md: float = float("nan")
    skipped: bool = False
    thresholds_mm2_s: tuple[float, ...] = ()
    fa_thresholds: tuple[float, ...] = ()

    @property
    def voxels_removed(self) -> int:
        return int(self.removed.sum())


def cord_median_md(labels: NDArray[np.uint8], md: NDArray[np.floating]) -> float:
    """Median MD (mm^2/s) of the labelled voxels (NaN ignored; NaN if there are none)."""
    inside = np.asarray(md)[(labels > 0) & np.isfinite(md)]
    return float(np.median(inside)) if inside.size else float("nan")


def md_is_cord_like(median_md: float) -> bool:
    """False when a segmented cord's median MD is above ``CORD_MD_MAX_MM2_S``: then the MD map
    (or the masks) cannot be trusted for any refinement. NaN (nothing labelled) counts as
    cord-like."""
    return not median_md > CORD_MD_MAX_MM2_S


def white_matter_median_fa(labels: NDArray[np.uint8], fa: NDArray[np.floating]) -> NDArray[np.float64]:
    """(Z,) per axial slice of (X, Y, Z) ``labels`` the median FA (dimensionless) of its
    white-matter voxels (the six funiculi) with finite FA; NaN on a slice with none."""
    return median_by_slice(fa, labels, WHITE_MATTER_CODES)


def trim_csf_rim(
    labels: NDArray[np.uint8],
    md: NDArray[np.floating],
    *,
    pixel_area_mm2: float,
    threshold_mm2_s: float | NDArray[np.floating] = CSF_MD_MM2_S,
    max_layers: int = MAX_LAYERS,
    fa: NDArray[np.floating] | None = None,
    fa_fraction: float = FA_FRACTION,
) -> RimTrim:
    """Give CSF-like outline voxels back to the background, slice by slice.

    Parameters
    ----------
    labels : (X, Y, Z) uint8 region codes (0 background), axial slices along Z; a (X, Y)
        slice is taken as one slice.
    md : mean diffusivity (mm^2/s) on the same grid (NaN counts as not CSF-like).
    threshold_mm2_s : MD above which an outline voxel is trimmed: one value, or one per axial
        slice (Z,) (NaN: that slice is not trimmed).
    max_layers : how many times the outline is peeled at most.
    pixel_area_mm2 : in-plane voxel area (mm^2); a slice whose cord the trim would leave
        smaller than ``MIN_CORD_AREA_MM2`` (the run-time's "no cord") keeps its labels.
    fa : FA (dimensionless) on the same grid, NaN where not fitted; with it an outline voxel
        whose FA is below ``fa_fraction`` x its slice's white-matter median FA (of ``labels``,
        :func:`white_matter_median_fa`) is trimmed too. None: MD alone.

    Nothing is trimmed when the labelled voxels' median MD exceeds ``CORD_MD_MAX_MM2_S``.

    Each layer removes the cord voxels that touch the background (in-plane, 4-connected) and
    have MD above the threshold (or FA below the slice's FA line); after trimming only the
    largest connected cord is kept.
    """
    flat = labels.ndim == 2
    lab = labels[:, :, None] if flat else labels
    diff = np.asarray(md)[:, :, None] if flat else np.asarray(md)
    if diff.shape != lab.shape:
        raise ValueError(f"labels {lab.shape} and MD {diff.shape} are not on one grid")
    removed = np.zeros(lab.shape[2], dtype=np.int64)
    median = cord_median_md(lab, diff)
    if not md_is_cord_like(median):
        return RimTrim(labels=labels.copy(), removed=removed, cord_median_md=median, skipped=True)
    per_slice = np.broadcast_to(np.asarray(threshold_mm2_s, np.float64), (lab.shape[2],))
    csf_like = np.nan_to_num(diff, nan=0.0) > per_slice[None, None, :]  # never on a NaN threshold
    fa_lines: tuple[float, ...] = ()
    if fa is not None:
        aniso = np.asarray(fa, dtype=np.float64)
        aniso = aniso[:, :, None] if flat else aniso
        if aniso.shape != lab.shape:
            raise ValueError(f"labels {lab.shape} and FA {aniso.shape} are not on one grid")
        lines = fa_fraction * white_matter_median_fa(lab, aniso)
        csf_like |= np.nan_to_num(aniso, nan=np.inf) < lines[None, None, :]  # never on NaN FA or line
        fa_lines = tuple(float(t) for t in lines)
    csf_like &= lab > 0  # only labelled voxels can be trimmed: a slice without such voxels is skipped
    out = lab.copy()
    kept: list[int] = []
    for z in range(lab.shape[2]):
        before = int(np.count_nonzero(lab[:, :, z]))
        if before == 0 or not csf_like[:, :, z].any():
            continue
        trimmed = lab[:, :, z].copy()
        for _ in range(max_layers):
            cord = trimmed > 0
            outline = cord & ndimage.binary_dilation(~cord, _CROSS, border_value=1)
            drop = outline & csf_like[:, :, z]
            if not drop.any():
                break
            trimmed[drop] = 0
        trimmed = keep_largest_cord(trimmed)
        after = int(np.count_nonzero(trimmed))
        if after < min_cord_voxels(pixel_area_mm2):
            kept.append(z)
            continue
        out[:, :, z] = trimmed
        removed[z] = before - after
    return RimTrim(labels=out[:, :, 0] if flat else out, removed=removed, kept_slices=tuple(kept), cord_median_md=median,
                   thresholds_mm2_s=tuple(float(t) for t in per_slice), fa_thresholds=fa_lines)

