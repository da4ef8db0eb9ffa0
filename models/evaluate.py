"""Evaluate a shipped SCS-Net (ONNX) on held-out synthetic slices and on the real DWI.

    python -m models.evaluate [--model models/scsnet] [--n 300] [--cases 100] [--case-slices 12]
                              [--real PATH] [--qc qc.png] [--anatomy DIR]

Synthetic test: seeds ``EVAL_SEED_BASE + n`` (never used in training or validation), each with
its own independently drawn acquisition. Inference is the run-time recipe itself
(:class:`SliceSegmenter`) and is scored on the acquisition grid against the exact labels:
per-region Dice, precision and recall (pooled over all slices and mean per slice), and the FA
feature error |mean FA(pred) - mean FA(true)| / mean FA(true) from a tensor fit of the simulated
DWI (30 directions, b = 800 s/mm^2), averaged over slices.

Study-level test (:mod:`models.cases`): simulated studies of ``--case-slices`` slices with one
acquisition and one patient, scored as the paper defines its feature error (the region's mean
FA over the whole case, averaged over cases) and as the report gives per-region FA.

Real DWI: b=0 volumes (b < 50 s/mm^2) averaged, closest-canonical RAS, every axial slice
segmented; prints cord area, left/right and dorsal/ventral sanity checks and FA per region,
and writes a QC montage.

Real anatomy of other contrasts (T2*, MT) with reference cord and manual gray-matter masks: an
out-of-distribution check, see :mod:`models.anatomy_check`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from core.ingest.nifti import load_nifti_dwi
from core.labels import BY_CODE, N_CLASSES
from core.measures.confidence import confidence_measures
from core.measures.weighted import region_weights, support, weighted_mean
from core.report.qc import write_qc_png
from core.segment.refine import MDMap, refine
from core.segment.runtime import Segmentation, Segmenter
from core.tensor.fit import TensorFitter, fit_mask
from models import anatomy_check
from models.cases import Labeller, evaluate_cases, print_cases
from models.generator import BVAL_S_MM2, SyntheticSlice, fit_fa_md, generate, simulate_dwi
from models.strata import VOXEL_BINS, VOXEL_EDGES_MM, bin_of, fa_error_pct, spearman
from models.train import EVAL_SEED_BASE

log = logging.getLogger(__name__)
DEFAULT_REAL = Path("tests/data/sct_tutorial_dmri/dmri.nii.gz")
CSF_LIKE_MD = 1.6e-3
"""mm^2/s: the apparent MD at b = 800 s/mm^2 of a voxel half cord (MD 1e-3) and half CSF (3e-3);
cord voxels above it are mostly CSF, the measure of a mask spilling into the CSF ring."""


class SliceSegmenter:
    """The run-time recipe itself (:class:`core.segment.runtime.Segmenter`: two passes, one
    connected cord, no labels below the minimum cord area) applied to one slice or a volume,
    then the pipeline's refinement by MD (:func:`core.segment.refine.refine`, the very function
    the pipeline's ``refine`` stage calls; unless ``refine`` is off), so that what is evaluated
    is what ``scsnet analyze`` does."""

    def __init__(self, model_dir: Path, *, refine: bool = True, augment: bool = True) -> None:
        self.segmenter = Segmenter(model_dir)
        self.refine = refine
        self.augment = augment

    def segment(self, image: NDArray, spacing_mm: tuple[float, float]) -> Segmentation:
        """The (H, W, 1) segmentation of one (H, W) slice with in-plane voxel ``spacing_mm`` (with
        ``augment``, also its test-time-augmentation agreement, for the confidence)."""
        return self.segmenter.segment(np.asarray(image, np.float32)[:, :, None], zooms_mm=(*spacing_mm, 1.0),
                                      augment=self.augment, ventral_lean=self.refine)

    def labels(self, image: NDArray, spacing_mm: tuple[float, float]) -> NDArray[np.uint8]:
        """(H, W) labels of one slice before the refinement by MD (labelled for it with ``refine``)."""
        return self.segment(image, spacing_mm).labels[:, :, 0]

    def refined(self, seg: Segmentation, b0: NDArray, md: NDArray, spacing_mm: tuple[float, float], *,
                fa: NDArray | None = None) -> NDArray[np.uint8]:
        """``seg``'s (X, Y, Z) labels refined by ``md`` (mm^2/s, on the grid of ``b0``) and ``fa``
        (the second pass's gray-matter contrast; None: without it) as the pipeline refines them;
        unchanged with ``refine`` off."""
        return self.refined_segmentation(seg, b0, md, spacing_mm, fa=fa).labels

    def refined_segmentation(self, seg: Segmentation, b0: NDArray, md: NDArray, spacing_mm: tuple[float, float], *,
                             fa: NDArray | None = None) -> Segmentation:
        """:meth:`refined`, with the soft probabilities that follow the labels (for the
        probability-weighted measures).

        The pipeline fits the tensor only on the cord plus a margin (and again on both passes'
        cords where the second reaches beyond the first fit), so the refinement sees the MD
        there only."""
        if not self.refine:
            return seg
        zooms = (spacing_mm[0], spacing_mm[1], 1.0)

        def fitted(labels: NDArray[np.uint8]) -> MDMap:
            mask = fit_mask(labels, zooms_mm=zooms)
            return MDMap(md=np.where(mask, md, 0.0).astype(np.float32), mask=mask,
                         fa=None if fa is None else np.where(mask, fa, 0.0).astype(np.float32))

        result = refine(seg, b0=b0, maps=fitted(seg.labels), segmenter=self.segmenter, zooms_mm=zooms, refit=fitted,
                        bval_s_mm2=BVAL_S_MM2)
        return result.segmentation

    def volume(self, volume: NDArray, zooms_mm: tuple[float, float, float], *, to_refine: bool = False
               ) -> Segmentation:
        """The segmentation of a canonical-RAS (X, Y, Z) volume; ``to_refine``: labelled for the
        refinement by MD that follows (the ventral lean, as the pipeline does, with ``refine``)."""
        return self.segmenter.segment(np.asarray(volume, np.float32), zooms_mm=zooms_mm,
                                      ventral_lean=to_refine and self.refine)

    def volume_labels(self, volume: NDArray, zooms_mm: tuple[float, float, float]) -> NDArray[np.uint8]:
        """(X, Y, Z) labels of a canonical-RAS volume (no refinement by MD)."""
        return self.volume(volume, zooms_mm).labels


def evaluate_synthetic(seg: Labeller, n: int) -> dict[str, Any]:
    dice_per: list[list[float]] = [[] for _ in range(N_CLASSES)]
    fa_err: list[list[float]] = [[] for _ in range(N_CLASSES)]
    fa_err_weighted: list[list[float]] = [[] for _ in range(N_CLASSES)]
    uncertainty: list[float] = []  # 1 - the report's confidence, beside the FA error of the same region
    confident_err: list[float] = []
    missing = np.zeros(N_CLASSES, int)
    # voxel counts per stratum (see STRATA), index c for code c and N_CLASSES for the whole cord;
    # the pooled scores are the sums over the bins of any one stratification
    strata = {group: {name: {"slices": 0, "tp": np.zeros(N_CLASSES + 1), "fp": np.zeros(N_CLASSES + 1),
                             "fn": np.zeros(N_CLASSES + 1), "fa_err": []} for name in bins}
              for group, (bins, _, _) in STRATA.items()}
    t_inf = []
    for k in range(n):
        seed = EVAL_SEED_BASE + k
        s = generate(seed)
        t = time.perf_counter()
        slice_seg = seg.segment(s.b0, s.acquisition.spacing_mm)
        t_first = time.perf_counter() - t
        fa, md = fit_fa_md(*simulate_dwi(s, seed))
        t = time.perf_counter()
        refined = seg.refined_segmentation(slice_seg, s.b0[:, :, None], md[:, :, None], s.acquisition.spacing_mm,
                                           fa=fa[:, :, None])
        pred = refined.labels[:, :, 0]
        within = support(refined.labels)
        t_inf.append(t_first + time.perf_counter() - t)
        conf, _ = confidence_measures(refined.labels, refined.probabilities, refined.agreement)
        tallies = [strata[group][bin_of(value(s), edges, bins)] for group, (bins, edges, value) in STRATA.items()]
        for b in tallies:
            b["slices"] += 1
        for c in range(1, N_CLASSES + 1):  # N_CLASSES stands for the whole cord
            p, g = (pred > 0, s.labels > 0) if c == N_CLASSES else (pred == c, s.labels == c)
            tp_c, n_p, n_g = int((p & g).sum()), int(p.sum()), int(g.sum())
            for b in tallies:
                b["tp"][c] += tp_c
                b["fp"][c] += n_p - tp_c
                b["fn"][c] += n_g - tp_c
            if c < N_CLASSES and n_g:
                dice_per[c].append(2 * tp_c / (n_p + n_g))
                if p.any():
                    true_fa = float(fa[g].mean())
                    fa_err[c].append(abs(fa_error_pct(float(fa[p].mean()), true_fa)))
                    w = region_weights(refined.labels, refined.probabilities, c, within=within)[:, :, 0]
                    weighted = weighted_mean(fa, w, np.ones(fa.shape, bool))
                    if weighted is not None:
                        fa_err_weighted[c].append(abs(fa_error_pct(weighted, true_fa)))
                    for b in tallies:
                        b["fa_err"].append(fa_err[c][-1])
                    if conf[c]["confidence"] is not None:
                        uncertainty.append(1.0 - conf[c]["confidence"])
                        confident_err.append(fa_err[c][-1])
                else:
                    missing[c] += 1
        if (k + 1) % 50 == 0:
            log.info("%d / %d slices", k + 1, n)
    first = next(iter(strata.values()))
    tp, fp, fn = (sum(b[k] for b in first.values()) for k in ("tp", "fp", "fn"))
    rows = {}
    for c in range(1, N_CLASSES):
        rows[BY_CODE[c].key] = {
            "dice_pooled": 2 * tp[c] / max(2 * tp[c] + fp[c] + fn[c], 1),
            "dice_mean": float(np.mean(dice_per[c])) if dice_per[c] else float("nan"),
            "precision": tp[c] / max(tp[c] + fp[c], 1),
            "recall": tp[c] / max(tp[c] + fn[c], 1),
            "fa_error_pct": float(np.mean(fa_err[c])) if fa_err[c] else float("nan"),
            "fa_error_weighted_pct": float(np.mean(fa_err_weighted[c])) if fa_err_weighted[c] else float("nan"),
            "slices": len(dice_per[c]),
            "missed_slices": int(missing[c]),
        }
    summary: dict[str, dict[str, Any]] = {}
    for group, bins in strata.items():
        summary[group] = {}
        for name, b in bins.items():
            dice = 2 * b["tp"] / np.maximum(2 * b["tp"] + b["fp"] + b["fn"], 1)
            summary[group][name] = {"slices": b["slices"], "cord_dice": float(dice[N_CLASSES]),
                                    "region_dice_mean": float(dice[1:N_CLASSES].mean()),
                                    "fa_error_pct_mean": float(np.mean(b["fa_err"])) if b["fa_err"] else float("nan")}
    return {"regions": rows, "strata": summary, "n": n, "inference_s_median": float(np.median(t_inf)),
            "confidence_spearman": spearman(uncertainty, confident_err),
            "seeds": [EVAL_SEED_BASE, EVAL_SEED_BASE + n - 1]}


STRATA: dict[str, tuple[tuple[str, ...], tuple[float, ...], Callable[[SyntheticSlice], float]]] = {
    "in-plane voxel size (larger side)": (VOXEL_BINS, VOXEL_EDGES_MM, lambda s: max(s.acquisition.spacing_mm)),
    "CSF brightness / cord": (("< 1.3 (cord-bright CSF)", "1.3-2.0", ">= 2.0"), (1.3, 2.0),
                              lambda s: s.params["csf_int"]),
    "cord depth (CSM-like compression)": (("50-70 %", "70-95 %", "not compressed"), (0.7, 0.95),
                                          lambda s: s.params["compression"]),
    "gray / white matter signal": (("< 1.05 (none)", "1.05-1.15 (faint)", ">= 1.15 (clear)"), (1.05, 1.15),
                                   lambda s: s.params["gm_int"]),
    "SNR of the b0": (("8-14", "14-24", "24-40"), (14.0, 24.0), lambda s: s.acquisition.snr),
}
"""How the synthetic scores split by what makes a slice hard: name -> (bin names, the edges
between them, the slice's value); see :func:`models.strata.bin_of`."""


def print_table(res: dict[str, Any]) -> str:
    lines = [f"Synthetic test: {res['n']} slices, seeds {res['seeds'][0]}..{res['seeds'][1]}",
             f"{'region':<16}{'Dice(pool)':>11}{'Dice(mean)':>11}{'precision':>10}{'recall':>8}{'FA err %':>9}{'weighted':>9}{'slices':>7}{'missed':>7}"]
    for key, r in res["regions"].items():
        lines.append(f"{key:<16}{r['dice_pooled']:>11.3f}{r['dice_mean']:>11.3f}{r['precision']:>10.3f}{r['recall']:>8.3f}"
                     f"{r['fa_error_pct']:>9.2f}{r['fa_error_weighted_pct']:>9.2f}{r['slices']:>7d}{r['missed_slices']:>7d}")
    pooled = [r["dice_pooled"] for r in res["regions"].values()]
    lines.append(f"{'mean of 8':<16}{np.mean(pooled):>11.3f}{np.mean([r['dice_mean'] for r in res['regions'].values()]):>11.3f}"
                 f"{'':>18}{np.mean([r['fa_error_pct'] for r in res['regions'].values()]):>9.2f}"
                 f"{np.mean([r['fa_error_weighted_pct'] for r in res['regions'].values()]):>9.2f}")
    lines.append("Spearman rank correlation of (1 - confidence) with the per-slice FA error, over slices x regions: "
                 f"{res['confidence_spearman']:.3f}")
    lines.append("by stratum: slices, whole-cord Dice, mean of the 8 pooled region Dice, mean FA error %")
    for group, bins in res["strata"].items():
        lines.append(f"  {group}")
        for name, b in bins.items():
            lines.append(f"    {name:<24}{b['slices']:>5d}{b['cord_dice']:>8.3f}{b['region_dice_mean']:>8.3f}"
                         f"{b['fa_error_pct_mean']:>8.2f}")
    lines.append(f"median inference time per slice: locating, crop and CSF-contrast passes, resampling, refinement (CPU, onnxruntime default threads): {res['inference_s_median'] * 1000:.1f} ms")
    return "\n".join(lines)


def _world_centroid(lab: NDArray, k: int, affine: NDArray, codes: list[int]) -> NDArray:
    """World (RAS mm) centroid of ``codes`` in slice ``k`` (NaN if absent)."""
    m = np.argwhere(np.isin(lab, codes))
    if len(m) == 0:
        return np.array([np.nan, np.nan, np.nan])
    return (affine @ np.r_[m.mean(axis=0), k, 1.0])[:3]


def segment_real(seg: SliceSegmenter, path: Path) -> dict[str, Any]:
    """Segment every axial slice of a real DWI (b-values/vectors ``bval*``/``bvec*`` beside it).

    Returns the canonical-RAS mean b0 ``(X, Y, Z)``, labels, FA map, voxel size and per-slice rows
    (cord area mm^2, left-at-smaller-world-x, dorsal-posterior-to-ventral, mean FA WM/GM, and the
    share of cord voxels whose MD says they are mostly CSF: ``CSF_LIKE_MD``).
    """
    folder = path.parent
    # The service's own reading and tensor fit (DIPY WLS), so these are the FA and MD that
    # `scsnet analyze` reports.
    dwi, _ = load_nifti_dwi(path, bval=next(folder.glob("bval*")), bvec=next(folder.glob("bvec*"))).to_canonical()
    b0 = dwi.mean_b0()
    maps = TensorFitter(dwi).fit(dwi.data)
    fa, md = maps.fa, maps.md
    zx, zy, zz = dwi.zooms
    zooms = (zx, zy)
    labels = seg.refined(seg.volume(b0, (zx, zy, zz), to_refine=True), b0, md, zooms, fa=fa)
    aff = dwi.affine
    rows = []
    for k in range(labels.shape[2]):
        lab = labels[:, :, k]
        wm = fa[:, :, k][np.isin(lab, [1, 2, 3, 5, 6, 7])]
        gm = fa[:, :, k][np.isin(lab, [4, 8])]
        rows.append({
            "slice": k,
            "cord_mm2": float((lab > 0).sum() * zx * zy),
            "left_at_smaller_x": bool(_world_centroid(lab, k, aff, [1, 2, 3, 4])[0]
                                      < _world_centroid(lab, k, aff, [5, 6, 7, 8])[0]),
            "dorsal_posterior": bool(_world_centroid(lab, k, aff, [2, 6])[1] < _world_centroid(lab, k, aff, [3, 7])[1]),
            "fa_wm": float(wm.mean()) if wm.size else float("nan"),
            "fa_gm": float(gm.mean()) if gm.size else float("nan"),
            "csf_like_pct": float(100 * (md[:, :, k][lab > 0] > CSF_LIKE_MD).mean()) if (lab > 0).any() else float("nan"),
        })
    return {"b0": b0, "labels": labels, "fa": fa, "md": md, "zooms": zooms, "rows": rows}


def evaluate_real(seg: SliceSegmenter, path: Path, qc: Path) -> str:
    res = segment_real(seg, path)
    b0, labels, zooms = res["b0"], res["labels"], res["zooms"]
    lines = [f"Real DWI {path} (canonical RAS, voxel {zooms[0]:.3f} x {zooms[1]:.3f} mm)",
             f"{'slice':>5}{'cord mm2':>9}{'L<R x':>7}{'D<V y':>7}{'FA WM':>7}{'FA GM':>7}{'CSF-like %':>11}"]
    for r in res["rows"]:
        lines.append(f"{r['slice']:>5}{r['cord_mm2']:>9.1f}{r['left_at_smaller_x']!s:>7}{r['dorsal_posterior']!s:>7}"
                     f"{r['fa_wm']:>7.2f}{r['fa_gm']:>7.2f}{r['csf_like_pct']:>11.1f}")
    lines.append(f"CSF-like %: cord voxels with MD > {CSF_LIKE_MD:.1e} mm^2/s (mostly CSF); all slices "
                 f"{np.mean([r['csf_like_pct'] for r in res['rows']]):.1f} % on average")
    # The same QC montage as every analysis writes (core.report.qc).
    write_qc_png(b0, res["fa"], labels, qc, zooms_mm=(zooms[0], zooms[1], 1.0),
                 title="SCS-Net on the real b0 (radiological view: patient's left on the right, anterior up)")
    lines.append(f"QC montage: {qc}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/scsnet"))
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--cases", type=int, default=100, help="simulated studies for the study-level test (0: skip)")
    p.add_argument("--case-slices", type=int, default=12, help="slices per simulated study")
    p.add_argument("--real", type=Path, default=DEFAULT_REAL)
    p.add_argument("--qc", type=Path, default=Path("scsnet_real_qc.png"))
    p.add_argument("--json", type=Path, default=None, help="also write the synthetic results (slices, cases) here")
    p.add_argument("--no-refine", action="store_true", help="score the network's first-pass masks, without the refinement by MD")
    p.add_argument("--anatomy", type=Path, default=anatomy_check.DEFAULT_DIR,
                   help="sct_testing_data copy for the check on real T2*/MT images")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    seg = SliceSegmenter(args.model, refine=not args.no_refine)
    results: dict[str, Any] = {}
    if args.n > 0:
        results["slices"] = evaluate_synthetic(seg, args.n)
        print(print_table(results["slices"]))
    if args.cases > 0:
        seg.augment = False  # the study test reports no confidence: no test-time augmentation to pay for
        results["cases"] = evaluate_cases(seg, args.cases, args.case_slices)
        print(print_cases(results["cases"]))
    if args.json and results:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    if args.real.exists():
        print(evaluate_real(seg, args.real, args.qc))
    else:
        print(f"real DWI not found at {args.real}: pass --real PATH")
    if args.anatomy.exists():
        print(anatomy_check.print_check(anatomy_check.check(seg.volume_labels, args.anatomy)))
    else:
        print(f"sct_testing_data not found at {args.anatomy}: pass --anatomy DIR")


if __name__ == "__main__":
    main()
