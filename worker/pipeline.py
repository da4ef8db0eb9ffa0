"""The analysis pipeline: load -> segment -> fit (and refine the masks by MD) -> measure -> write.

The refinement by MD, after the tensor fit: a second network pass on the b0 with its CSF
brightened by MD (:mod:`worker.segment.csf_contrast`), then the CSF rim trimmed off its outline
(:mod:`worker.segment.csf_rim`); ``Options(csf_trim=False)`` keeps the first pass's masks.

Each stage is a function with its own test; :func:`analyze` strings them together, times them
and reports progress through a small callable, so the CLI shows a bar and the Celery task writes
the job record, without the core knowing either.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from worker.errors import InputError
from worker.ingest.dwi import DWI, Reorientation
from worker.ingest.gradients import world_to_fsl, write_fsl
from worker.ingest.study import Study, load_study
from worker.measures import regions as measures
from worker.report.build import (
    SCHEMA_VERSION,
    UNITS,
    acquisition_section,
    input_section,
    now_iso,
    software_versions,
    validate_report,
)
from worker.report.qc import write_qc_png
from worker.segment.csf_contrast import contrast_pass
from worker.segment.csf_rim import CSF_MD_MM2_S, RimTrim, trim_csf_rim
from worker.segment.runtime import Segmentation, Segmenter
from worker.tensor.fit import FIT_MARGIN_MM, FitMethod, TensorFitter, TensorMaps, fit_mask

STAGES = ("load", "segment", "fit", "measure", "write")

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
    csf_trim: bool = True
    """Refine the masks by MD after the fit (the CSF-contrast pass, then the CSF-rim trim);
    False keeps the network's first-pass masks (``scsnet analyze --no-csf-trim``)."""


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


@dataclass(frozen=True)
class Analysis:
    """Everything an analysis produced, on the canonical grid, before writing."""

    study: Study
    canonical: DWI
    reorientation: Reorientation
    b0: NDArray[np.float32]
    segmentation: Segmentation
    maps: TensorMaps


def segment_stage(canonical: DWI, segmenter: Segmenter) -> tuple[NDArray[np.float32], Segmentation]:
    """Mean b0 (X, Y, Z) of the canonical study and its eight-region segmentation."""
    b0 = canonical.mean_b0()
    return b0, segmenter.segment(b0, zooms_mm=canonical.zooms)


def fit_stage(canonical: DWI, labels: NDArray[np.uint8], options: Options) -> TensorMaps:
    """Tensor maps on the cord plus margin (or the whole field with ``full_maps``)."""
    mask = None if options.full_maps else fit_mask(labels, zooms_mm=canonical.zooms, margin_mm=options.margin_mm)
    return TensorFitter(canonical, method=options.fit_method).fit(canonical.data, mask=mask)


def contrast_stage(
    canonical: DWI, b0: NDArray[np.float32], segmentation: Segmentation, maps: TensorMaps, segmenter: Segmenter, options: Options
) -> tuple[Segmentation, TensorMaps, bool]:
    """The segmentation of a second pass on the b0 with its CSF brightened by MD
    (:mod:`worker.segment.csf_contrast`), with the tensor refitted if its cord reaches beyond
    the first fit; the first pass's, unchanged, when it found no cord or the cord's MD is not
    cord-like (then the MD map cannot be trusted; :func:`trim_stage` warns). The flag says
    whether the pass ran."""
    second = contrast_pass(segmenter, b0, maps.md, segmentation, zooms_mm=canonical.zooms)
    if second is None:
        return segmentation, maps, False
    if np.any((second.labels > 0) & ~maps.mask):
        both = ((segmentation.labels > 0) | (second.labels > 0)).astype(np.uint8)
        maps = fit_stage(canonical, both, options)
    return second, maps, True


def trim_stage(canonical: DWI, segmentation: Segmentation, maps: TensorMaps) -> tuple[Segmentation, RimTrim]:
    """The segmentation with its CSF rim trimmed by MD (:mod:`worker.segment.csf_rim`); a
    slice the trim would leave below the minimum cord area keeps its labels, with a warning."""
    zx, zy, _ = canonical.zooms
    trim = trim_csf_rim(segmentation.labels, maps.md, pixel_area_mm2=zx * zy)
    warnings = segmentation.warnings
    if trim.skipped:
        warnings += (
            f"the segmented cord's median mean diffusivity is {trim.cord_median_md * 1e3:.2f} x10^-3 mm^2/s, "
            "which no spinal cord has; the masks were not refined by MD: check the b-values and the masks",
        )
    if trim.kept_slices:
        warnings += (
            f"the cord outline on slice(s) {', '.join(map(str, trim.kept_slices))} has CSF-like "
            "diffusivity almost all round; left as segmented, check the b-values and the masks",
        )
    return replace(segmentation, labels=trim.labels, warnings=warnings), trim


