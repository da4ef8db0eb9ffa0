"""A confidence per region and per slice that a reviewer can act on.

Two signs of a mask the network is unsure of, combined into one number in [0, 1]:

- ``top_probability``: the mean, over the region's voxels, of the probability of the label
  each voxel carries (the network's top probability wherever the label is its argmax; lower
  where the refinement or the whole-mask pass overrode it);
- ``augmentation_dice``: the mean Dice of the region between the labels and the labellings of
  the b0 shifted by one voxel and mirrored left-right (:mod:`core.segment.tta`).

    confidence = sqrt(top_probability x augmentation_dice)

(the geometric mean: either being low pulls it down; with no augmentation run it is
``top_probability``). A region absent from the labels has no confidence (None); one present
in the labels but in no augmented labelling has Dice 0. Below :data:`WARN_BELOW` the report
warns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from core.labels import REGIONS
from core.segment.tta import Agreement

WARN_BELOW = 0.6
"""A region (whole volume) or a region on a slice below this confidence is named in a warning."""

FORMULA = "sqrt(top_probability * augmentation_dice)"


def _carried(labels: NDArray[np.integer], probabilities: NDArray[np.float32] | None) -> NDArray[np.float32]:
    """(X, Y, Z) probability of the label each voxel carries (1 without probabilities)."""
    if probabilities is None:
        return np.ones(labels.shape, dtype=np.float32)
    return np.take_along_axis(probabilities, labels[None].astype(np.intp), axis=0)[0]


def combine(top: float | None, dice: float | None) -> float | None:
    """``sqrt(top * dice)``; ``top`` alone when ``dice`` is None; None when ``top`` is."""
    if top is None:
        return None
    if dice is None:
        return float(top)
    return float(np.sqrt(max(0.0, top) * max(0.0, dice)))


def confidence_measures(
    labels: NDArray[np.integer], probabilities: NDArray[np.float32] | None, agreement: Agreement | None
) -> tuple[dict[int, dict[str, Any]], list[dict[int, dict[str, Any]]]]:
    """Per region ``{confidence, top_probability, augmentation_dice}`` over the volume (the
    Dice there a dict per augmentation plus ``mean``) and per axial slice (the mean only).

    labels : (X, Y, Z) codes; probabilities : (9, X, Y, Z) or None; agreement : from the
    segmentation (None: no augmentation ran).
    """
    carried = _carried(labels, probabilities)
    nz = labels.shape[2]
    mean_volume = agreement.mean_volume() if agreement is not None else None
    mean_slices = agreement.mean_slices() if agreement is not None else None
    volume: dict[int, dict[str, Any]] = {}
    slices: list[dict[int, dict[str, Any]]] = [{} for _ in range(nz)]
    for r, region in enumerate(REGIONS):
        inside = labels == region.code
        n = int(inside.sum())
        top = float(carried[inside].mean(dtype=np.float64)) if n else None
        dice = None
        if agreement is not None and n:
            dice = {name: float(np.nan_to_num(agreement.volume[a, r])) for a, name in enumerate(agreement.names)}
            dice["mean"] = float(np.nan_to_num(mean_volume[r]))  # type: ignore[index]
        volume[region.code] = {
            "confidence": combine(top, None if dice is None else dice["mean"]),
            "top_probability": top,
            "augmentation_dice": dice,
        }
        per_slice_n = inside.sum(axis=(0, 1))
        per_slice_top = np.where(inside, carried, 0.0).sum(axis=(0, 1), dtype=np.float64)
        for z in range(nz):
            top_z = float(per_slice_top[z] / per_slice_n[z]) if per_slice_n[z] else None
            dice_z = None
            if mean_slices is not None and per_slice_n[z]:
                dice_z = float(np.nan_to_num(mean_slices[z, r]))
            slices[z][region.code] = {
                "confidence": combine(top_z, dice_z),
                "top_probability": top_z,
                "augmentation_dice": dice_z,
            }
    return volume, slices


def confidence_warnings(
    volume: dict[int, dict[str, Any]], slices: list[dict[int, dict[str, Any]]], *, threshold: float = WARN_BELOW
) -> list[str]:
    """One sentence per region whose confidence is below ``threshold`` over the volume, or
    else on some slices."""
    warnings = []
    for region in REGIONS:
        entry = volume[region.code]
        c = entry["confidence"]
        if c is not None and c < threshold:
            dice = entry["augmentation_dice"]
            parts = f"mean top probability {entry['top_probability']:.2f}"
            if dice is not None:
                parts += f", Dice under test-time augmentation {dice['mean']:.2f}"
            warnings.append(f"the {region.name} is segmented with low confidence ({c:.2f}: {parts}); check its mask")
            continue
        low = [z for z, s in enumerate(slices) if s[region.code]["confidence"] is not None and s[region.code]["confidence"] < threshold]
        if low:
            warnings.append(
                f"the {region.name} is segmented with low confidence (below {threshold:.2f}) on slice(s) "
                f"{', '.join(map(str, low))}; check its mask there"
            )
    return warnings
