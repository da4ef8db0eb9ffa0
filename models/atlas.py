"""Build and load the compact derived atlas used by the synthetic-data generator.

The source is the PAM50 template and white/gray-matter tract atlas (De Leener et al.,
NeuroImage 2018; MIT, shipped with the Spinal Cord Toolbox). Its 36 probabilistic tracts are
grouped into the project's eight regions (the label codes of :mod:`core.labels`)::

    dorsal columns    left 00, 02            right 01, 03
    lateral funiculi  left 04-12 even        right 05-13 odd
    ventral funiculi  left 14-28 even        right 15-29 odd
    gray matter       left 30, 32, 34        right 31, 33, 35

Axial slices from the top of C2 to the bottom of C7 are stored every ``STEP_MM`` (1 mm) so that a
thick acquisition slice can be simulated by averaging neighbouring sub-slices. Arrays follow the
project convention ``[i, j]``: ``i`` along world +x (patient's right is larger ``i``) and ``j``
along world +y (anterior is larger ``j``). The orientation is derived from the NIfTI affine; an
assertion checks that the "left" tracts do land at smaller world x.

Build (needs a copy of the PAM50 template folder; the output is committed)::

    python -m models.atlas --pam50 PATH/TO/PAM50 --out models/atlas

At run time (generator, tests) only :func:`load_atlas` is used, which reads the repo copy.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)

ATLAS_DIR = Path(__file__).resolve().parent / "atlas"
ATLAS_FILE = ATLAS_DIR / "pam50_cervical_8region.npz"
SPACING_MM = 0.5
STEP_MM = 1.0
CROP_PX = 48  # 24 mm square around the cord at 0.5 mm: holds cord and CSF at every level

# Region code -> PAM50 tract IDs (codes as in core.labels).
GROUPS: dict[int, tuple[int, ...]] = {
    1: (4, 6, 8, 10, 12),  # left lateral
    2: (0, 2),  # left dorsal
    3: tuple(range(14, 29, 2)),  # left ventral
    4: (30, 32, 34),  # left gray
    5: (5, 7, 9, 11, 13),  # right lateral
    6: (1, 3),  # right dorsal
    7: tuple(range(15, 30, 2)),  # right ventral
    8: (31, 33, 35),  # right gray
}


@dataclass(frozen=True)
class Atlas:
    """The compact atlas, all arrays float32 in [0, 1].

    regions : (Z, 8, H, W) probability of region code 1..8 (index 0 is code 1)
    cord : (Z, H, W) cord mask (probabilistic after in-plane resampling)
    csf : (Z, H, W) CSF mask
    level : (Z,) vertebral level (2..7) of each sub-slice
    z_mm : (Z,) superior-inferior position of each sub-slice, mm (PAM50 world z)
    spacing_mm : in-plane voxel size, mm
    """

    regions: NDArray[np.float32]
    cord: NDArray[np.float32]
    csf: NDArray[np.float32]
    level: NDArray[np.int16]
    z_mm: NDArray[np.float32]
    spacing_mm: float


def _to_ras(data: NDArray, affine: NDArray) -> NDArray:
    """Reorient a 3D array to closest-canonical RAS using its affine."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, target)
    return nib.orientations.apply_orientation(data, transform)


