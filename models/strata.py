"""Bins for splitting evaluation scores by what makes an image hard, shared by the slice
(:mod:`models.evaluate`) and the study-level (:mod:`models.cases`) evaluations."""

from __future__ import annotations

import numpy as np

VOXEL_BINS = ("0.6-1.0 mm", "1.0-1.4 mm", "1.4-1.8 mm")
VOXEL_EDGES_MM = (1.0, 1.4)
"""In-plane voxel size (the larger side) bins and the edges between them."""


def bin_of(value: float, edges: tuple[float, ...], names: tuple[str, ...]) -> str:
    """``names[i]`` for ``edges[i - 1] <= value < edges[i]`` (``len(names) == len(edges) + 1``)."""
    return names[int(np.searchsorted(edges, value, side="right"))]
