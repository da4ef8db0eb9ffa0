"""Scoring pieces shared by the slice (:mod:`models.evaluate`) and the study-level
(:mod:`models.cases`) evaluations: the paper's FA feature error and the bins that split scores
by what makes an image hard."""

from __future__ import annotations

import numpy as np

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
