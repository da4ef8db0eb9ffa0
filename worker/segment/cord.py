"""Connected-component rules shared by the run-time and the CSF-rim trim."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage


def keep_largest_cord(labels: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Zero every labelled component of a (H, W) slice but the largest (one connected cord,
    4-connected)."""
    components, n = ndimage.label(labels > 0)
    if n <= 1:
        return labels
    sizes = ndimage.sum_labels(np.ones_like(labels), components, index=np.arange(1, n + 1))
    keep = components == (int(np.argmax(sizes)) + 1)
    return np.where(keep, labels, 0).astype(np.uint8)
