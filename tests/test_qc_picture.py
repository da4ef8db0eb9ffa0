"""The QC picture: drawn from the arrays, every region outlined in its colour, FA beside b0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import phantoms
from PIL import Image

from core.labels import REGIONS
from core.report.qc import viridis, write_qc_png


def test_every_region_is_outlined_in_its_colour_and_fa_is_drawn(tmp_path: Path) -> None:
    labels = phantoms.region_labels((60, 50, 5), radius_vox=9.0)
    b0 = np.where(labels > 0, 100.0, 20.0).astype(np.float32)
    fa = np.where(labels > 0, 0.7, 0.0).astype(np.float32)
    out = tmp_path / "qc.png"
    write_qc_png(b0, fa, labels, out, zooms_mm=(0.8, 0.8, 5.0))
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in np.unique(pixels, axis=0)}
    for region in REGIONS:
        assert tuple(region.colour) in colours, region.name
    assert tuple(viridis(np.array(0.7))) in colours  # the FA panel


def test_a_slice_without_cord_still_gets_its_panels(tmp_path: Path) -> None:
    labels = phantoms.region_labels((40, 36, 3))
    labels[:, :, 2] = 0
    out = tmp_path / "qc.png"
    write_qc_png(np.ones(labels.shape, np.float32), np.zeros(labels.shape, np.float32), labels, out, zooms_mm=(1.0, 2.0, 4.0))
    image = Image.open(out)
    assert image.format == "PNG" and image.width > 3 * 2 * 40 and image.height > 36


def test_viridis_ends_and_clipping() -> None:
    assert viridis(np.array([0.0, 1.0, -1.0, 2.0, np.nan])).tolist() == [[68, 1, 84], [253, 231, 37], [68, 1, 84], [253, 231, 37], [68, 1, 84]]
