"""The analysis pipeline: load -> segment -> fit -> refine -> whole -> measure -> write.

Each stage is a function with its own test; :func:`analyze` strings them together, times them
and reports progress through a small callable, so the CLI shows a bar and the Celery task writes
the job record, without the core knowing either. The report is assembled in
:mod:`core.report.build`, the files are written by :mod:`core.report.write` and appear whole or
not at all (:mod:`core.staging`).

The ``refine`` stage (:func:`core.segment.refine.refine`) refines the network's masks by the
fit's mean diffusivity: a second network pass on the b0 with its CSF brightened by MD, then the
CSF rim trimmed off the outline; ``Options(refine=False)`` (``scsnet analyze --no-refine``)
keeps the first pass's masks.

The ``whole`` stage (:func:`core.segment.whole.make_whole`) then makes the masks anatomically
whole: no holes in the cord, each region one piece per slice (reported in ``anatomy``);
``Options(whole_masks=False)`` skips it. The segment stage also segments the b0 shifted and
mirrored (test-time augmentation) for the per-region ``confidence``
(:mod:`core.measures.confidence`); the measures carry probability-weighted means beside the
binary ones (:mod:`core.measures.weighted`, whose ``DEFAULT_ESTIMATOR`` names the one put
forward).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

import core
from core.ingest.dwi import DWI
from core.ingest.gradients import is_b0
from core.ingest.rules import DEFAULT_LIMITS, UploadLimits
from core.ingest.study import load_study
from core.labels import REGIONS
from core.measures import confidence, plausibility, weighted
from core.measures import regions as measures
from core.report import build
from core.report.build import validate_report
from core.report.write import Analysis, write_ingest, write_outputs, write_report
from core.segment.refine import Refinement, refine, refinement_section
from core.segment.runtime import Segmentation, Segmenter
from core.segment.whole import (
    WholeMasks,
    anatomy_section,
    fragment_warnings,
    make_whole,
)
from core.staging import staging_dir
from core.tensor.fit import FIT_MARGIN_MM, FitMethod, TensorFitter, TensorMaps, fit_mask

STAGES = ("load", "segment", "fit", "refine", "whole", "measure", "write")

LOW_SNR = 5.0
"""Below this b0 SNR in the cord (spread across b=0 volumes, which also holds motion and CSF
pulsation, so it under-estimates thermal SNR) the Rician noise floor biases FA upwards."""


class Progress(Protocol):
    """Told when a stage starts (``fraction`` 0) and ends (1); the overall fraction is derived."""

    def __call__(self, stage: str, fraction: float) -> None: ...


def no_progress(stage: str, fraction: float) -> None:
    """A :class:`Progress` that ignores everything."""


@dataclass(frozen=True)
class Options:
    """Choices of one analysis."""

    full_maps: bool = False
    fit_method: FitMethod = "WLS"
    margin_mm: float = FIT_MARGIN_MM
    refine: bool = True
    """Refine the masks by MD after the fit (the CSF-contrast pass, then the CSF-rim trim);
    False keeps the network's first-pass masks (``scsnet analyze --no-refine``)."""
    whole_masks: bool = True
    """Fill the cord's holes and make each region one piece per slice after the refinement
    (:mod:`core.segment.whole`); False leaves the masks as the earlier stages made them."""
    augment: bool = True
    """Segment the b0 also shifted by a voxel and mirrored, for the confidence's agreement
    term (:mod:`core.segment.tta`); False: the confidence is the top probability alone."""


@dataclass
class _Clock:
    progress: Progress
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.progress(name, 0.0)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 4)
        self.progress(name, 1.0)


def segment_stage(canonical: DWI, segmenter: Segmenter, *, augment: bool = True, ventral_lean: bool = False
                  ) -> tuple[NDArray[np.float32], Segmentation]:
    """Mean b0 (X, Y, Z) of the canonical study and its eight-region segmentation (with
    ``augment``, also its test-time-augmentation agreement; ``ventral_lean``: when the
    refinement's trim by MD follows, :meth:`core.segment.runtime.Segmenter.segment`); a b0 that
    is negative throughout is refused first (:func:`core.measures.plausibility.check_b0_signal`)."""
    b0 = canonical.mean_b0()
    plausibility.check_b0_signal(b0)
    return b0, segmenter.segment(b0, zooms_mm=canonical.zooms, augment=augment, ventral_lean=ventral_lean)


