"""The QC picture: every axial slice of the mean b0 with the eight regions outlined, and the FA
map beside it, in radiological display (patient's left on the viewer's right, anterior up).

Drawn directly as an RGB array and written with Pillow: a plotting library would cost more time
than the whole analysis of a study (about 1 s to import and lay out 40 panels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from core.labels import REGIONS

PANEL_PX = 200
"""Target panel width (px); each voxel becomes a whole number of pixels, aspect ratio kept."""
CORD_PX = 64
"""Least width of the cord on a panel (px), whatever the voxel size."""
MAX_VOXEL_PX = 16
"""Most pixels per voxel, so a small cord on coarse voxels does not make a huge picture."""
MARGIN_MM = 5.0
"""Crop margin around the cord (all slices' cord together), mm."""

COLUMNS = 4  # slices per row (each slice: b0 panel + FA panel)
GAP = 4
TITLE_PX = 14
LEGEND_ROW_PX = 14
BACKGROUND = (20, 20, 20)
TEXT = (235, 235, 235)

# Viridis at nine evenly spaced points (matplotlib's table), interpolated linearly in between.
_VIRIDIS = np.array(
    [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
     [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float32
)


def viridis(values: NDArray[np.floating]) -> NDArray[np.uint8]:
    """Map values in [0, 1] (clipped; NaN -> 0) to RGB uint8, shape ``values.shape + (3,)``."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.minimum(v.astype(np.int64), len(_VIRIDIS) - 2)
    w = (v - lo)[..., None]
    return np.round(_VIRIDIS[lo] * (1 - w) + _VIRIDIS[lo + 1] * w).astype(np.uint8)


def _crop_box(labels: NDArray[np.integer], margin: int) -> tuple[slice, slice]:
    cord = labels.any(axis=2) if labels.any() else np.ones(labels.shape[:2], bool)
    ii, jj = np.nonzero(cord)
    i0, i1 = max(ii.min() - margin, 0), min(ii.max() + margin + 1, labels.shape[0])
    j0, j1 = max(jj.min() - margin, 0), min(jj.max() + margin + 1, labels.shape[1])
    return slice(i0, i1), slice(j0, j1)


def _display(image: NDArray[np.generic]) -> NDArray[np.generic]:
    """Canonical [i=x(R), j=y(A)] -> display rows top=anterior, columns left=patient's right."""
    return np.flipud(image.T)[:, ::-1]


def _enlarge(image: NDArray[np.generic], rows: int, cols: int) -> NDArray[np.generic]:
    """Nearest-neighbour enlargement: every pixel becomes a ``rows`` x ``cols`` block."""
    return np.repeat(np.repeat(image, rows, axis=0), cols, axis=1)


def _outlines(labels: NDArray[np.integer]) -> NDArray[np.bool_]:
    """Pixels of a labelled region whose 4-neighbour belongs to another label (region borders)."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edge & (labels > 0)


def _lut() -> NDArray[np.uint8]:
    lut = np.zeros((256, 3), dtype=np.uint8)
    for region in REGIONS:
        lut[region.code] = region.colour
    return lut


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
    zooms_mm : voxel size, used to keep the aspect ratio true and size the crop (cord + 5 mm).
        Panels are zoomed so the cord is at least ``CORD_PX`` wide.
    """
    margin = int(np.ceil(MARGIN_MM / min(zooms_mm[0], zooms_mm[1])))
    si, sj = _crop_box(labels, margin)
    nz = labels.shape[2]
    # Display rows run along y (zooms[1]), columns along x (zooms[0]).
    width_vox = si.stop - si.start
    cord_vox = max(width_vox - 2 * margin, 1)
    col_px = min(max(1, PANEL_PX // max(width_vox, 1), int(np.ceil(CORD_PX / cord_vox))), MAX_VOXEL_PX)
    row_px = max(1, int(round(col_px * zooms_mm[1] / zooms_mm[0])))
    panel_h, panel_w = (sj.stop - sj.start) * row_px, width_vox * col_px
    ncol = min(nz, COLUMNS)
    nrow = int(np.ceil(nz / ncol))
    cell_w, cell_h = 2 * panel_w + 3 * GAP, panel_h + TITLE_PX + GAP
    legend_h = LEGEND_ROW_PX * int(np.ceil(len(REGIONS) / 4)) + GAP
    header = TITLE_PX + GAP
    canvas = np.empty((header + nrow * cell_h + legend_h, max(ncol * cell_w, 4 * 150), 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    lo, hi = np.percentile(b0[si, sj], [1, 99.5]) if b0.size else (0.0, 1.0)
    lut = _lut()
    texts: list[tuple[tuple[int, int], str]] = []
    for z in range(nz):
        top = header + (z // ncol) * cell_h
        left = (z % ncol) * cell_w + GAP
        grey = np.clip((_display(b0[si, sj, z]) - lo) / max(hi - lo, 1e-12), 0, 1)
        grey_rgb = np.repeat((_enlarge(grey, row_px, col_px) * 255).astype(np.uint8)[..., None], 3, axis=2)
        lab = _enlarge(_display(labels[si, sj, z]), row_px, col_px)
        edge = _outlines(lab)
        grey_rgb[edge] = lut[lab[edge]]
        y0 = top + TITLE_PX
        canvas[y0 : y0 + panel_h, left : left + panel_w] = grey_rgb
        x_fa = left + panel_w + GAP
        canvas[y0 : y0 + panel_h, x_fa : x_fa + panel_w] = viridis(_enlarge(_display(fa[si, sj, z]), row_px, col_px))
        texts += [((left, top), f"slice {z} b0"), ((x_fa, top), "FA"),
                  ((left + 2, y0 + panel_h // 2 - 5), "R"), ((left + panel_w - 9, y0 + panel_h // 2 - 5), "L")]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((GAP, 1), title or "scsnet QC (radiological view: patient's left on the right, anterior up)", fill=TEXT, font=font)
    for xy, text in texts:
        draw.text(xy, text, fill=TEXT, font=font)
    legend_top = canvas.shape[0] - legend_h
    for n, region in enumerate(REGIONS):
        x, y = GAP + (n % 4) * 150, legend_top + (n // 4) * LEGEND_ROW_PX
        draw.rectangle((x, y + 2, x + 9, y + 11), fill=tuple(region.colour))
        draw.text((x + 13, y), f"{region.code} {region.name}", fill=TEXT, font=font)
    image.save(out_path, format="PNG", compress_level=3)