def csf_rim_section(trim: RimTrim | None, labels: NDArray[np.uint8], *, second_pass: bool) -> dict[str, Any]:
    """The report's account of the refinement by MD (``trim`` None: switched off)."""
    return {
        "csf_contrast_pass": second_pass,
        "md_threshold_mm2_s": None if trim is None else CSF_MD_MM2_S,
        "voxels_removed": 0 if trim is None else trim.voxels_removed,
        "cord_voxels": int(np.count_nonzero(labels)),
    }


def measure_stage(analysis: Analysis, *, warnings: list[str]) -> dict[str, Any]:
    """The measurement sections of the report (regions, cord, slices, QC)."""
    canonical, labels, maps = analysis.canonical, analysis.segmentation.labels, analysis.maps
    zx, zy, zz = canonical.zooms
    regions = measures.region_measures(labels, maps, voxel_volume_mm3=zx * zy * zz)
    cord = measures.cord_measures(labels, maps, voxel_volume_mm3=zx * zy * zz)
    slices, most_compressed = measures.slice_measures(labels, maps, pixel_area_mm2=zx * zy)
    centre = canonical.affine @ np.array([(canonical.shape[0] - 1) / 2, (canonical.shape[1] - 1) / 2, 0, 1])
    for entry in slices:
        entry["z_mm"] = round(float(centre[2] + canonical.affine[2, 2] * entry["index"]), 3)
    snr = measures.b0_snr(canonical.data[..., canonical.is_b0], labels > 0)
    qc_warnings = list(canonical.provenance.warnings) + list(analysis.segmentation.warnings) + warnings
    if snr is not None and snr < LOW_SNR:
        qc_warnings.append(f"the b0 signal-to-noise ratio in the cord is low ({snr:.1f}); measures are noisy")
    if canonical.n_directions < 12:
        qc_warnings.append(
            f"only {canonical.n_directions} diffusion directions: enough for a tensor, but FA is biased "
            "and noisy below about 12"
        )
    qc_warnings += measures.missing_region_warnings(slices)
    return {
        "regions": regions,
        "cord": cord,
        "slices": slices,
        "most_compressed_slice": most_compressed,
        "qc": {
            "warnings": qc_warnings,
            "b0_snr": snr,
            "slices_without_cord": list(analysis.segmentation.slices_without_cord),
        },
    }


def _save(array: NDArray[Any], affine: NDArray[np.float64], path: Path, dtype: type) -> None:
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def write_ingest(study: Study, out: Path) -> dict[str, Any]:
    """Write ``dwi.nii.gz``, ``dwi.bval``, ``dwi.bvec`` (FSL convention) and ``dwi.json``."""
    dwi = study.dwi
    if study.dicom is not None:
        shutil.copyfile(study.dicom.nifti, out / "dwi.nii.gz")
    else:
        _save(dwi.data, dwi.affine, out / "dwi.nii.gz", np.float32)
    write_fsl(dwi.bvals, world_to_fsl(dwi.bvecs, dwi.affine), bval_path=out / "dwi.bval", bvec_path=out / "dwi.bvec")
    sidecar = {
        "input": input_section(dwi),
        "acquisition": acquisition_section(dwi),
        "warnings": list(dwi.provenance.warnings),
    }
    if study.dicom is not None and study.dicom.sidecar is not None:
        sidecar["dcm2niix"] = json.loads(Path(study.dicom.sidecar).read_text())
    (out / "dwi.json").write_text(json.dumps(sidecar, indent=2))
    return sidecar


