"""Scoring pieces shared by the slice (:mod:`models.evaluate`), the study-level
(:mod:`models.cases`) and the yardstick (:mod:`models.yardstick.bench`) evaluations: the paper's
FA feature error, the bins that split scores by what makes an image hard, and the rank
correlation of the confidence with the error."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

VOXEL_BINS = ("0.6-1.0 mm", "1.0-1.4 mm", "1.4-1.8 mm")
VOXEL_EDGES_MM = (1.0, 1.4)
"""In-plane voxel size (the larger side) bins and the edges between them."""


def bin_of(value: float, edges: tuple[float, ...], names: tuple[str, ...]) -> str:
    """``names[i]`` for ``edges[i - 1] <= value < edges[i]`` (``len(names) == len(edges) + 1``)."""
    return names[int(np.searchsorted(edges, value, side="right"))]


def fa_error_pct(pred_mean: float, true_mean: float) -> float:
    """The paper's DTI feature index error, signed: (predicted - true) / true mean FA, in %.

    Its absolute value is the error as the paper reports it; the sign is the bias.
    """
    return (pred_mean - true_mean) / true_mean * 100


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (:func:`scipy.stats.spearmanr`, average ranks for ties) of the
    pairs where both are defined; NaN with fewer than 3 pairs or a constant side."""
    pairs = np.array([(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))])
    if len(pairs) < 3 or np.ptp(pairs[:, 0]) == 0 or np.ptp(pairs[:, 1]) == 0:
        return math.nan
    return float(stats.spearmanr(pairs[:, 0], pairs[:, 1]).statistic)