def fit_stage(canonical: DWI, labels: NDArray[np.uint8], options: Options) -> TensorMaps:
    """Tensor maps on the cord plus margin (or the whole field with ``full_maps``)."""
    mask = None if options.full_maps else fit_mask(labels, zooms_mm=canonical.zooms, margin_mm=options.margin_mm)
    return TensorFitter(canonical, method=options.fit_method).fit(canonical.data, mask=mask)


def refine_stage(
    canonical: DWI,
    b0: NDArray[np.float32],
    segmentation: Segmentation,
    maps: TensorMaps,
    segmenter: Segmenter,
    options: Options,
) -> Refinement[TensorMaps]:
    """The segmentation refined by the fit's MD (:func:`core.segment.refine.refine`), refitting
    the tensor with ``options`` where the refined cord needs it."""
    return refine(
        segmentation,
        b0=b0,
        maps=maps,
        segmenter=segmenter,
        zooms_mm=canonical.zooms,
        refit=lambda labels: fit_stage(canonical, labels, options),
        bval_s_mm2=diffusion_weighting(canonical.bvals),
    )


def diffusion_weighting(bvals: NDArray[np.floating]) -> float | None:
    """The study's b-value (s/mm^2) for the half-cord trim line: the mean over its
    diffusion-weighted volumes (not b=0 by :func:`core.ingest.gradients.is_b0`, the rule of
    :attr:`core.ingest.dwi.DWI.is_b0`); None without any."""
    bvals = np.asarray(bvals, np.float64)
    weighted = bvals[~is_b0(bvals)]
    return float(weighted.mean()) if weighted.size else None


def whole_stage(segmentation: Segmentation) -> tuple[Segmentation, WholeMasks]:
    """The segmentation with anatomically whole masks (:func:`core.segment.whole.make_whole`);
    the soft probabilities stay the network's."""
    whole = make_whole(segmentation.labels, segmentation.probabilities)
    return replace(segmentation, labels=whole.labels), whole


def measure_stage(analysis: Analysis, *, whole: WholeMasks | None = None) -> dict[str, Any]:
    """The measurement sections of the report (regions, cord, slices, QC, estimator,
    confidence, anatomy); ``whole``: what the whole stage did (None: it did not run)."""
    canonical, labels, maps = analysis.canonical, analysis.segmentation.labels, analysis.maps
    probabilities, agreement = analysis.segmentation.probabilities, analysis.segmentation.agreement
    zx, zy, zz = canonical.zooms
    regions = measures.region_measures(labels, maps, voxel_volume_mm3=zx * zy * zz)
    cord = measures.cord_measures(labels, maps, voxel_volume_mm3=zx * zy * zz)
    slices, most_compressed = measures.slice_measures(labels, maps, pixel_area_mm2=zx * zy)
    w_volume, w_slices = weighted.weighted_measures(labels, probabilities, maps)
    c_volume, c_slices = confidence.confidence_measures(labels, probabilities, agreement)
    for entry in regions:
        entry.update(w_volume[entry["code"]])
        entry.update(c_volume[entry["code"]])
    for entry, w_slice, c_slice in zip(slices, w_slices, c_slices):
        for region in REGIONS:
            entry["regions"][region.key].update(w_slice[region.code])
            entry["regions"][region.key].update(c_slice[region.code])
    centre = canonical.affine @ np.array([(canonical.shape[0] - 1) / 2, (canonical.shape[1] - 1) / 2, 0, 1])
    for entry in slices:
        entry["z_mm"] = round(float(centre[2] + canonical.affine[2, 2] * entry["index"]), 3)
    snr = measures.b0_snr(canonical.data[..., canonical.is_b0], labels > 0)
    qc_warnings = list(canonical.provenance.warnings) + list(analysis.segmentation.warnings)
    if snr is not None and snr < LOW_SNR:
        qc_warnings.append(f"the b0 signal-to-noise ratio in the cord is low ({snr:.1f}); measures are noisy")
    if canonical.n_directions < 12:
        qc_warnings.append(
            f"only {canonical.n_directions} diffusion directions: enough for a tensor, but FA is biased "
            "and noisy below about 12"
        )
    qc_warnings += measures.missing_region_warnings(slices)
    if whole is not None:
        qc_warnings += fragment_warnings(whole)
    qc_warnings += confidence.confidence_warnings(c_volume, c_slices)
    return {
        "estimator": weighted.DEFAULT_ESTIMATOR,
        "confidence_method": {
            "formula": confidence.FORMULA,
            "warn_below": confidence.WARN_BELOW,
            "augmentations": list(agreement.names) if agreement is not None else [],
        },
        "anatomy": anatomy_section(whole),
        "regions": regions,
        "cord": cord,
        "slices": slices,
        "most_compressed_slice": most_compressed,
        "qc": {
            "warnings": qc_warnings,
            "b0_snr": snr,
            "slices_without_cord": list(analysis.segmentation.slices_without_cord),
            "cord_turn_deg": round(float(analysis.segmentation.turn_deg), 1),
        },
    }


