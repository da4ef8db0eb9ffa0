"""Out-of-distribution check: real cervical images of other contrasts with reference masks.

The network is trained on synthetic b0 slices only; the one real DWI has no reference mask.
This check runs the run-time segmenter on real images that are *rendered differently* (not
EPI, not b0) but do come with references, from Spinal Cord Toolbox's ``sct_testing_data``
(subject errsm_30, MIT; copied to ``tests/data/sct_testing_data``):

``t2s``
    Axial T2*-weighted GRE, 0.5 x 0.5 x 7.5 mm: a 49 x 54 x 9 crop around the cord (24.5 x 27 mm,
    a very reduced field of view) with its cord mask (``t2s_seg``) and a **manual**
    gray-matter mask; and the uncropped 320 x 320 x 11 volume (the whole neck; resliced
    differently, so the crop's cord mask does not apply) with its own manual gray-matter mask.
    Each is scored at the native 0.5 mm and block-averaged to 1.0 mm (a DTI-like voxel;
    references become the voxels at least half inside).
``mt1``
    Axial MT-weighted GRE, 40 x 40 x 5, 0.84 x 0.84 x 17 mm. References: the cord mask
    (``mt1_seg``), a manual gray-matter mask (``mt1_gmseg_goldstandard``) and the PAM50 tract
    atlas registered to it by SCT (grouped into our eight regions as in :mod:`models.atlas`;
    a registration, not a rater, so its region Dice is only indicative).

Neither contrast is a b0: CSF is bright and the cord darker as in a b0, but the gray/white
contrast, the surrounding tissue and the noise differ. The numbers say how the model carries
over to images it has never seen, not how accurate it is on DTI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from numpy.typing import NDArray

from core.labels import BY_CODE
from models.atlas import GROUPS
from models.generator import block_average

DEFAULT_DIR = Path("tests/data/sct_testing_data")
GRAY = (4, 8)


@dataclass
class Case:
    """One real volume in closest-canonical RAS, with references on its grid.

    image : (X, Y, Z) float32; cord (or None: no cord reference), gray : (X, Y, Z) bool;
    regions : (X, Y, Z) uint8 codes 0-8 or None; scored : (Z,) bool, the slices the references
    cover; zooms_mm : voxel size (x, y, z) in mm.
    """

    name: str
    image: NDArray[np.float32]
    cord: NDArray[np.bool_] | None
    gray: NDArray[np.bool_]
    regions: NDArray[np.uint8] | None
    scored: NDArray[np.bool_]
    zooms_mm: tuple[float, float, float]


def _on_grid(path: Path, target: Any) -> NDArray[np.float32]:
    """A reference volume brought onto ``target``'s grid by world coordinates (nearest)."""
    ref = nib.load(path)
    return np.asarray(resample_from_to(ref, target, order=0, cval=0.0).dataobj, np.float32)


def _atlas_regions(folder: Path, target: Any) -> NDArray[np.uint8]:
    """Eight-region codes from the registered PAM50 tracts: argmax of the grouped tract
    probabilities where their sum is at least 0.5, else 0."""
    groups = []
    for code in range(1, 9):
        groups.append(sum(_on_grid(folder / f"PAM50_atlas_{t:02d}.nii.gz", target) for t in GROUPS[code]))
    g = np.stack(groups)
    return np.where(g.sum(axis=0) >= 0.5, g.argmax(axis=0) + 1, 0).astype(np.uint8)


def load_cases(folder: Path = DEFAULT_DIR) -> list[Case]:
    """The ``t2s`` (crop and whole neck, each native and at 1.0 mm) and ``mt1`` cases of
    ``folder`` (see the module docstring)."""
    cases = []
    for name, image_file, cord_file, gray_file in (
        ("t2s crop", "t2s.nii.gz", "t2s_seg.nii.gz", "t2s_gmseg_manual.nii.gz"),
        ("t2s neck", "t2s_uncropped.nii.gz", None, "t2s_uncropped_gmseg_manual.nii.gz"),
    ):
        img = nib.as_closest_canonical(nib.load(folder / "t2s" / image_file))
        image = np.asarray(img.dataobj, np.float32)
        gray = _on_grid(folder / "t2s" / gray_file, img) > 0.5
        cord = _on_grid(folder / "t2s" / cord_file, img) > 0.5 if cord_file else None
        scored = (cord if cord is not None else gray).any(axis=(0, 1))
        zx, zy, zz = (float(z) for z in img.header.get_zooms()[:3])
        cases.append(Case(f"{name} 0.5", image, cord, gray, None, scored, (zx, zy, zz)))
        cases.append(Case(f"{name} 1.0", _block(image), None if cord is None else _block(cord) >= 0.5,
                          _block(gray) >= 0.5, None, scored, (2 * zx, 2 * zy, zz)))
    mt = nib.as_closest_canonical(nib.load(folder / "mt/mt1.nii.gz"))
    cord = _on_grid(folder / "mt/mt1_seg.nii.gz", mt) > 0.5
    gray = _on_grid(folder / "mt/mt1_gmseg_goldstandard.nii.gz", mt) > 0.5
    regions = _atlas_regions(folder / "mt/label/atlas", mt)
    zx, zy, zz = (float(z) for z in mt.header.get_zooms()[:3])
    cases.append(Case("mt1 0.84", np.asarray(mt.dataobj, np.float32), cord, gray, regions, cord.any(axis=(0, 1)),
                      (zx, zy, zz)))
    return cases


