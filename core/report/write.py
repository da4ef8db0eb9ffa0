"""Writing an analysis's files, named by the one table of outputs (:mod:`core.outputs`).

Masks and maps go back to the input's own voxel grid and affine; DICOM inputs also get the
converted series and a DICOM SEG over the source b=0 images.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from core import outputs
from core.errors import InputError
from core.ingest.dwi import DWI, Reorientation
from core.ingest.gradients import world_to_fsl, write_fsl
from core.ingest.study import Study
from core.report.build import acquisition_section, input_section
from core.report.qc import write_qc_png
from core.segment.runtime import Segmentation
from core.tensor.fit import TensorMaps


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
        "input": input_section(dwi),
        "acquisition": acquisition_section(dwi),
        "warnings": list(dwi.provenance.warnings),
    }
    if study.dicom is not None and study.dicom.sidecar is not None:
        sidecar["dcm2niix"] = json.loads(Path(study.dicom.sidecar).read_text())
    (out / outputs.DWI_JSON.filename).write_text(json.dumps(sidecar, indent=2))
    return sidecar


def write_outputs(analysis: Analysis, *, out: Path, software_version: str) -> list[str]:
    """Write masks, maps, the QC picture and (DICOM input) the converted series and the SEG into
    ``out``; returns warnings about outputs that could not be written."""
    affine, backward = analysis.study.dwi.affine, analysis.reorientation.backward
    warnings: list[str] = []
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
    if analysis.study.dicom is not None:
        write_ingest(analysis.study, out)
        from core.report.seg import write_seg  # highdicom: only for DICOM input

        try:
            write_seg(
                labels_in,
                affine=affine,
                series=analysis.study.dicom.series,
                out_path=out / outputs.SEG.filename,
                software_version=software_version,
            )
        except InputError as exc:
            warnings.append(f"no DICOM SEG was written: {exc.detail}")
    return warnings


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write ``report.json``."""
    (out / outputs.REPORT.filename).write_text(json.dumps(report, indent=2))
