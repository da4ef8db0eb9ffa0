"""Study-level evaluation: Dice and the DTI feature index error per simulated case.

The paper's feature index error is, per region, |mean FA in the predicted mask - mean FA in the
reference mask| / mean FA in the reference mask *averaged over cases* (patients), and the
report's per-region FA (:func:`core.measures.regions.region_measures`) is likewise one mean
over all of a study's slices. :mod:`models.evaluate` scores single slices, where a region is
often 2-10 voxels and one voxel more or less moves its mean FA by several percent; this module
scores the study-level number.

A *case* is ``slices`` synthetic slices that share one acquisition (voxel size, slice
thickness, field of view, SNR, phase-encode axis), one gradient table and one patient's healthy
region tensors (``simulate_dwi(..., patient_seed=)``), cord size, CSF ring (thin or not) and
CSF and gray-matter signal (``generate(..., patient=)``). Each slice draws its own level,
position, rotation, compression (which lowers that slice's FA), surroundings, bias and noise. Seeds
``CASE_SEED_BASE + case * CASE_STRIDE + k`` lie far from the training, validation and slice-test
seeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from core.labels import BY_CODE, N_CLASSES
from core.segment.runtime import Segmentation
from models.generator import SyntheticSlice, draw_acquisition, fit_fa_md, generate, simulate_dwi
from models.strata import VOXEL_BINS, VOXEL_EDGES_MM, bin_of, fa_error_pct
from models.train import EVAL_SEED_BASE

CASE_SEED_BASE = EVAL_SEED_BASE + 10_000_000
CASE_STRIDE = 1_000


class Labeller(Protocol):
    """What the evaluations segment with (:class:`models.evaluate.SliceSegmenter`)."""

    def segment(self, image: NDArray, spacing_mm: tuple[float, float]) -> Segmentation: ...

    def refined(self, seg: Segmentation, b0: NDArray, md: NDArray, spacing_mm: tuple[float, float], *,
                fa: NDArray | None = None) -> NDArray[np.uint8]: ...

    def refined_segmentation(self, seg: Segmentation, b0: NDArray, md: NDArray, spacing_mm: tuple[float, float], *,
                             fa: NDArray | None = None) -> Segmentation: ...


def stack_slices(segs: list[Segmentation]) -> Segmentation:
    """One (X, Y, Z) segmentation of (X, Y, 1) slice segmentations on one grid."""
    return Segmentation(
        labels=np.concatenate([s.labels for s in segs], axis=2),
        cord_probability=np.concatenate([s.cord_probability for s in segs], axis=2),
    )


def case_seed(case: int) -> int:
    """The seed of case ``case``: it draws the shared acquisition and is the DWI's
    ``patient_seed``; its slices are the seeds after it."""
    return CASE_SEED_BASE + case * CASE_STRIDE


def case_slices(case: int, slices: int) -> Iterator[tuple[int, SyntheticSlice]]:
    """(seed, slice) for the ``slices`` slices of case ``case``. The case's own seed draws the
    shared acquisition (and is the DWI's ``patient_seed``); the first slice draws the patient
    (:data:`models.generator.PATIENT_KEYS`) for all of them."""
    base = case_seed(case)
    acq = draw_acquisition(np.random.default_rng(base))
    first = generate(base + 1, acquisition=acq)
    yield base + 1, first
    for k in range(2, slices + 1):
        yield base + k, generate(base + k, acquisition=acq, patient=first.params)


def evaluate_cases(seg: Labeller, n_cases: int, slices: int) -> dict[str, Any]:
    """Per region: Dice of the whole case and the FA feature error of the case's region mean,
    each averaged over cases (with the signed error's mean, the bias, and the largest error),
    and for comparison the per-slice FA error over the same slices.

    A case where the region is predicted nowhere counts as missed and is left out of the FA
    error, as in the per-slice evaluation."""
    dice: list[list[float]] = [[] for _ in range(N_CLASSES)]
    err: list[list[float]] = [[] for _ in range(N_CLASSES)]
    slice_err: list[list[float]] = [[] for _ in range(N_CLASSES)]
    missed = np.zeros(N_CLASSES, int)
    spacing = []
    by_voxel: dict[str, dict[str, Any]] = {name: {"cases": 0, "dice": [], "err": []} for name in VOXEL_BINS}
    for case in range(n_cases):
        # per code: tp, n_pred, n_true, sum of FA over predicted voxels, over true voxels
        tally = np.zeros((N_CLASSES, 5))
        truth, fa, md, pred, b0 = [], [], [], [], []
        for seed, s in case_slices(case, slices):  # one grid per case (one acquisition)
            fa_k, md_k = fit_fa_md(*simulate_dwi(s, seed, patient_seed=case_seed(case)))
            truth.append(s.labels)
            fa.append(fa_k)
            md.append(md_k)
            pred.append(seg.segment(s.b0, s.acquisition.spacing_mm))
            b0.append(s.b0)
        # the refinement by MD sees the whole study, as in the pipeline
        refined = seg.refined(stack_slices(pred), np.stack(b0, axis=2), np.stack(md, axis=2), s.acquisition.spacing_mm,
                              fa=np.stack(fa, axis=2))
        for k in range(slices):
            for c in range(1, N_CLASSES):
                p, g, fa_k = refined[:, :, k] == c, truth[k] == c, fa[k]
                tally[c] += ((p & g).sum(), p.sum(), g.sum(), fa_k[p].sum(), fa_k[g].sum())
                if p.any() and g.any():
                    true_fa = float(fa_k[g].mean())
                    slice_err[c].append(abs(fa_error_pct(float(fa_k[p].mean()), true_fa)))
        spacing.append(max(s.acquisition.spacing_mm))
        stratum = by_voxel[bin_of(spacing[-1], VOXEL_EDGES_MM, VOXEL_BINS)]
        stratum["cases"] += 1
        for c in range(1, N_CLASSES):
            tp, n_p, n_g, fa_p, fa_g = tally[c]
            if n_g == 0:
                continue
            dice[c].append(2 * tp / (n_p + n_g))
            stratum["dice"].append(dice[c][-1])
            if n_p == 0:
                missed[c] += 1
                continue
            true_fa = fa_g / n_g
            err[c].append(fa_error_pct(fa_p / n_p, true_fa))
            stratum["err"].append(abs(err[c][-1]))
    rows = {}
    for c in range(1, N_CLASSES):
        e = np.asarray(err[c])
        rows[BY_CODE[c].key] = {
            "dice_case_mean": float(np.mean(dice[c])) if dice[c] else float("nan"),
            "fa_error_pct": float(np.abs(e).mean()) if e.size else float("nan"),
            "fa_bias_pct": float(e.mean()) if e.size else float("nan"),
            "fa_error_pct_max": float(np.abs(e).max()) if e.size else float("nan"),
            "slice_fa_error_pct": float(np.mean(slice_err[c])) if slice_err[c] else float("nan"),
            "cases": len(dice[c]),
            "missed_cases": int(missed[c]),
        }
    strata = {name: {"cases": b["cases"],
                     "dice_case_mean": float(np.mean(b["dice"])) if b["dice"] else float("nan"),
                     "fa_error_pct": float(np.mean(b["err"])) if b["err"] else float("nan")}
              for name, b in by_voxel.items()}
    return {"regions": rows, "by_voxel_size": strata, "cases": n_cases, "slices_per_case": slices,
            "voxel_mm_range": [float(min(spacing)), float(max(spacing))] if spacing else [],
            "seeds": [case_seed(0), case_seed(n_cases - 1) + slices]}


def print_cases(res: dict[str, Any]) -> str:
    lines = [f"Study-level test: {res['cases']} cases x {res['slices_per_case']} slices "
             f"(in-plane voxel {res['voxel_mm_range'][0]:.2f}-{res['voxel_mm_range'][1]:.2f} mm), "
             f"seeds {res['seeds'][0]}..{res['seeds'][1]}",
             "FA err %: |case mean FA(pred) - case mean FA(true)| / case mean FA(true), mean over cases; "
             "bias: signed mean; slice FA err: the per-slice error on the same slices",
             f"{'region':<16}{'Dice(case)':>11}{'FA err %':>9}{'bias %':>8}{'max %':>7}{'slice FA err %':>15}{'missed':>7}"]
    for key, r in res["regions"].items():
        lines.append(f"{key:<16}{r['dice_case_mean']:>11.3f}{r['fa_error_pct']:>9.2f}{r['fa_bias_pct']:>8.2f}"
                     f"{r['fa_error_pct_max']:>7.2f}{r['slice_fa_error_pct']:>15.2f}{r['missed_cases']:>7d}")
    mean = {k: np.mean([r[k] for r in res["regions"].values()])
            for k in ("dice_case_mean", "fa_error_pct", "fa_bias_pct", "fa_error_pct_max", "slice_fa_error_pct")}
    lines.append(f"{'mean of 8':<16}{mean['dice_case_mean']:>11.3f}{mean['fa_error_pct']:>9.2f}{mean['fa_bias_pct']:>8.2f}"
                 f"{mean['fa_error_pct_max']:>7.2f}{mean['slice_fa_error_pct']:>15.2f}")
    lines.append("by in-plane voxel size: cases, case Dice and FA err % (means over cases and regions)")
    for name, b in res["by_voxel_size"].items():
        lines.append(f"    {name:<24}{b['cases']:>5d}{b['dice_case_mean']:>8.3f}{b['fa_error_pct']:>8.2f}")
    return "\n".join(lines)
