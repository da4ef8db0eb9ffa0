"""Per-region, per-slice and whole-cord measures of the tensor maps inside the label map.

All inputs live on one voxel grid with axial slices along the third axis. Diffusivities are in
mm^2/s, areas in mm^2, volumes in mm^3; FA is dimensionless.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from core.labels import REGIONS
from core.tensor.fit import TensorMaps

MAP_KEYS = ("fa", "md", "ad", "rd")


def summary(values: NDArray[np.floating]) -> dict[str, float | None]:
    """Mean, SD (population), median and quartiles of ``values``; None for an empty set."""
    if values.size == 0:
        return {"mean": None, "sd": None, "median": None, "p25": None, "p75": None}
    v = np.asarray(values, dtype=np.float64)
    p25, median, p75 = np.percentile(v, [25.0, 50.0, 75.0])
    return {
        "mean": float(v.mean()),
        "sd": float(v.std()),
        "median": float(median),
        "p25": float(p25),
        "p75": float(p75),
    }


def _mean(values: NDArray[np.floating]) -> float | None:
    return float(np.mean(values, dtype=np.float64)) if values.size else None


def region_measures(labels: NDArray[np.integer], maps: TensorMaps, *, voxel_volume_mm3: float) -> list[dict[str, Any]]:
    """One entry per region (codes 1-8): voxel count, volume and FA/MD/AD/RD summaries.

    labels : (X, Y, Z) codes 0-8; maps : tensor maps on the same grid.
    """
    out = []
    for region in REGIONS:
        inside = labels == region.code
        entry: dict[str, Any] = {
            "code": region.code,
            "key": region.key,
            "name": region.name,
            "side": region.side,
            "voxels": int(inside.sum()),
            "volume_mm3": float(inside.sum() * voxel_volume_mm3),
        }
        for key in MAP_KEYS:
            entry[key] = summary(getattr(maps, key)[inside])
        out.append(entry)
    return out


def cord_measures(labels: NDArray[np.integer], maps: TensorMaps, *, voxel_volume_mm3: float) -> dict[str, Any]:
    """Whole-cord totals: every labelled voxel together."""
    inside = labels > 0
    entry: dict[str, Any] = {"voxels": int(inside.sum()), "volume_mm3": float(inside.sum() * voxel_volume_mm3)}
    for key in MAP_KEYS:
        entry[key] = summary(getattr(maps, key)[inside])
    return entry


def slice_measures(
    labels: NDArray[np.integer], maps: TensorMaps, *, pixel_area_mm2: float
) -> tuple[list[dict[str, Any]], int | None]:
    """Per axial slice: cord cross-sectional area (mm^2) and each region's voxels and mean FA/MD.

    Returns the list (one entry per slice, in slice order) and the index of the most compressed
    slice (smallest non-zero cord area), or None when no slice holds cord.
    """
    entries: list[dict[str, Any]] = []
    smallest: tuple[float, int] | None = None
    for z in range(labels.shape[2]):
        lab = labels[:, :, z]
        cord = lab > 0
        area = float(cord.sum() * pixel_area_mm2)
        regions = {}
        for region in REGIONS:
            inside = lab == region.code
            regions[region.key] = {
                "voxels": int(inside.sum()),
                "fa_mean": _mean(maps.fa[:, :, z][inside]),
                "md_mean": _mean(maps.md[:, :, z][inside]),
            }
        entries.append(
            {
                "index": z,
                "cord_area_mm2": area,
                "cord_fa_mean": _mean(maps.fa[:, :, z][cord]),
                "cord_md_mean": _mean(maps.md[:, :, z][cord]),
                "regions": regions,
            }
        )
        if area > 0 and (smallest is None or area < smallest[0]):
            smallest = (area, z)
    return entries, (smallest[1] if smallest else None)


def missing_region_warnings(slices: list[dict[str, Any]]) -> list[str]:
    """One sentence per region absent from slices that hold cord."""
    warnings = []
    for region in REGIONS:
        absent = [s["index"] for s in slices if s["cord_area_mm2"] > 0 and s["regions"][region.key]["voxels"] == 0]
        if absent:
            warnings.append(f"the {region.name} is missing on slice(s) {', '.join(map(str, absent))}")
    return warnings


def b0_snr(b0_volumes: NDArray[np.floating], cord: NDArray[np.bool_]) -> float | None:
    """Signal-to-noise ratio of the b0 in the cord.

    With two or more b=0 volumes: mean cord signal / noise SD, the noise SD estimated per voxel
    from the spread across the b=0 volumes (median over the cord). Returns None with one b=0
    volume or no cord.

    b0_volumes : (X, Y, Z, K) the b=0 volumes; cord : (X, Y, Z) bool.
    """
    if b0_volumes.shape[3] < 2 or not cord.any():
        return None
    signal = b0_volumes[cord]
    noise = float(np.median(signal.std(axis=1, ddof=1)))
    if noise <= 0:
        return None
    return float(signal.mean() / noise)