def check_stage(analysis: Analysis, sections: dict[str, Any]) -> None:
    """Refuse, before anything is written, a segmentation that is no spinal cord
    (:class:`~core.errors.NoSpinalCordError`) and cord measures no living cord has
    (:class:`~core.errors.ImplausibleMeasuresError`); see :mod:`core.measures.plausibility`."""
    plausibility.check_cord(analysis.segmentation.labels, affine=analysis.canonical.affine)
    plausibility.check_measures(sections["cord"], b0_snr=sections["qc"]["b0_snr"])


def analyze(
    inputs: Sequence[Path],
    *,
    out_dir: Path,
    segmenter: Segmenter,
    bval: Path | None = None,
    bvec: Path | None = None,
    options: Options = Options(),
    limits: UploadLimits = DEFAULT_LIMITS,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Analyse one study and write every output into ``out_dir`` atomically.

    Outputs are written into a temporary sibling folder and renamed into place at the end, so
    ``out_dir`` is either absent, the previous complete result, or the new complete result.
    ``limits`` bound what a DICOM upload may unpack to. Returns the report (already validated
    against the schema).

    A study of the head, a b0 negative throughout, a segmentation that is no spinal cord or
    measures no cord has end the analysis with a :class:`~core.errors.NoSpinalCordError` or
    :class:`~core.errors.ImplausibleMeasuresError` before anything is written.
    """
    clock = _Clock(progress)
    with staging_dir(out_dir) as tmp:
        with clock.stage("load"):
            study = load_study(inputs, workdir=tmp / ".ingest", bval=bval, bvec=bvec, limits=limits, refuse_head=True)
            canonical, reorientation = study.dwi.to_canonical()
        with clock.stage("segment"):
            b0, segmentation = segment_stage(canonical, segmenter, augment=options.augment, ventral_lean=options.refine)
        with clock.stage("fit"):
            maps = fit_stage(canonical, segmentation.labels, options)
        with clock.stage("refine"):
            refinement = refine_stage(canonical, b0, segmentation, maps, segmenter, options) if options.refine else None
            if refinement is not None:
                segmentation, maps = refinement.segmentation, refinement.maps
        with clock.stage("whole"):
            whole = None
            if options.whole_masks:
                segmentation, whole = whole_stage(segmentation)
        analysis = Analysis(study, canonical, reorientation, b0, segmentation, maps)
        with clock.stage("measure"):
            sections = measure_stage(analysis, whole=whole)
            check_stage(analysis, sections)
        report = build.assemble(
            study.dwi,
            series=study.dicom.series if study.dicom is not None else None,
            measures=sections,
            refinement=refinement_section(refinement, segmentation.labels),
            model=build.model_section(segmenter),
            fit=build.fit_section(
                method=maps.method, full_maps=options.full_maps, margin_mm=options.margin_mm, voxels=int(maps.mask.sum())
            ),
            timings_s=clock.timings,
        )
        with clock.stage("write"):
            report["qc"]["warnings"] += write_outputs(analysis, report=report, out=tmp, software_version=core.__version__)
            shutil.rmtree(tmp / ".ingest", ignore_errors=True)
        report["timings_s"] = dict(clock.timings)
        validate_report(report)
        write_report(report, tmp)
    return report


def convert(
    inputs: Sequence[Path],
    *,
    out_dir: Path,
    bval: Path | None = None,
    bvec: Path | None = None,
    limits: UploadLimits = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """Ingest only: write ``dwi.nii.gz``, ``dwi.bval``, ``dwi.bvec`` and ``dwi.json`` atomically."""
    with staging_dir(out_dir) as tmp:
        study = load_study(inputs, workdir=tmp / ".ingest", bval=bval, bvec=bvec, limits=limits)
        sidecar = write_ingest(study, tmp)
        shutil.rmtree(tmp / ".ingest", ignore_errors=True)
    return sidecar
