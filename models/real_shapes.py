"""Real-anatomy check: the shipped network on eight real cervical T2* scans with manual cord and
gray-matter masks (Spinal Cord Gray Matter Imaging Challenge data, CC0; a cropped copy lives in
``models/data/gm_challenge``, see its README).

For each scan the run-time segmenter (:class:`core.segment.runtime.Segmenter`, both passes, one
connected cord per slice) labels every axial slice, and two Dice scores are computed on the
slices that hold a manual cord::

    cord Dice = Dice(labels 1-8,        manual cord mask)
    GM Dice   = Dice(labels 4 + 8,      manual gray-matter mask)
    Dice(P, G) = 2 |P & G| / (|P| + |G|)   (1.0 when both are empty)

The T2* scans are 0.42-0.78 mm in-plane, finer than a DTI and finer than the 0.6-1.8 mm voxels the
network is trained on (it resamples every slice to its own 0.5 mm grid itself). By default the
scans are therefore first brought to a DTI-like 0.9 mm in-plane grid by area averaging
(:func:`area_resample`; the masks likewise, a voxel counting as inside when at least half of it is);
``--voxel-mm 0`` scores the native grid.

**This is a check of real shapes, not a target.** A T2*-weighted GRE is not a b0: gray matter is
bright and white matter darker (in a b0 the cord is rather uniform), CSF is bright in both. The
network has never seen this contrast; the numbers say whether the outlines and the gray-matter
placement carry over to real anatomy, not how accurate the model is on DTI.

``HELD_OUT_SUBJECTS`` are never to be used for training (both sessions of a subject stay on the
same side of the split); :func:`partition_slice` fits the atlas's eight-region partition to a
real cord and gray-matter slice, and :func:`shape_bank` so partitions every usable slice of the
training scans for the generator (``python -m models.train --real-shapes P``), and
:func:`write_training_pairs` writes the training scans' images themselves as site data
(``python -m models.train --data DIR``).

Run::

    python -m models.real_shapes                 # shipped model, 0.9 mm in-plane
    python -m models.real_shapes --voxel-mm 0    # native T2* grid
    python -m models.real_shapes --write-training-data DIR   # real T2* training pairs
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from core.segment.tta import dice as mask_dice

DATA_DIR = Path(__file__).resolve().parent / "data" / "gm_challenge"
SCANS = (
    "sub-10062Ses1", "sub-10062Ses2", "sub-9418", "sub-9584",
    "sub-9604", "sub-9669", "sub-9709Ses1", "sub-9709Ses2",
)
HELD_OUT_SUBJECTS = ("sub-9604", "sub-10062")
"""Subjects kept out of any training (3 of the 8 scans: sub-9604, sub-10062Ses1, sub-10062Ses2);
chosen so that both a two-session subject and the one scan stored L-P-S (a different stored
orientation, Philips) are held out."""
GRAY = (4, 8)
DTI_VOXEL_MM = 0.9
CROP_MARGIN_MM = 16.0
CONTRAST_NOTE = ("T2*-weighted GRE, not a b0: gray matter bright, white matter darker, CSF bright; "
                 "never seen in training. A check of real shapes, not a target.")


def subject_of(scan: str) -> str:
    """``sub-10062Ses1`` -> ``sub-10062`` (the person; sessions of one person share a subject)."""
    return re.sub(r"Ses\d+$", "", scan)


def is_held_out(scan: str) -> bool:
    return subject_of(scan) in HELD_OUT_SUBJECTS


def scan_paths(folder: Path, scan: str) -> tuple[Path, Path, Path]:
    """(image, manual cord mask, manual gray-matter mask) of ``scan`` in the BIDS layout."""
    anat = folder / scan / "anat"
    labels = folder / "derivatives" / "labels" / scan / "anat"
    stem = f"{scan}_run-1_T2starw"
    return anat / f"{stem}.nii.gz", labels / f"{stem}_seg-manual.nii.gz", labels / f"{stem}_gmseg-manual.nii.gz"


@dataclass(frozen=True)
class Scan:
    """One scan in closest-canonical RAS.

    image : (X, Y, Z) float32 (scanner units); cord, gray : (X, Y, Z) bool manual masks on the same
    grid; zooms_mm : voxel size (x, y, z), mm.
    """

    name: str
    image: NDArray[np.float32]
    cord: NDArray[np.bool_]
    gray: NDArray[np.bool_]
    zooms_mm: tuple[float, float, float]

    @property
    def scored(self) -> NDArray[np.bool_]:
        """(Z,) the slices with a manual cord (a stray gray-matter voxel elsewhere is not scored)."""
        return self.cord.any(axis=(0, 1))


def load_scan(folder: Path, scan: str) -> Scan:
    """Read ``scan`` from ``folder`` (image and masks must share one grid) in closest-canonical RAS."""
    paths = scan_paths(folder, scan)
    imgs = [nib.as_closest_canonical(nib.load(p)) for p in paths]
    for p, img in zip(paths[1:], imgs[1:]):
        if img.shape != imgs[0].shape or not np.allclose(img.affine, imgs[0].affine, atol=1e-3):
            raise ValueError(f"{p.name} is not on the grid of its image")
    image, cord, gray = (np.asarray(img.dataobj, np.float32) for img in imgs)
    zooms = tuple(float(z) for z in imgs[0].header.get_zooms()[:3])
    return Scan(scan, image, cord > 0.5, gray > 0.5, zooms)  # type: ignore[arg-type]


def load_scans(folder: Path = DATA_DIR, scans: tuple[str, ...] = SCANS) -> list[Scan]:
    return [load_scan(folder, s) for s in scans]


def _area_matrix(n_in: int, n_out: int) -> NDArray[np.float64]:
    """(n_out, n_in) weights: the fraction of each output voxel covered by each input voxel, the
    two grids sharing their outer edges (field of view kept)."""
    edges_in = np.arange(n_in + 1) / n_in
    edges_out = np.arange(n_out + 1) / n_out
    lo = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    hi = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    return np.clip(hi - lo, 0.0, None) * n_out


def area_resample(volume: NDArray, zooms_mm: tuple[float, float, float], *, voxel_mm: float
                  ) -> tuple[NDArray[np.float32], tuple[float, float, float]]:
    """Area-average an (X, Y, Z) volume in-plane to about ``voxel_mm`` (what a coarser acquisition
    would integrate), keeping the field of view. Returns the volume and its exact new zooms
    (``X * zx / round(X * zx / voxel_mm)`` etc.)."""
    nx = max(1, round(volume.shape[0] * zooms_mm[0] / voxel_mm))
    ny = max(1, round(volume.shape[1] * zooms_mm[1] / voxel_mm))
    mx, my = _area_matrix(volume.shape[0], nx), _area_matrix(volume.shape[1], ny)
    rows = np.tensordot(mx, np.asarray(volume, np.float64), axes=(1, 0))  # (nx, Y, Z)
    out = np.moveaxis(np.tensordot(my, rows, axes=(1, 1)), 0, 1).astype(np.float32)  # (nx, ny, Z)
    zooms = (volume.shape[0] * zooms_mm[0] / nx, volume.shape[1] * zooms_mm[1] / ny, zooms_mm[2])
    return out, zooms


def at_voxel_size(scan: Scan, voxel_mm: float) -> Scan:
    """``scan`` on a ``voxel_mm`` in-plane grid: image area-averaged, masks = voxels at least half
    inside. ``voxel_mm`` 0 returns the scan unchanged."""
    if voxel_mm <= 0:
        return scan
    image, zooms = area_resample(scan.image, scan.zooms_mm, voxel_mm=voxel_mm)
    cord = area_resample(scan.cord, scan.zooms_mm, voxel_mm=voxel_mm)[0] >= 0.5
    gray = area_resample(scan.gray, scan.zooms_mm, voxel_mm=voxel_mm)[0] >= 0.5
    return Scan(scan.name, image, cord, gray & cord, zooms)


def dice(pred: NDArray[np.bool_], ref: NDArray[np.bool_]) -> float:
    """Dice 2|P & G| / (|P| + |G|) of two boolean masks (:func:`core.segment.tta.dice`); 1.0
    when both are empty (nothing to find, nothing found)."""
    return float(np.nan_to_num(mask_dice(pred, ref), nan=1.0))


def score(scan: Scan, labels: NDArray[np.uint8]) -> dict[str, Any]:
    """Cord and GM Dice of predicted (X, Y, Z) codes 0-8 on the scan's scored slices, with the
    number of scored slices and of those where a cord was found."""
    z = scan.scored
    pred = labels[:, :, z]
    return {
        "scan": scan.name,
        "held_out": is_held_out(scan.name),
        "voxel_mm": round(scan.zooms_mm[0], 3),
        "slices": int(z.sum()),
        "found": int((pred > 0).any(axis=(0, 1)).sum()),
        "cord_dice": dice(pred > 0, scan.cord[:, :, z]),
        "gm_dice": dice(np.isin(pred, GRAY), scan.gray[:, :, z]),
    }


class SegmentFn(Protocol):
    def __call__(self, volume: NDArray[np.float32], zooms_mm: tuple[float, float, float]) -> NDArray[np.uint8]: ...


def check(segment: SegmentFn, *, folder: Path = DATA_DIR, scans: tuple[str, ...] = SCANS,
          voxel_mm: float = DTI_VOXEL_MM) -> list[dict[str, Any]]:
    """Run ``segment(volume, zooms_mm) -> labels`` on each scan (at ``voxel_mm``) and score it."""
    rows = []
    for name in scans:
        scan = at_voxel_size(load_scan(folder, name), voxel_mm)
        rows.append(score(scan, segment(scan.image, scan.zooms_mm)))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [CONTRAST_NOTE,
             f"{'scan':<15}{'split':>9}{'voxel':>7}{'slices':>7}{'found':>6}{'cord Dice':>10}{'GM Dice':>9}"]
    for r in rows:
        split = "held-out" if r["held_out"] else "train"
        lines.append(f"{r['scan']:<15}{split:>9}{r['voxel_mm']:>7.2f}{r['slices']:>7d}{r['found']:>6d}"
                     f"{r['cord_dice']:>10.3f}{r['gm_dice']:>9.3f}")
    for label, sel in (("mean (all)", rows), ("mean held-out", [r for r in rows if r["held_out"]])):
        if sel:
            lines.append(f"{label:<15}{'':>9}{'':>7}{'':>7}{'':>6}"
                         f"{np.mean([r['cord_dice'] for r in sel]):>10.3f}{np.mean([r['gm_dice'] for r in sel]):>9.3f}")
    return "\n".join(lines)


WHITE_CODES = {"left": (1, 2, 3), "right": (5, 6, 7)}
N_ANGLES = 36


def _outline_radius(cord: NDArray[np.bool_], spacing_mm: tuple[float, float], centre_mm: NDArray[np.float64]
                    ) -> Any:
    """A function ``theta -> R(theta)`` (mm): the cord's extent from ``centre_mm`` along each
    direction, the largest distance of a cord voxel centre (plus half a voxel) in each of
    ``N_ANGLES`` sectors, interpolated circularly (empty sectors take their neighbours' values)."""
    pts = np.argwhere(cord) * np.asarray(spacing_mm) - centre_mm
    r = np.hypot(pts[:, 0], pts[:, 1]) + 0.5 * float(np.mean(spacing_mm))
    theta = np.arctan2(pts[:, 1], pts[:, 0])
    sector = np.floor((theta + np.pi) / (2 * np.pi) * N_ANGLES).astype(int) % N_ANGLES
    radius = np.full(N_ANGLES, np.nan)
    for k in range(N_ANGLES):
        if (sector == k).any():
            radius[k] = r[sector == k].max()
    centres = -np.pi + (np.arange(N_ANGLES) + 0.5) * 2 * np.pi / N_ANGLES
    ok = np.isfinite(radius)
    xs, ys = centres[ok], radius[ok]
    xs, ys = np.r_[xs - 2 * np.pi, xs, xs + 2 * np.pi], np.r_[ys, ys, ys]
    return lambda t: np.interp(t, xs, ys)


def _white_partition(atlas_regions: NDArray[np.float32]) -> NDArray[np.uint8]:
    """(H, W) white-matter codes (1-3, 5-7) covering the whole atlas grid: each pixel takes the most
    probable white-matter region where some white matter is, else that of the nearest such pixel
    (so the partition extends over the atlas gray matter and beyond its outline)."""
    white = [c - 1 for c in (*WHITE_CODES["left"], *WHITE_CODES["right"])]
    probs = atlas_regions[white]
    has = probs.sum(axis=0) >= 0.25
    codes = np.asarray([c + 1 for c in white], np.uint8)[probs.argmax(axis=0)]
    _, (ii, jj) = ndimage.distance_transform_edt(~has, return_indices=True)
    return codes[ii, jj]


def partition_slice(cord: NDArray[np.bool_], gray: NDArray[np.bool_], *, spacing_mm: tuple[float, float],
                    atlas_slice: int | None = None) -> NDArray[np.uint8]:
    """Fit the PAM50 eight-region partition to a real cord and gray-matter slice.

    Parameters
    ----------
    cord, gray : (H, W) bool manual masks of one axial slice in closest-canonical RAS
        (``[i, j]`` = world +x towards the patient's right, +y anterior).
    spacing_mm : in-plane voxel size (mm).
    atlas_slice : index into :func:`models.atlas.load_atlas` sub-slices; default the middle of C4.

    Returns
    -------
    (H, W) uint8 codes 0-8 (:mod:`core.labels`): 0 outside ``cord``; gray matter (``gray & cord``)
    is 4 on the patient's left of the midline (smaller x than the cord's centroid) and 8 on the
    right; the white matter takes the atlas's funiculi through a polar map: a voxel at angle
    theta and distance r from the real cord's centroid, with real outline radius R(theta), reads
    the atlas white-matter partition at the same theta and r / R(theta) of the atlas outline
    radius from the atlas cord's centroid. A funiculus that lands on the wrong side of the
    midline is replaced by its mirror partner, so left codes lie exactly at smaller x.
    """
    from models.atlas import load_atlas

    atlas = load_atlas()
    if atlas_slice is None:
        c4 = np.flatnonzero(atlas.level == 4)
        atlas_slice = int(c4[len(c4) // 2])
    a_cord = atlas.cord[atlas_slice] >= 0.5
    a_spacing = (atlas.spacing_mm, atlas.spacing_mm)
    a_centre = np.argwhere(a_cord).mean(axis=0) * atlas.spacing_mm
    a_radius = _outline_radius(a_cord, a_spacing, a_centre)
    partition = _white_partition(atlas.regions[atlas_slice])

    cord = np.asarray(cord, bool)
    gray = np.asarray(gray, bool) & cord
    out = np.zeros(cord.shape, np.uint8)
    if not cord.any():
        return out
    centre = np.argwhere(cord).mean(axis=0) * np.asarray(spacing_mm)
    radius = _outline_radius(cord, spacing_mm, centre)
    idx = np.argwhere(cord & ~gray)
    d = idx * np.asarray(spacing_mm) - centre
    theta = np.arctan2(d[:, 1], d[:, 0])
    rho = np.clip(np.hypot(d[:, 0], d[:, 1]) / radius(theta), 0.0, 1.0)
    target = a_centre + (rho * a_radius(theta))[:, None] * np.c_[np.cos(theta), np.sin(theta)]
    ti = np.clip(np.round(target / atlas.spacing_mm).astype(int), 0, np.asarray(partition.shape) - 1)
    codes = partition[ti[:, 0], ti[:, 1]]
    left = d[:, 0] < 0
    codes = np.where(left & (codes >= 5), codes - 4, codes)
    codes = np.where(~left & (codes <= 4), codes + 4, codes)
    out[idx[:, 0], idx[:, 1]] = codes
    gi = np.argwhere(gray)
    out[gi[:, 0], gi[:, 1]] = np.where(gi[:, 0] * spacing_mm[0] < centre[0], 4, 8)
    return out


def build_copy(source: Path, out: Path = DATA_DIR, *, margin_mm: float = CROP_MARGIN_MM) -> None:
    """Write the cropped repository copy from a gm-challenge-data folder (BIDS): each image and
    its masks cut to the manual cord's bounding box (over all slices) plus ``margin_mm`` in-plane,
    all slices kept; image dtype kept, masks as uint8 0/1 written with the image's affine (the
    masks' own affines differ from it by < 1e-3 at most). The crop uses nibabel's slicer, so the
    affine is shifted to keep every voxel at its world position."""
    for scan in SCANS:
        paths = scan_paths(source, scan)
        img = nib.load(paths[0])
        cord = np.asarray(nib.load(paths[1]).dataobj) > 0.5
        zooms = img.header.get_zooms()[:2]
        idx = np.argwhere(cord)
        lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
        m = [int(np.ceil(margin_mm / z)) for z in zooms]
        sl = tuple(slice(max(0, lo[k] - m[k]), min(img.shape[k], hi[k] + m[k])) for k in range(2))
        cropped = img.slicer[sl[0], sl[1], :]
        targets = [out / p.relative_to(source) for p in paths]
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(cropped.dataobj), cropped.affine, cropped.header), targets[0])
        for src, dst in zip(paths[1:], targets[1:]):
            mask = (np.asarray(nib.load(src).dataobj) > 0.5)[sl[0], sl[1], :].astype(np.uint8)
            hdr = cropped.header.copy()
            hdr.set_data_dtype(np.uint8)
            hdr.set_slope_inter(1.0, 0.0)
            nib.save(nib.Nifti1Image(mask, cropped.affine, hdr), dst)
    shutil.copyfile(source / "LICENSE", out / "LICENSE")


@dataclass(frozen=True)
class RealShape:
    """One real slice's eight-region partition, ready for the generator.

    regions : (8, H, W) float32 one-hot fractions of codes 1-8 (:func:`partition_slice`);
    cord : (H, W) float32 (their sum); spacing_mm : in-plane voxel size (mm);
    centre : (2,) the cord centroid in voxel indices; name : scan and slice, for the record.
    """

    regions: NDArray[np.float32]
    cord: NDArray[np.float32]
    spacing_mm: tuple[float, float]
    centre: NDArray[np.float64]
    name: str


MIN_SHAPE_AREA_MM2 = 30.0
"""Real slices with less manual cord than this (cut by the scan's edge) or without gray matter
are not used as shapes."""


def training_scans() -> tuple[str, ...]:
    """The scans whose subjects are not held out."""
    return tuple(s for s in SCANS if not is_held_out(s))


def partition_scan(scan: Scan) -> NDArray[np.uint8]:
    """(X, Y, Z) codes 0-8: :func:`partition_slice` of every slice of ``scan`` whose cord and
    gray matter are both traced; other slices 0."""
    labels = np.zeros(scan.cord.shape, np.uint8)
    for z in np.flatnonzero(scan.scored):
        cord, gray = scan.cord[:, :, z], scan.gray[:, :, z] & scan.cord[:, :, z]
        if gray.any():
            labels[:, :, z] = partition_slice(cord, gray, spacing_mm=scan.zooms_mm[:2])
    return labels


@lru_cache(maxsize=1)
def shape_bank(folder: Path = DATA_DIR) -> tuple[RealShape, ...]:
    """Every usable slice of the training scans (held-out subjects excluded) as a :class:`RealShape`,
    on its native grid: the atlas partition fitted to the manual cord and gray matter."""
    bank = []
    for name in training_scans():
        scan = load_scan(folder, name)
        voxel_area = scan.zooms_mm[0] * scan.zooms_mm[1]
        partitioned = partition_scan(scan)
        for z in np.flatnonzero(partitioned.any(axis=(0, 1))):
            if scan.cord[:, :, z].sum() * voxel_area < MIN_SHAPE_AREA_MM2:
                continue
            labels = partitioned[:, :, z]
            regions = (labels[None] == np.arange(1, 9)[:, None, None]).astype(np.float32)
            bank.append(RealShape(regions, regions.sum(axis=0), scan.zooms_mm[:2],
                                  np.argwhere(labels > 0).mean(axis=0), f"{name}:{z}"))
    return tuple(bank)


TRAINING_VOXELS_MM = (0.9, 1.1)
"""In-plane voxels (mm) the real training images are written at (:func:`write_training_pairs`)."""


def write_training_pairs(out: Path, *, folder: Path = DATA_DIR, voxels_mm: tuple[float, ...] = TRAINING_VOXELS_MM
                         ) -> list[Path]:
    """Write the training scans (held-out subjects excluded) as ``python -m models.train --data``
    pairs: ``<scan>_<voxel x 10>_b0.nii.gz`` (the T2* image area-averaged to each of ``voxels_mm``
    in-plane, :func:`at_voxel_size`) and ``..._labels.nii.gz`` (codes 0-8: the manual cord and
    gray matter with the atlas's white-matter partition fitted by :func:`partition_slice`; a
    slice whose gray matter is not traced is left unlabelled). The images keep their real
    surroundings and T2* contrast: they teach real outlines, not b0 contrast. Returns the
    image paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in training_scans():
        scan = load_scan(folder, name)
        for voxel in voxels_mm:
            s = at_voxel_size(scan, voxel)
            labels = partition_scan(s)
            affine = np.diag([*s.zooms_mm, 1.0])  # closest-canonical RAS already
            case = out / f"{name}_{round(voxel * 10)}"
            nib.save(nib.Nifti1Image(s.image, affine), f"{case}_b0.nii.gz")
            nib.save(nib.Nifti1Image(labels, affine), f"{case}_labels.nii.gz")
            written.append(Path(f"{case}_b0.nii.gz"))
    return written


def check_parser(description: str | None, data_dir: Path, source: str) -> argparse.ArgumentParser:
    """The options every real-data check takes: --model, --data, --threads and --build-from
    (``source``: what the bundled copy is built from)."""
    from core.settings import SHIPPED_MODEL_DIR

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL_DIR)
    parser.add_argument("--data", type=Path, default=data_dir)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime CPU threads (0: all)")
    parser.add_argument("--build-from", type=Path, default=None,
                        help=f"(once) write the cropped copy into --data from {source}, then stop")
    return parser


def main(argv: list[str] | None = None) -> None:
    from core.segment.runtime import load_segmenter

    parser = check_parser(__doc__, DATA_DIR, "a gm-challenge-data folder")
    parser.add_argument("--voxel-mm", type=float, default=DTI_VOXEL_MM,
                        help="in-plane voxel to area-average the scans to first; 0: their native grid")
    parser.add_argument("--write-training-data", type=Path, default=None, metavar="DIR",
                        help="write the training scans as `models.train --data` pairs into DIR, then stop")
    args = parser.parse_args(argv)
    if args.build_from is not None:
        build_copy(args.build_from, args.data)
        return
    if args.write_training_data is not None:
        for path in write_training_pairs(args.write_training_data, folder=args.data):
            print(path.name)
        return
    segmenter = load_segmenter(str(args.model), args.threads)
    start = time.perf_counter()
    rows = check(lambda v, z: segmenter.segment(v, zooms_mm=z).labels, folder=args.data, voxel_mm=args.voxel_mm)
    print(format_table(rows))
    print(f"model {args.model.name} sha256 {segmenter.sha256[:12]}; {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