def write_outputs(analysis: Analysis, report: dict[str, Any], out: Path) -> list[str]:
    """Write masks, maps, QC picture, SEG and the report into ``out``; returns warnings."""
    reo, affine = analysis.reorientation, analysis.study.dwi.affine
    warnings: list[str] = []
    labels_in = reo.backward(analysis.segmentation.labels)
    _save(labels_in, affine, out / "labels.nii.gz", np.uint8)
    _save(reo.backward(analysis.b0), affine, out / "b0.nii.gz", np.float32)
    for key in ("fa", "md", "ad", "rd"):
        _save(reo.backward(getattr(analysis.maps, key)), affine, out / f"{key}.nii.gz", np.float32)
    write_qc_png(
        analysis.b0, analysis.maps.fa, analysis.segmentation.labels, out / "qc.png", zooms_mm=analysis.canonical.zooms
    )
    if analysis.study.dicom is not None:
        write_ingest(analysis.study, out)
        from worker.report.seg import write_seg

        try:
            write_seg(
                labels_in,
                affine=affine,
                series=analysis.study.dicom.series,
                out_path=out / "seg.dcm",
                software_version=report["software"]["scsnet"],
            )
        except InputError as exc:
            warnings.append(f"no DICOM SEG was written: {exc.detail}")
    return warnings


def analyze(
    inputs: Sequence[Path],
    *,
    out_dir: Path,
    segmenter: Segmenter,
    bval: Path | None = None,
    bvec: Path | None = None,
    options: Options = Options(),
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Analyse one study and write every output into ``out_dir`` atomically.

    Outputs are written into a temporary sibling folder and renamed into place at the end, so
    ``out_dir`` is either absent, the previous complete result, or the new complete result.
    Returns the report (already validated against the schema).
    """
    clock = _Clock(progress)
    with staging_dir(out_dir) as tmp:
        with clock.stage("load"):
            study = load_study(inputs, workdir=tmp / ".ingest", bval=bval, bvec=bvec)
            canonical, reo = study.dwi.to_canonical()
        with clock.stage("segment"):
            b0, segmentation = segment_stage(canonical, segmenter)
        with clock.stage("fit"):
            maps = fit_stage(canonical, segmentation.labels, options)
            trim, second_pass = None, False
            if options.csf_trim:
                segmentation, maps, second_pass = contrast_stage(canonical, b0, segmentation, maps, segmenter, options)
                segmentation, trim = trim_stage(canonical, segmentation, maps)
        analysis = Analysis(study, canonical, reo, b0, segmentation, maps)
        with clock.stage("measure"):
            extra_warnings: list[str] = []
            sections = measure_stage(analysis, warnings=extra_warnings)
            sections["qc"]["csf_rim"] = csf_rim_section(trim, segmentation.labels, second_pass=second_pass)
        report: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "created": now_iso(),
            "input": input_section(study.dwi),
            "acquisition": acquisition_section(study.dwi),
            "units": UNITS,
            **sections,
            "model": {
                "name": segmenter.manifest.name,
                "version": segmenter.manifest.version,
                "sha256": segmenter.sha256,
                "provider": segmenter.provider,
            },
            "software": software_versions(),
            "fit": {
                "method": maps.method,
                "region": "full-field" if options.full_maps else "cord-margin",
                "margin_mm": None if options.full_maps else options.margin_mm,
                "voxels": int(maps.mask.sum()),
            },
            "timings_s": clock.timings,
        }
        with clock.stage("write"):
            report["qc"]["warnings"] += write_outputs(analysis, report, tmp)
            shutil.rmtree(tmp / ".ingest", ignore_errors=True)
        report["timings_s"] = dict(clock.timings)
        validate_report(report)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    return report


def convert(inputs: Sequence[Path], *, out_dir: Path, bval: Path | None = None, bvec: Path | None = None) -> dict[str, Any]:
    """Ingest only: write ``dwi.nii.gz``, ``dwi.bval``, ``dwi.bvec`` and ``dwi.json`` atomically."""
    with staging_dir(out_dir) as tmp:
        study = load_study(inputs, workdir=tmp / ".ingest", bval=bval, bvec=bvec)
        sidecar = write_ingest(study, tmp)
        shutil.rmtree(tmp / ".ingest", ignore_errors=True)
    return sidecar


MARKERS = ("report.json", "dwi.json")


def discard_staging(out_dir: Path) -> None:
    """Remove the temporary folders :func:`staging_dir` left beside ``out_dir`` when its
    process was killed mid-way (a SIGKILL runs no ``finally``). Call it only when no other
    analysis into ``out_dir`` is running."""
    out_dir = Path(out_dir).absolute()
    for kind in ("partial", "old"):
        for folder in out_dir.parent.glob(f".{out_dir.name}.{kind}-*"):
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` that replaces it only if the block succeeds.

    Refuses to replace an existing non-empty folder that is not an earlier scsnet output.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not any((out_dir / m).exists() for m in MARKERS))):
        raise InputError(f"the output folder {out_dir} exists and holds other files; choose an empty or new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(old / "previous")
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

