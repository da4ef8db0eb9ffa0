"""The QC picture: every axial slice of the mean b0 with the eight regions outlined, and the FA
map beside it, in radiological display (patient's left on the viewer's right, anterior up)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from numpy.typing import NDArray  # noqa: E402
from scipy import ndimage  # noqa: E402

from worker.labels import REGIONS  # noqa: E402

UPSAMPLE = 4  # outline drawn on a 4x finer grid so one-voxel regions stay visible


def _rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    return (colour[0] / 255.0, colour[1] / 255.0, colour[2] / 255.0)


def _crop_box(labels: NDArray[np.integer], margin: int) -> tuple[slice, slice]:
    cord = labels.any(axis=2) if labels.any() else np.ones(labels.shape[:2], bool)
    ii, jj = np.nonzero(cord)
    i0, i1 = max(ii.min() - margin, 0), min(ii.max() + margin + 1, labels.shape[0])
    j0, j1 = max(jj.min() - margin, 0), min(jj.max() + margin + 1, labels.shape[1])
    return slice(i0, i1), slice(j0, j1)


def _display(image: NDArray[np.generic]) -> NDArray[np.generic]:
    """Canonical [i=x(R), j=y(A)] -> display rows top=anterior, columns left=patient's right."""
    return np.flipud(image.T)[:, ::-1]


def write_qc_png(
    b0: NDArray[np.floating],
    fa: NDArray[np.floating],
    labels: NDArray[np.integer],
    out_path: Path,
    *,
    zooms_mm: tuple[float, float, float],
    title: str = "",
) -> None:
    """Write the QC PNG.

    b0, fa, labels : (X, Y, Z) on the canonical RAS grid (axial slices along Z).
    zooms_mm : voxel size, used to keep the aspect ratio true and size the crop (15 mm margin).
    """
    margin = int(np.ceil(15.0 / min(zooms_mm[0], zooms_mm[1])))
    si, sj = _crop_box(labels, margin)
    nz = labels.shape[2]
    ncol = 2 * min(nz, 4)
    nrow = int(np.ceil(nz / (ncol // 2)))
    aspect = zooms_mm[1] / zooms_mm[0]
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.2 * ncol, 2.3 * nrow + 0.8), squeeze=False)
    lo, hi = np.percentile(b0[si, sj], [1, 99.5]) if b0.size else (0, 1)
    for z in range(nrow * (ncol // 2)):
        ax_b0, ax_fa = axes[z // (ncol // 2), 2 * (z % (ncol // 2))], axes[z // (ncol // 2), 2 * (z % (ncol // 2)) + 1]
        for ax in (ax_b0, ax_fa):
            ax.set_axis_off()
        if z >= nz:
            continue
        img = _display(b0[si, sj, z])
        ax_b0.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        lab = _display(labels[si, sj, z])
        fine = ndimage.zoom(lab, UPSAMPLE, order=0)
        extent = (-0.5, lab.shape[1] - 0.5, lab.shape[0] - 0.5, -0.5)
        for region in REGIONS:
            mask = (fine == region.code).astype(float)
            if mask.any():
                ax_b0.contour(mask, levels=[0.5], colors=[_rgb(region.colour)], linewidths=0.9, extent=extent, origin="upper")
        ax_b0.set_title(f"slice {z} b0", fontsize=7)
        ax_b0.text(0.02, 0.5, "R", color="w", fontsize=7, transform=ax_b0.transAxes, va="center")
        ax_b0.text(0.93, 0.5, "L", color="w", fontsize=7, transform=ax_b0.transAxes, va="center")
        ax_fa.imshow(_display(fa[si, sj, z]), cmap="viridis", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        ax_fa.set_title(f"slice {z} FA", fontsize=7)
    handles = [Patch(color=_rgb(r.colour), label=f"{r.code} {r.name}") for r in REGIONS]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(title or "scsnet QC (radiological view: patient's left on the right, anterior up)", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
