"""Where the yardstick's regional FA error comes from, and what an ideal segmenter would score.

Two measurements on yardstick studies (:mod:`models.yardstick.render`):

1. **Error sources** (of analyses kept by ``python -m models.yardstick --keep --out DIR``). For a
   region r with true mask T and predicted mask P, the voxels where they differ are grouped by
   what the other side called them (background, gray matter, lateral, dorsal, the other ventral
   or same-kind region), and for each group: how many voxels, their mean FA, and the study's FA
   error |mean FA(P') - mean FA(T)| / mean FA(T) if only that group were put right (P' = P
   without its extra voxels of the group, or P with its missed voxels of the group added back).
   The group whose correction lowers the error most is where the error comes from.
2. **An edge-limited ideal.** The truth is the majority of each voxel's 0.25 mm votes
   (``Study.shares``). A segmenter that is right everywhere except on voxels whose cord share is
   within ``0.5 +- delta`` (which it labels cord or background by a coin toss, cord voxels
   taking their most-voted region) cannot do better at telling a half-filled edge voxel from
   its neighbour; its region Dice and FA error show what the voxel size alone allows.

FA is one weighted-least-squares fit (:class:`core.tensor.fit.TensorFitter`) over the true and
predicted cords dilated by two voxels, read in both masks (:mod:`models.yardstick.bench` fits
its reference on the true mask alone; on seeds 0-1 both give a ventral FA error of 6.20 %).

Run::

    python -m models.yardstick.edges --studies 32 --seed 0 1 [--kept DIR] [--delta 0.1 0.2]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from core import outputs
from core.ingest.study import load_study
from core.labels import REGIONS
from core.tensor.fit import TensorFitter
from models.strata import fa_error_pct
from models.yardstick.bench import SEED_STRIDE, dice
from models.yardstick.render import Study, render

GROUPS: dict[str, tuple[int, ...]] = {
    "background": (0,),
    "gray matter": (4, 8),
    "lateral": (1, 5),
    "dorsal": (2, 6),
    "ventral": (3, 7),
}
"""The label groups a differing voxel is counted in (codes, :mod:`core.labels`)."""


@dataclass(frozen=True)
class Source:
    """One group's part in a region's FA error (counts in voxels, FA dimensionless, errors %).

    extra : predicted in the region, true label in the group; missed : true region, predicted
    in the group; ``*_fa`` their mean FA (NaN if none); ``error_without_extra`` /
    ``error_with_missed``: the study's FA error with only that group put right.
    """

    extra: int
    extra_fa: float
    error_without_extra: float
    missed: int
    missed_fa: float
    error_with_missed: float


def fa_error(fa: NDArray[np.floating], predicted: NDArray[np.bool_], true: NDArray[np.bool_]) -> float:
    """|mean FA(predicted) - mean FA(true)| / mean FA(true) in % (NaN if either mask is empty)."""
    if not predicted.any() or not true.any():
        return math.nan
    return abs(fa_error_pct(float(fa[predicted].mean()), float(fa[true].mean())))


def error_sources(truth: NDArray[np.uint8], labels: NDArray[np.uint8], fa: NDArray[np.floating], code: int
                  ) -> dict[str, Source]:
    """Each :data:`GROUPS` group's part in region ``code``'s FA error (see the module).

    truth, labels : (X, Y, Z) codes 0-8 on one grid; fa : (X, Y, Z) FA, fitted wherever either
    labels the cord.
    """
    true, predicted = truth == code, labels == code
    out = {}
    for name, codes in GROUPS.items():
        extra = predicted & ~true & np.isin(truth, codes)
        missed = true & ~predicted & np.isin(labels, codes)
        out[name] = Source(
            extra=int(extra.sum()),
            extra_fa=float(fa[extra].mean()) if extra.any() else math.nan,
            error_without_extra=fa_error(fa, predicted & ~extra, true),
            missed=int(missed.sum()),
            missed_fa=float(fa[missed].mean()) if missed.any() else math.nan,
            error_with_missed=fa_error(fa, predicted | missed, true),
        )
    return out


def ideal_labels(study: Study, delta: float, rng: np.random.Generator) -> NDArray[np.uint8]:
    """(X, Y, Z) the edge-limited ideal segmenter's labels: the truth, except that each voxel
    whose cord share is within ``0.5 +- delta`` is cord (its most-voted region) or background
    with equal odds."""
    cord_share = 1.0 - study.shares[0]
    region = (study.shares[1:].argmax(axis=0) + 1).astype(np.uint8)
    unsure = np.abs(cord_share - 0.5) <= delta
    toss = rng.random(unsure.shape) < 0.5
    return np.where(unsure, np.where(toss, region, 0), study.labels).astype(np.uint8)


def fitted_fa(study: Study, labels: NDArray[np.uint8] | None, workdir: Path) -> NDArray[np.float32]:
    """(X, Y, Z) FA of ``study`` over its true cord and ``labels``' cord, dilated by 2 voxels."""
    img, bval, bvec = study.save(workdir / "in")
    loaded = load_study([img], workdir=workdir / "ingest", bval=bval, bvec=bvec).dwi
    cord = study.labels > 0 if labels is None else (study.labels > 0) | (labels > 0)
    return TensorFitter(loaded).fit(loaded.data, mask=ndimage.binary_dilation(cord, iterations=2)).fa


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=8)
    p.add_argument("--seed", type=int, nargs="+", default=[0])
    p.add_argument("--kept", type=Path, default=None,
                   help="a python -m models.yardstick --keep --out folder: break its ventral FA errors down")
    p.add_argument("--delta", type=float, nargs="+", default=[0.1, 0.2], help="half-widths of the unsure cord share")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    ideal: dict[float, list[tuple[list[float], list[float], str]]] = {d: [] for d in args.delta}
    sources: dict[str, list[tuple[str, Source]]] = {}
    errors: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="edges-") as tmp:
        for seed in args.seed:
            for i in range(args.studies):
                study_seed = seed * SEED_STRIDE + i
                study = render(study_seed)
                kind = study.params.compression
                labels = None
                if args.kept is not None:
                    path = args.kept / f"study_{study_seed:06d}" / "out" / outputs.LABELS.filename
                    if not path.is_file():
                        p.error(f"{path} is missing: run python -m models.yardstick with the same --studies and --seed, --keep")
                    labels = np.asarray(nib.load(path).dataobj).astype(np.uint8)
                fa = fitted_fa(study, labels, Path(tmp) / f"{study_seed}")
                for delta in args.delta:
                    guess = ideal_labels(study, delta, rng)
                    ideal[delta].append(([dice(guess == r.code, study.labels == r.code) for r in REGIONS],
                                         [fa_error(fa, guess == r.code, study.labels == r.code) for r in REGIONS], kind))
                if labels is not None:
                    for code in (3, 7):
                        errors.append((kind, fa_error(fa, labels == code, study.labels == code)))
                        for name, s in error_sources(study.labels, labels, fa, code).items():
                            sources.setdefault(name, []).append((kind, s))
    kinds = ("none", "mild", "severe", None)
    print("Edge-limited ideal (truth except voxels of cord share 0.5 +- delta, tossed): region Dice / FA error %")
    for delta, rows in ideal.items():
        for kind in kinds:
            sel = [r for r in rows if kind is None or r[2] == kind]
            if not sel:
                continue
            d, e = np.array([r[0] for r in sel]), np.array([r[1] for r in sel])
            print(f"  delta {delta:.2f} {kind or 'all':7s} ({len(sel):3d}): Dice {np.nanmean(d):.3f} FA {np.nanmean(e):.2f}"
                  f" | ventral Dice {np.nanmean(d[:, [2, 6]]):.3f} FA {np.nanmean(e[:, [2, 6]]):.2f}")
    if sources:
        print("Ventral FA error of the kept analyses, by where the differing voxels belong:")
        for kind in kinds:
            sel = [e for k, e in errors if kind is None or k == kind]
            if not sel:
                continue
            print(f"  {kind or 'all'}: {len(sel)} region-studies, FA error {_mean(sel):.2f} %")
            for name, rows in sources.items():
                s = [x for k, x in rows if kind is None or k == kind]
                print(f"    {name:12s} extra {np.mean([x.extra for x in s]):4.1f} vox (FA {_mean([x.extra_fa for x in s]):.2f})"
                      f" -> error {_mean([x.error_without_extra for x in s]):5.2f} if removed;"
                      f" missed {np.mean([x.missed for x in s]):4.1f} vox (FA {_mean([x.missed_fa for x in s]):.2f})"
                      f" -> {_mean([x.error_with_missed for x in s]):5.2f} if added")


if __name__ == "__main__":
    main()
