"""Score the service's analysis on yardstick studies (:mod:`models.yardstick.render`).

Each study is written as NIfTI + bval + bvec and analysed by :func:`core.pipeline.analyze`,
exactly as ``scsnet analyze`` does (default options: the MD refinement included). Scores, on the
stored grid against the majority-label truth:

- Dice per region and of the whole cord (labels > 0);
- FA error per region, the paper's DTI feature index: |report's regional FA mean - mean FA in
  the true region| / mean FA in the true region, in percent. The reference FA is the same
  weighted-least-squares fit (:class:`core.tensor.fit.TensorFitter`) on the same data, over the
  true mask, so the error is the masks' alone; the nominal tissue FA is kept beside it (the
  reference differs from it by partial volume, noise and the fit).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from core import outputs
from core.errors import ScsnetError
from core.ingest.study import load_study
from core.labels import REGIONS
from core.pipeline import Options, analyze
from core.segment.runtime import Segmenter
from core.segment.tta import dice as mask_dice
from core.tensor.fit import TensorFitter
from models.strata import spearman
from models.yardstick.render import Study, render

SEED_STRIDE = 1000
"""Study ``i`` of ``--seed s`` is rendered from seed ``s * SEED_STRIDE + i``."""


@dataclass
class Score:
    """One study's scores; region lists are in code order 1-8 (NaN: undefined)."""

    seed: int
    dice: list[float]
    fa_error_pct: list[float]
    fa_error_weighted_pct: list[float]
    """The same error for the probability-weighted regional mean (``fa_weighted``)."""
    confidence: list[float]
    fa_reported: list[float]
    fa_reference: list[float]
    fa_nominal: list[float]
    cord_dice: float
    seconds: float
    failure: str | None
    params: dict[str, Any]


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    """2|A and B| / (|A| + |B|); NaN when both are empty (:func:`core.segment.tta.dice`)."""
    return float(mask_dice(a, b))


def score_study(study: Study, *, seed: int, segmenter: Segmenter, workdir: Path, refine: bool = True) -> Score:
    """Write ``study`` into ``workdir``, analyse it (``refine``: the MD refinement, as
    ``scsnet analyze`` without ``--no-refine``) and score the report against the truth."""
    start = time.perf_counter()
    img, bval, bvec = study.save(workdir / "in")
    loaded = load_study([img], workdir=workdir / "ingest", bval=bval, bvec=bvec).dwi
    truth = study.labels
    fit = TensorFitter(loaded).fit(loaded.data, mask=truth > 0)
    reference = [float(fit.fa[truth == r.code].mean()) if (truth == r.code).any() else math.nan for r in REGIONS]
    nominal = [study.fa[r.code] for r in REGIONS]
    failure = None
    try:
        report = analyze([img], out_dir=workdir / "out", segmenter=segmenter, bval=bval, bvec=bvec,
                         options=Options(refine=refine))
        labels = np.asarray(nib.load(workdir / "out" / outputs.LABELS.filename).dataobj).astype(np.uint8)
        reported = [_number(e["fa"]["mean"]) for e in report["regions"]]
        weighted = [_number(e.get("fa_weighted")) for e in report["regions"]]
        confidence = [_number(e.get("confidence")) for e in report["regions"]]
    except ScsnetError as exc:  # a refusal scores as nothing found
        failure = f"{type(exc).__name__}: {exc}"
        labels = np.zeros_like(truth)
        reported = weighted = confidence = [math.nan] * 8
    dices = [dice(labels == r.code, truth == r.code) for r in REGIONS]
    errors = _errors(reported, reference)
    return Score(
        seed=seed,
        dice=dices,
        fa_error_pct=errors,
        fa_error_weighted_pct=_errors(weighted, reference),
        confidence=confidence,
        fa_reported=reported,
        fa_reference=reference,
        fa_nominal=nominal,
        cord_dice=dice(labels > 0, truth > 0),
        seconds=time.perf_counter() - start,
        failure=failure,
        params=asdict(study.params),
    )


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _errors(measured: list[float], reference: list[float]) -> list[float]:
    """|measured - reference| / reference in %, per region (NaN where either is undefined)."""
    return [abs(m - t) / t * 100.0 if not (math.isnan(m) or math.isnan(t)) else math.nan for m, t in zip(measured, reference)]


