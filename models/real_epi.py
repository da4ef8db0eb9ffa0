"""Real-EPI check: the network's cord on a real GRE-EPI mean image of the cervical cord against
two cord tracings (``models/data/fmri_epi``, MIT; see its README).

The data: one healthy volunteer's resting-state fMRI (Siemens Prisma 3 T, 2D GRE-EPI, 1 x 1 mm
in-plane, 5 mm slices, 24 axial slices), the mean of its motion-corrected volumes, saved twice by
the source project (two motion corrections of one run, ``ZS001`` and ``leipzigR01``), each with
its own cord mask (semi-automated: an automatic segmentation corrected by hand). The two masks
agree at Dice 0.883 with each other: the ceiling of what a third reader can reach.

An EPI of the cord, like a b0, is T2(*)-weighted (CSF bright, cord darker, distorted along the
phase-encode axis), so this is the closest real image to the network's input that comes with a
tracing; there is no diffusion, so no MD and no refinement: the network's cord is the run-time
segmenter's (:class:`core.segment.runtime.Segmenter`, both passes, one connected cord per slice)::

    cord Dice = Dice(labels 1-8, tracing),  Dice(P, G) = 2 |P & G| / (|P| + |G|)

scored for each image against its own tracing (the issue's figure), against the other image's
tracing, and the volume ratio (network / tracing).

Run::

    python -m models.real_epi                      # shipped model
    python -m models.real_epi --model DIR
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from core.segment.tta import dice as mask_dice

DATA_DIR = Path(__file__).resolve().parent / "data" / "fmri_epi"
CROP_MARGIN_MM = 24.0


@dataclass(frozen=True)
class Pair:
    """One saved mean image and the tracing made on it (paths relative to the data folder)."""

    name: str
    image: str
    mask: str


PAIRS = (
    Pair("ZS001", "sub-ZS001_task-rest_bold_moco_mean.nii.gz", "sub-ZS001_task-rest_bold_moco_mean_seg.nii.gz"),
    Pair("leipzigR01", "sub-leipzigR01_task-rest_desc-mocomean_bold.nii.gz",
         "sub-leipzigR01_task-rest_desc-spinalcord_mask.nii.gz"),
)


@dataclass(frozen=True)
class EPI:
    """One mean EPI in closest-canonical RAS: image (X, Y, Z) float32; cord (X, Y, Z) bool, its
    own tracing; zooms_mm (x, y, z)."""

    name: str
    image: NDArray[np.float32]
    cord: NDArray[np.bool_]
    zooms_mm: tuple[float, float, float]


def _canonical(path: Path) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.load(path))


def load(folder: Path = DATA_DIR) -> list[EPI]:
    """Both images with their tracings (all four must share one grid)."""
    out = []
    reference = None
    for pair in PAIRS:
        img, mask = _canonical(folder / pair.image), _canonical(folder / pair.mask)
        reference = reference if reference is not None else img
        for p, other in ((pair.image, img), (pair.mask, mask)):
            if other.shape[:3] != reference.shape[:3] or not np.allclose(other.affine, reference.affine, atol=1e-3):
                raise ValueError(f"{p} is not on the grid of {PAIRS[0].image}")
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        out.append(EPI(pair.name, np.asarray(img.dataobj, np.float32), np.asarray(mask.dataobj) > 0.5, zooms))  # type: ignore[arg-type]
    return out


def dice(pred: NDArray[np.bool_], ref: NDArray[np.bool_]) -> float:
    """Dice of two boolean masks (:func:`core.segment.tta.dice`); NaN when both are empty."""
    return float(mask_dice(pred, ref))


class SegmentFn(Protocol):
    def __call__(self, volume: NDArray[np.float32], zooms_mm: tuple[float, float, float]) -> NDArray[np.uint8]: ...


def check(segment: SegmentFn, folder: Path = DATA_DIR, *, images: list[EPI] | None = None) -> list[dict[str, Any]]:
    """Run ``segment(volume, zooms_mm) -> labels`` on each image (``images``, else those in
    ``folder``) and score its cord (labels > 0) against its own tracing and the other image's;
    per-slice Dice against its own (min, median)."""
    images = images if images is not None else load(folder)
    rows = []
    for k, epi in enumerate(images):
        other = images[1 - k]
        cord = segment(epi.image, epi.zooms_mm) > 0
        per_slice = np.array([dice(cord[:, :, z], epi.cord[:, :, z]) for z in range(cord.shape[2]) if epi.cord[:, :, z].any()])
        rows.append({
            "image": epi.name,
            "cord_dice": dice(cord, epi.cord),
            "cord_dice_other_tracing": dice(cord, other.cord),
            "volume_ratio": float(cord.sum() / max(epi.cord.sum(), 1)),
            "slice_dice_min": float(np.nanmin(per_slice)),
            "slice_dice_median": float(np.nanmedian(per_slice)),
            "slices": int(per_slice.size),
        })
    return rows


def tracings_dice(folder: Path = DATA_DIR, *, images: list[EPI] | None = None) -> float:
    """Dice between the two tracings (the two readers' agreement) of ``images``, else of those
    in ``folder``."""
    a, b = images if images is not None else load(folder)
    return dice(a.cord, b.cord)


def format_table(rows: list[dict[str, Any]], between: float) -> str:
    lines = ["real GRE-EPI mean image (no diffusion: the network's masks without MD refinement)",
             f"{'image':<12}{'cord Dice':>10}{'other tracing':>14}{'volume':>8}{'slice min':>10}{'median':>8}"]
    for r in rows:
        lines.append(f"{r['image']:<12}{r['cord_dice']:>10.3f}{r['cord_dice_other_tracing']:>14.3f}"
                     f"{r['volume_ratio']:>8.2f}{r['slice_dice_min']:>10.3f}{r['slice_dice_median']:>8.3f}")
    lines.append(f"{'mean':<12}{np.mean([r['cord_dice'] for r in rows]):>10.3f}"
                 f"{np.mean([r['cord_dice_other_tracing'] for r in rows]):>14.3f}")
    lines.append(f"the two tracings agree at Dice {between:.3f}")
    return "\n".join(lines)


def build_copy(source: Path, out: Path = DATA_DIR, *, margin_mm: float = CROP_MARGIN_MM) -> None:
    """(Once) write the cropped repository copy from a folder holding the four source files and
    the source's LICENSE: each file cut in-plane to the tracings' joint bounding box plus
    ``margin_mm`` (nibabel's slicer, so every voxel keeps its world position), all slices kept;
    images as stored, masks as uint8 0/1."""
    first = nib.load(source / PAIRS[0].image)
    union = np.zeros(first.shape[:3], bool)
    for pair in PAIRS:
        union |= np.asarray(nib.load(source / pair.mask).dataobj) > 0.5
    idx = np.argwhere(union)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    zooms = first.header.get_zooms()[:2]
    m = [int(np.ceil(margin_mm / z)) for z in zooms]
    sl = tuple(slice(max(0, lo[k] - m[k]), min(first.shape[k], hi[k] + m[k])) for k in range(2))
    out.mkdir(parents=True, exist_ok=True)
    for pair in PAIRS:
        img = nib.load(source / pair.image).slicer[sl[0], sl[1], :]
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine, img.header), out / pair.image)
        mask = (np.asarray(nib.load(source / pair.mask).dataobj) > 0.5)[sl[0], sl[1], :].astype(np.uint8)
        hdr = img.header.copy()
        hdr.set_data_dtype(np.uint8)
        hdr.set_slope_inter(1.0, 0.0)
        nib.save(nib.Nifti1Image(mask, img.affine, hdr), out / pair.mask)
    shutil.copyfile(source / "LICENSE", out / "LICENSE")


def main(argv: list[str] | None = None) -> None:
    from core.segment.runtime import load_segmenter
    from models.real_shapes import check_parser

    args = check_parser(__doc__, DATA_DIR, "a folder of the four source files and LICENSE").parse_args(argv)
    if args.build_from is not None:
        build_copy(args.build_from, args.data)
        return
    segmenter = load_segmenter(str(args.model), args.threads)
    start = time.perf_counter()
    images = load(args.data)
    rows = check(lambda v, z: segmenter.segment(v, zooms_mm=z).labels, images=images)
    print(format_table(rows, tracings_dice(images=images)))
    print(f"model {args.model.name} sha256 {segmenter.sha256[:12]}; {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