def _block(x: NDArray) -> NDArray[np.float32]:
    """2 x 2 in-plane block average of an (X, Y, Z) volume (odd edges dropped)."""
    return np.moveaxis(block_average(np.moveaxis(np.asarray(x, np.float32), 2, 0), 2), 0, 2)


def _dice(p: NDArray[np.bool_], g: NDArray[np.bool_]) -> float:
    return float(2 * (p & g).sum() / max(p.sum() + g.sum(), 1))


def score(case: Case, labels: NDArray[np.uint8]) -> dict[str, Any]:
    """Scores of predicted ``labels`` (X, Y, Z) on the case's scored slices: slices with a
    cord found, whole-cord Dice, gray-matter Dice (codes 4 + 8 against the manual mask),
    per-region Dice against the registered atlas (mt1 only, on the slices it reaches), and on how many slices the left
    regions lie at smaller x and the dorsal columns posterior to the ventral funiculi."""
    z = case.scored
    pred = labels[:, :, z]
    found = int((pred > 0).any(axis=(0, 1)).sum())
    sides = dorsal = 0
    for k in range(pred.shape[2]):
        lab = pred[:, :, k]
        ii, jj = np.indices(lab.shape)
        left, right = np.isin(lab, [1, 2, 3, 4]), np.isin(lab, [5, 6, 7, 8])
        dors, vent = np.isin(lab, [2, 6]), np.isin(lab, [3, 7])
        if left.any() and right.any() and ii[left].mean() < ii[right].mean():
            sides += 1
        if dors.any() and vent.any() and jj[dors].mean() < jj[vent].mean():
            dorsal += 1
    out: dict[str, Any] = {
        "case": case.name, "slices": int(z.sum()), "cord_found": found, "left_at_smaller_x": sides,
        "dorsal_posterior": dorsal,
        "gray_dice": _dice(np.isin(pred, GRAY), case.gray[:, :, z]),
    }
    if case.cord is not None:
        cord = case.cord[:, :, z]
        out["cord_dice"] = _dice(pred > 0, cord)
        out["cord_area_ratio"] = float((pred > 0).sum() / max(cord.sum(), 1))
    if case.regions is not None:
        # the registered atlas does not reach every slice: score the regions where it does
        has = z & (case.regions > 0).any(axis=(0, 1))
        ref, reg = case.regions[:, :, has], labels[:, :, has]
        out["region_slices"] = int(has.sum())
        out["region_dice"] = {BY_CODE[c].key: _dice(reg == c, ref == c) for c in range(1, 9)}
    return out


def check(segment: Any, folder: Path = DEFAULT_DIR) -> list[dict[str, Any]]:
    """Run ``segment(volume, zooms_mm) -> labels`` on every case and score it."""
    return [score(c, segment(c.image, c.zooms_mm)) for c in load_cases(folder)]


def print_check(rows: list[dict[str, Any]]) -> str:
    lines = ["Real anatomy of other contrasts (sct_testing_data, errsm_30; voxel in mm): scored slices, cord found, "
             "left at smaller x, dorsal posterior, whole-cord Dice, predicted / reference cord area, gray-matter Dice",
             f"{'case':<13}{'slices':>7}{'found':>6}{'L<R':>5}{'D<V':>5}{'cord Dice':>10}{'area ratio':>11}{'GM Dice':>8}"]
    for r in rows:
        cord = f"{r['cord_dice']:>10.3f}{r['cord_area_ratio']:>11.2f}" if "cord_dice" in r else f"{'-':>10}{'-':>11}"
        lines.append(f"{r['case']:<13}{r['slices']:>7d}{r['cord_found']:>6d}{r['left_at_smaller_x']:>5d}"
                     f"{r['dorsal_posterior']:>5d}{cord}{r['gray_dice']:>8.3f}")
        if "region_dice" in r:
            lines.append(f"  region Dice against the registered atlas ({r['region_slices']} slices): "
                         + ", ".join(f"{k} {v:.2f}" for k, v in r["region_dice"].items()))
    return "\n".join(lines)