def run(n_studies: int, *, seed: int, model_dir: Path, keep: Path | None = None, threads: int = 2,
        refine: bool = True) -> list[Score]:
    """Render and score ``n_studies`` studies of ``seed`` (kept under ``keep`` when given)."""
    segmenter = Segmenter(model_dir, threads=threads)
    scores = []
    with tempfile.TemporaryDirectory(prefix="yardstick-") as tmp:
        for i in range(n_studies):
            study_seed = seed * SEED_STRIDE + i
            start = time.perf_counter()
            study = render(study_seed)
            folder = (keep if keep is not None else Path(tmp)) / f"study_{study_seed:06d}"
            s = score_study(study, seed=study_seed, segmenter=segmenter, workdir=folder, refine=refine)
            s.seconds = time.perf_counter() - start
            scores.append(s)
    return scores


def _fmt(x: float, spec: str = ".3f") -> str:
    return "  -  " if math.isnan(x) else format(x, spec)


def table(scores: list[Score]) -> str:
    """Per-study lines, then per-region means (NaN-skipping) and the overall means."""
    keys = [r.key for r in REGIONS]
    header = ("per study: seed, voxel/thickness mm, compression, SNR, storage | cord Dice, mean region Dice, "
              "mean FA error % | Dice per region (codes 1-8) | FA error % per region")
    lines = [header]
    for s in scores:
        p = s.params
        lines.append(
            f"{s.seed:>6} {p['voxel_mm']:.2f}/{p['thickness_mm']:.1f} {p['compression']:<6} {p['snr']:4.1f} {p['storage']}"
            f" | {_fmt(s.cord_dice)} {_fmt(float(np.nanmean(s.dice)))} {_fmt(float(np.nanmean(s.fa_error_pct)), '5.2f')}"
            f" | {' '.join(_fmt(d) for d in s.dice)} | {' '.join(_fmt(e, '5.1f') for e in s.fa_error_pct)}"
            f" ({s.seconds:.1f} s){'  FAILED ' + s.failure if s.failure else ''}"
        )
    dice_m = np.array([s.dice for s in scores])
    err_m = np.array([s.fa_error_pct for s in scores])
    ref_m = np.array([s.fa_reference for s in scores])
    nom_m = np.array([s.fa_nominal for s in scores])
    lines += ["", f"{'region':<14} {'Dice':>6} {'FA err %':>8} {'found':>6} {'ref FA':>7} {'nominal':>8}"]
    for c, key in enumerate(keys):
        lines.append(
            f"{key:<14} {_fmt(float(np.nanmean(dice_m[:, c])), '6.3f')} {_fmt(float(np.nanmean(err_m[:, c])), '8.2f')}"
            f" {int(np.sum(~np.isnan(err_m[:, c]))):>3}/{len(scores):<2} {np.nanmean(ref_m[:, c]):7.3f} {np.nanmean(nom_m[:, c]):8.3f}"
        )
    weighted_m = np.array([s.fa_error_weighted_pct for s in scores])
    per_region_weighted = " ".join(_fmt(float(np.nanmean(weighted_m[:, c])), "5.2f") for c in range(len(keys)))
    lines.append(f"{'FA err % weighted':<18} {per_region_weighted}  (mean {_fmt(float(np.nanmean(weighted_m)), '5.2f')})")
    uncertainty = [1.0 - c for s in scores for c in s.confidence]
    lines.append(
        "Spearman rank correlation of (1 - confidence) with FA error %, over regions x studies: "
        f"binary mean {_fmt(spearman(uncertainty, [e for s in scores for e in s.fa_error_pct]))}, "
        f"weighted mean {_fmt(spearman(uncertainty, [e for s in scores for e in s.fa_error_weighted_pct]))}"
    )
    lines.append(
        f"{'mean of 8':<14} {_fmt(float(np.nanmean(dice_m)), '6.3f')} {_fmt(float(np.nanmean(err_m)), '8.2f')}"
        f"   cord Dice {np.nanmean([s.cord_dice for s in scores]):.3f}; {sum(s.seconds for s in scores):.1f} s for"
        f" {len(scores)} studies; failures {sum(s.failure is not None for s in scores)}"
    )
    return "\n".join(lines)