def build_atlas(pam50: Path, out_dir: Path) -> Path:
    """Derive the compact 8-region atlas from PAM50 and write it to ``out_dir``."""
    import nibabel as nib

    levels_img: Any = nib.load(pam50 / "template" / "PAM50_levels.nii.gz")
    affine = levels_img.affine
    levels = _to_ras(np.asarray(levels_img.dataobj), affine)
    zooms = np.abs(nib.affines.voxel_sizes(affine))
    assert np.allclose(zooms, SPACING_MM), zooms
    # C2..C7 span along RAS z.
    in_cervical = np.isin(levels, [2, 3, 4, 5, 6, 7]).any(axis=(0, 1))
    z_idx = np.where(in_cervical)[0]
    step = round(STEP_MM / SPACING_MM)
    zs = np.arange(z_idx.min(), z_idx.max() + 1, step)
    cord_img: Any = nib.load(pam50 / "template" / "PAM50_cord.nii.gz")
    csf_img: Any = nib.load(pam50 / "template" / "PAM50_csf.nii.gz")
    cord = _to_ras(np.asarray(cord_img.dataobj), affine)
    csf = _to_ras(np.asarray(csf_img.dataobj), affine)
    # Crop centre: cord centroid over the cervical range (the PAM50 centreline is straight).
    ci, cj = np.argwhere(cord[:, :, zs] > 0)[:, :2].mean(axis=0)
    i0 = round(ci) - CROP_PX // 2
    j0 = round(cj) - CROP_PX // 2
    sl = (slice(i0, i0 + CROP_PX), slice(j0, j0 + CROP_PX))

    regions = np.zeros((len(zs), 8, CROP_PX, CROP_PX), np.float32)
    for code, ids in GROUPS.items():
        for tract in ids:
            img: Any = nib.load(pam50 / "atlas" / f"PAM50_atlas_{tract:02d}.nii.gz")
            assert np.allclose(img.affine, affine)
            vol = _to_ras(np.asarray(img.dataobj, dtype=np.float32), affine)
            regions[:, code - 1] += np.moveaxis(vol[sl[0], sl[1]][:, :, zs], 2, 0)
        log.info("region %d from tracts %s", code, ids)
    regions = np.clip(regions, 0.0, 1.0)
    cord_c = np.moveaxis(cord[sl[0], sl[1]][:, :, zs], 2, 0).astype(np.float32)
    csf_c = np.moveaxis(csf[sl[0], sl[1]][:, :, zs], 2, 0).astype(np.float32)
    lev = np.array([np.bincount(levels[:, :, z][levels[:, :, z] > 0].astype(int), minlength=10).argmax()
                    for z in zs], np.int16)
    z_world = (affine @ np.c_[np.zeros((len(zs), 2)), zs, np.ones(len(zs))].T)[2]

    _check_sides(regions)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ATLAS_FILE.name
    np.savez_compressed(
        path,
        regions=np.round(regions * 255).astype(np.uint8),
        cord=np.round(cord_c * 255).astype(np.uint8),
        csf=np.round(csf_c * 255).astype(np.uint8),
        level=lev,
        z_mm=z_world.astype(np.float32),
        spacing_mm=np.float32(SPACING_MM),
    )
    return path


def _check_sides(regions: NDArray[np.float32]) -> None:
    """Left regions (codes 1-4) must sit at smaller i (world x) than right ones; dorsal columns
    posterior (smaller j) to the ventral funiculi."""
    ii = np.arange(regions.shape[2])[:, None]
    jj = np.arange(regions.shape[3])[None, :]
    w = regions.sum(axis=0)  # (8, H, W)
    cx = [(w[k] * ii).sum() / w[k].sum() for k in range(8)]
    cy = [(w[k] * jj).sum() / w[k].sum() for k in range(8)]
    for k in range(4):
        assert cx[k] < cx[k + 4], f"left region {k + 1} not at smaller world x"
    assert cy[1] < cy[2] and cy[5] < cy[6], "dorsal columns not posterior to ventral funiculi"


def load_atlas(path: Path = ATLAS_FILE) -> Atlas:
    """Read the committed compact atlas (never the PAM50 source)."""
    with np.load(path) as f:
        return Atlas(
            regions=f["regions"].astype(np.float32) / 255.0,
            cord=f["cord"].astype(np.float32) / 255.0,
            csf=f["csf"].astype(np.float32) / 255.0,
            level=f["level"].astype(np.int16),
            z_mm=f["z_mm"].astype(np.float32),
            spacing_mm=float(f["spacing_mm"]),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pam50", type=Path, required=True, help="the PAM50 folder (atlas/ and template/)")
    parser.add_argument("--out", type=Path, default=ATLAS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    path = build_atlas(args.pam50, args.out)
    log.info("wrote %s (%.0f kB)", path, path.stat().st_size / 1e3)


if __name__ == "__main__":
    main()
