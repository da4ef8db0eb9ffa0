"""Probability-weighted regional means of the tensor maps, beside the binary means.

A region of 2-10 voxels (a gray-matter horn at 0.9 mm in-plane) moves by percents when one
voxel is labelled wrongly. Weighting every voxel by the network's probability that it belongs
to the region (as Spinal Cord Toolbox's ``sct_extract_metric -method wa`` weights by an
atlas's probabilities) makes an uncertain edge voxel count for a part, not a whole:

    mean_w(region r) = sum_v w_r(v) x(v) / sum_v w_r(v),
    w_r(v) = P_r(v)  where P_r(v) >= MIN_WEIGHT, v is in the cord dilated by one voxel
             in-plane (4-connected), and x(v) is fitted and finite; 0 elsewhere,

with ``P_r`` the softmax of code ``r`` on the b0 grid (``Segmentation.probabilities``; after
the refinement a voxel trimmed off as CSF has ``P_r = 0``, :mod:`core.segment.refine`). With
one-hot probabilities (or none: the labels taken as one-hot) it equals the binary mean.

The price of that steadiness is a pull towards the neighbouring tissue wherever the network's
probabilities spread beyond the region: on the soft-edge phantom of
``tests/test_weighted_measures.py`` (9 gray-matter voxels, FA 0.40, in white matter, FA 0.80)
one mislabelled edge voxel moves the binary mean 0.400 -> 0.440 and the weighted one
0.612 -> 0.613, but the weighted one is far from 0.40 throughout. Hence the measurement on the
renderers before either becomes the default.

Which estimator the report puts forward is :data:`DEFAULT_ESTIMATOR`, the one place to switch
it; the report always carries both (``fa``/``md`` summaries and ``fa_weighted``/``md_weighted``)
and names the chosen one in ``estimator``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from core.labels import REGIONS
from core.tensor.fit import TensorMaps

Estimator = Literal["binary-mean", "probability-weighted-mean"]

DEFAULT_ESTIMATOR: Estimator = "binary-mean"
"""The estimator the report puts forward (``estimator``; :func:`headline`). Kept at today's
binary mean until the two are compared on the evaluation renderers; change it here only."""

MIN_WEIGHT = 0.05
"""Probabilities below this weigh nothing: the long tail of the softmax far from a region."""

WEIGHTED_KEYS = ("fa", "md")

_CROSS = ndimage.generate_binary_structure(2, 1)[:, :, None]


def support(labels: NDArray[np.integer]) -> NDArray[np.bool_]:
    """(X, Y, Z) the cord (``labels > 0``) dilated by one voxel in-plane (4-connected)."""
    return ndimage.binary_dilation(labels > 0, _CROSS)


def region_weights(
    labels: NDArray[np.integer], probabilities: NDArray[np.float32] | None, code: int, *, within: NDArray[np.bool_]
) -> NDArray[np.float32]:
    """(X, Y, Z) weights of region ``code``: ``P_code`` where at least ``MIN_WEIGHT`` inside
    ``within``, else 0; one-hot from ``labels`` when ``probabilities`` is None."""
    if probabilities is None:
        return (labels == code).astype(np.float32)
    p = probabilities[code]
    return np.where(within & (p >= MIN_WEIGHT), p, 0.0).astype(np.float32)


def weighted_mean(values: NDArray[np.floating], weights: NDArray[np.floating], valid: NDArray[np.bool_]) -> float | None:
    """sum(w x) / sum(w) over ``valid`` voxels with finite ``values``; None when no weight."""
    use = valid & np.isfinite(values) & (weights > 0)
    total = float(weights[use].sum(dtype=np.float64))
    if total <= 0.0:
        return None
    return float((weights[use].astype(np.float64) * values[use]).sum() / total)


def weighted_measures(
    labels: NDArray[np.integer], probabilities: NDArray[np.float32] | None, maps: TensorMaps
) -> tuple[dict[int, dict[str, float | None]], list[dict[int, dict[str, float | None]]]]:
    """Probability-weighted FA and MD per region, over the volume and per axial slice.

    Parameters
    ----------
    labels : (X, Y, Z) codes 0-8; probabilities : (9, X, Y, Z) softmax or None; maps : the
        tensor maps (FA dimensionless, MD mm^2/s) on the same grid, fitted where ``maps.mask``.

    Returns
    -------
    ``({code: {"fa_weighted", "md_weighted"}}, [per slice {code: {...}}])``; None where a region
    has no weight.
    """
    within = support(labels)
    valid = np.asarray(maps.mask, dtype=bool)
    volume: dict[int, dict[str, float | None]] = {}
    slices: list[dict[int, dict[str, float | None]]] = [{} for _ in range(labels.shape[2])]
    for region in REGIONS:
        w = region_weights(labels, probabilities, region.code, within=within)
        volume[region.code] = {f"{k}_weighted": weighted_mean(getattr(maps, k), w, valid) for k in WEIGHTED_KEYS}
        for z in range(labels.shape[2]):
            slices[z][region.code] = {
                f"{k}_weighted": weighted_mean(getattr(maps, k)[:, :, z], w[:, :, z], valid[:, :, z]) for k in WEIGHTED_KEYS
            }
    return volume, slices


def headline(entry: dict[str, Any], key: str, *, estimator: Estimator = DEFAULT_ESTIMATOR) -> float | None:
    """The value of ``key`` ("fa" or "md") a reader should be shown for a report's region
    entry (``regions[i]``) or slice-region entry (``slices[j]["regions"][k]``), by ``estimator``."""
    if estimator == "probability-weighted-mean":
        return entry.get(f"{key}_weighted")
    summary = entry.get(key)
    return summary["mean"] if isinstance(summary, dict) else entry.get(f"{key}_mean")
