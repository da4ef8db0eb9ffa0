"""The cord's in-plane orientation, and turning a crop to it and back.

The network was trained on cords turned by up to +-20 degrees in-plane, and it reads a cord
turned further, or flattened and turned, less well: on the independent yardstick
(``models/yardstick``, cords turned by up to +-25 degrees) the severely compressed studies turned
by 20 degrees or more scored a mean region Dice of 0.735 against 0.828 for those turned by less
than 10 (seeds 0-3). A healthy cord is wider from side to side than from front to back (1.5-2x;
a compressed one 2-4x), so the principal axis of its cross-section gives the turn: pass 2 then
also segments each crop turned back so that the cord lies as the training's did on average,
turns that answer forward again and averages it with the answer as the crop lies
(:meth:`core.segment.runtime.Segmenter.segment`). Either view alone swings a study's region
Dice by several hundredths either way (a turned crop is a little blurred; the long axis of an
outline is not exactly the anatomy's left-right); their mean is steadier. On the network's
first pass over 192 yardstick studies (seeds 0-5, measured on the b0 before any refinement) the
mean region Dice was 0.8139 as the crops lie, 0.8153 with those turned by 10 degrees or more
seen turned back only, and 0.8183 with the two views averaged (0.8186 / 0.8182 / 0.8182 on
seeds 0-1 / 2-3 / 4-5, against 0.8151 / 0.8117 / 0.8150). As the service runs (the refinement
included) over 256 studies (seeds 0-7; 6-7 drawn only to confirm): mean region Dice 0.8525 to
0.8586, FA error 2.85 to 2.79 % (``models/scsnet/MODEL_CARD.md``, "The turn").

Angles are in degrees, measured in the slice's (first axis, second axis) plane from the first
axis towards the second; on the model grid the two axes have the same spacing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

MIN_TURN_DEG = 10.0
"""A cord turned by less than this (degrees) is segmented as it lies only: well inside the
training's +-20 degrees (``models.generator``), and not worth another pass."""

MIN_ELONGATION = 1.2
"""The cross-section's long to short axis ratio (the square root of its second moments' ratio)
below which its orientation is not taken as known: a nearly round outline has no clear long axis."""

MIN_PIXELS = 20
"""A slice's cord needs this many pixels to count towards the orientation."""


def cord_turn_deg(cords: Iterable[NDArray[np.bool_]]) -> float:
    """The angle (degrees, -90 to 90) of the long axis of the cord cross-sections in ``cords``
    ((H, W) masks on one isotropic grid, one per slice), pooled over the slices after centring
    each on its own centroid; 0.0 where it is below :data:`MIN_TURN_DEG`, where the pooled
    outline is nearly round (:data:`MIN_ELONGATION`) or where no slice holds
    :data:`MIN_PIXELS` cord pixels."""
    centred = []
    for cord in cords:
        ij = np.argwhere(cord).astype(np.float64)
        if len(ij) >= MIN_PIXELS:
            centred.append(ij - ij.mean(axis=0))
    if not centred:
        return 0.0
    points = np.concatenate(centred)
    c = points.T @ points / len(points)  # (2, 2) second moments, pixels^2
    small, large = np.linalg.eigvalsh(c)
    if large < MIN_ELONGATION**2 * max(small, 1e-9):
        return 0.0
    angle = 0.5 * math.degrees(math.atan2(2.0 * c[0, 1], c[0, 0] - c[1, 1]))
    return angle if abs(angle) >= MIN_TURN_DEG else 0.0


def turn(image: NDArray[np.float32], angle_deg: float) -> NDArray[np.float32]:
    """``image`` ((..., H, W)) turned about its centre by ``angle_deg`` over its last two axes
    (bilinear; the edge value where the turned image leaves the field). A mask turned by
    ``-cord_turn_deg(...)`` has its long axis along the first axis."""
    if angle_deg == 0.0:
        return image
    out = ndimage.rotate(image, angle_deg, axes=(-2, -1), reshape=False, order=1, mode="nearest")
    return np.asarray(out, dtype=np.float32)


def turn_probabilities(probabilities: NDArray[np.float32], angle_deg: float) -> NDArray[np.float32]:
    """(C, H, W) class probabilities turned by ``angle_deg`` like :func:`turn`, kept a
    distribution (non-negative, summing to 1 over C)."""
    if angle_deg == 0.0:
        return probabilities
    out = np.clip(turn(probabilities, angle_deg), 0.0, None)
    out /= np.maximum(out.sum(axis=0, keepdims=True), np.float32(1e-12))
    return out
