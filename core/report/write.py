"""Writing an analysis's files, named by the one table of outputs (:mod:`core.outputs`).

Masks and maps go back to the input's own voxel grid and affine; DICOM inputs also get the
converted series and, in the source study, a DICOM SEG over the source b=0 images, a TID 1500
measurement report and the QC picture as a Secondary Capture.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from core import outputs
from core.errors import ScsnetError
from core.ingest.dwi import DWI, Reorientation
from core.ingest.gradients import world_to_fsl, write_fsl
from core.ingest.sidecar import acquisition_fields
from core.ingest.study import Study
from core.report.build import acquisition_section, input_section
from core.report.qc import write_qc_png
from core.report.qc_page import write_qc_page
from core.segment.runtime import Segmentation
from core.tensor.fit import TensorMaps

if TYPE_CHECKING:
    from core.ingest.dicom import DicomSeriesInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Analysis:
    """Everything an analysis produced, on the canonical grid, before writing.

    study : what was read; ``canonical`` is its DWI reoriented to RAS+ by ``reorientation``.
    b0 : (X, Y, Z) float32 mean b=0 image.
    segmentation : the final (refined) labels.
    maps : the tensor fit the measures come from.
    """

    study: Study
    canonical: DWI
    reorientation: Reorientation
    b0: NDArray[np.float32]
    segmentation: Segmentation
    maps: TensorMaps


def save_nifti(array: NDArray[Any], affine: NDArray[np.float64], path: Path, dtype: type) -> None:
    """Write ``array`` as NIfTI-1 with ``affine`` as both qform and sform (code 1, scanner)."""
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def write_ingest(study: Study, out: Path) -> dict[str, Any]:
    """Write the converted series: ``dwi.nii.gz``, ``dwi.bval``, ``dwi.bvec`` (FSL convention)
    and ``dwi.json``; returns the sidecar."""
    dwi = study.dwi
    if study.dicom is not None:
        shutil.copyfile(study.dicom.nifti, out / outputs.DWI.filename)
    else:
        save_nifti(dwi.data, dwi.affine, out / outputs.DWI.filename, np.float32)
    write_fsl(
        dwi.bvals,
        world_to_fsl(dwi.bvecs, dwi.affine),
        bval_path=out / outputs.DWI_BVAL.filename,
        bvec_path=out / outputs.DWI_BVEC.filename,
    )
    sidecar = {
        "input": input_section(dwi, study.dicom.series if study.dicom is not None else None),
        "acquisition": acquisition_section(dwi),
        "warnings": list(dwi.provenance.warnings),
    }
    if study.dicom is not None and study.dicom.sidecar is not None:
        # derived files carry no patient identifiers: acquisition fields only (allow-list)
        sidecar["dcm2niix"] = acquisition_fields(json.loads(Path(study.dicom.sidecar).read_text()))
    (out / outputs.DWI_JSON.filename).write_text(json.dumps(sidecar, indent=2))
    return sidecar


def write_outputs(analysis: Analysis, *, report: dict[str, Any], out: Path, software_version: str) -> list[str]:
    """Write masks, maps, the QC picture and page and (DICOM input) the converted series and the DICOM
    objects into ``out``; fills ``report["dicom_outputs"]`` and returns warnings about outputs
    that could not be written."""
    affine, backward = analysis.study.dwi.affine, analysis.reorientation.backward
    labels_in = backward(analysis.segmentation.labels)
    save_nifti(labels_in, affine, out / outputs.LABELS.filename, np.uint8)
    save_nifti(backward(analysis.b0), affine, out / outputs.B0.filename, np.float32)
    for name, output in outputs.MAPS.items():
        save_nifti(backward(getattr(analysis.maps, name)), affine, out / output.filename, np.float32)
    write_qc_png(
        analysis.b0,
        analysis.maps.fa,
        analysis.segmentation.labels,
        out / outputs.QC_PNG.filename,
        zooms_mm=analysis.canonical.zooms,
    )
    write_qc_page(analysis, report, out / outputs.QC_HTML.filename)
    if analysis.study.dicom is None:
        return []
    write_ingest(analysis.study, out)
    return write_dicom_outputs(
        labels_in, affine=affine, series=analysis.study.dicom.series, report=report, out=out, software_version=software_version
    )


def write_dicom_outputs(
    labels: NDArray[np.uint8],
    *,
    affine: NDArray[np.float64],
    series: DicomSeriesInfo,
    report: dict[str, Any],
    out: Path,
    software_version: str,
) -> list[str]:
    """Write ``seg.dcm`` (the regions over the source b=0 images), ``sr.dcm`` (the measures as a
    TID 1500 Measurement Report referencing the SEG) and ``qc.dcm`` (the QC picture as a
    Secondary Capture) into the source study.

    Each is optional: one that cannot be written (a mosaic source, a source missing what the
    object needs, a bug in a DICOM library) becomes a warning naming it, and the others and the
    analysis stand. A failing disk is not such a case and is raised. ``labels`` (X, Y, Z) are on
    the converted series' grid (``affine``). Fills ``report["dicom_outputs"]``.
    """
    from core.report.dicom_source import software_versions
    from core.report.sc import write_qc_sc  # highdicom: only for DICOM input
    from core.report.seg import write_seg
    from core.report.sr import write_sr

    warnings: list[str] = []
    seg_path = out / outputs.SEG.filename
    versions = software_versions(software_version, report["model"])
    steps: list[tuple[str, outputs.Output, str, Callable[[Path], object]]] = [
        ("seg", outputs.SEG, "DICOM SEG", lambda path: write_seg(
            labels, affine=affine, series=series, out_path=path, software_version=versions)),
        ("sr", outputs.SR, "DICOM measurement report (SR)", lambda path: write_sr(
            report, series=series, seg_path=seg_path, out_path=path, software_version=software_version)),
        ("qc", outputs.QC_DCM, "DICOM QC picture", lambda path: write_qc_sc(
            out / outputs.QC_PNG.filename, series=series, out_path=path, software_version=versions)),
    ]
    for key, output, what, write in steps:
        path = out / output.filename
        if key == "sr" and not seg_path.is_file():
            warnings.append(f"no {what} was written: it refers to the regions of the DICOM SEG, which was not written")
            continue
        try:
            write(path)
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # the disk failed (full, read-only): the operator's problem, not this output's
            path.unlink(missing_ok=True)
            if not isinstance(exc, ScsnetError):
                log.exception("%s failed", output.filename)  # a library's or our bug: keep its traceback
            warnings.append(f"no {what} was written: {_reason(exc)}")
            continue
        report["dicom_outputs"][key] = _identify(path)
    return warnings


def _reason(exc: Exception) -> str:
    """One sentence on why an optional output failed (a library's own words, bounded)."""
    if isinstance(exc, ScsnetError):
        return exc.detail
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _identify(path: Path) -> dict[str, str]:
    """The file name and UIDs of a written DICOM object."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
    return {"file": path.name, "series_instance_uid": str(ds.SeriesInstanceUID), "sop_instance_uid": str(ds.SOPInstanceUID)}


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write ``report.json``."""
    (out / outputs.REPORT.filename).write_text(json.dumps(report, indent=2))
