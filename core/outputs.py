"""The outputs of an analysis, in one table: file name, media type, the key under which the
service offers it (``/v1/jobs/{id}/{key}``) and what it holds.

The pipeline writes its files by these names (:mod:`core.report.write`), the gateway builds its
download routes and links from the table (so the OpenAPI document does too), and the
``scsnet submit`` client saves each download under its file name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.digest import sha256_of

NIFTI_GZ = "application/gzip"


@dataclass(frozen=True)
class Output:
    """One output file: ``/v1/jobs/{id}/{key}`` serves ``filename`` as ``media_type``."""

    key: str
    filename: str
    media_type: str
    summary: str


REPORT = Output("report", "report.json", "application/json", "The report (JSON Schema: core/report/report.schema.json).")
LABELS = Output("labels", "labels.nii.gz", NIFTI_GZ, "Eight-region labels (uint8 NIfTI) on the input's grid.")
SEG = Output("seg", "seg.dcm", "application/dicom", "DICOM Segmentation over the source b=0 images (DICOM input).")
SR = Output("sr", "sr.dcm", "application/dicom", "DICOM TID 1500 Measurement Report of the regional measures (DICOM input).")
QC_DCM = Output("qc.dcm", "qc.dcm", "application/dicom", "The QC picture as a DICOM Secondary Capture in the source study (DICOM input).")
FA = Output("maps/fa", "fa.nii.gz", NIFTI_GZ, "Fractional anisotropy map.")
MD = Output("maps/md", "md.nii.gz", NIFTI_GZ, "Mean diffusivity map (mm^2/s).")
AD = Output("maps/ad", "ad.nii.gz", NIFTI_GZ, "Axial diffusivity map (mm^2/s).")
RD = Output("maps/rd", "rd.nii.gz", NIFTI_GZ, "Radial diffusivity map (mm^2/s).")
B0 = Output("b0", "b0.nii.gz", NIFTI_GZ, "Mean of every b=0 volume.")
QC_PNG = Output("qc.png", "qc.png", "image/png", "QC picture: regions outlined on b0, and FA.")
QC_HTML = Output("qc.html", "qc.html", "text/html", "QC page: zoomed slices with region outlines, plots along the cord, the region table and warnings.")
DWI = Output("dwi", "dwi.nii.gz", NIFTI_GZ, "The converted diffusion series (DICOM input).")
DWI_BVAL = Output("dwi.bval", "dwi.bval", "text/plain", "b-values of the converted series (FSL).")
DWI_BVEC = Output("dwi.bvec", "dwi.bvec", "text/plain", "b-vectors of the converted series (FSL).")
DWI_JSON = Output("dwi.json", "dwi.json", "application/json", "Conversion sidecar of the converted series.")

OUTPUTS: tuple[Output, ...] = (
    REPORT, LABELS, SEG, SR, QC_DCM, FA, MD, AD, RD, B0, QC_PNG, QC_HTML, DWI, DWI_BVAL, DWI_BVEC, DWI_JSON
)
BY_KEY: dict[str, Output] = {o.key: o for o in OUTPUTS}
DICOM_RESULTS: tuple[Output, ...] = (SEG, SR, QC_DCM)
"""The DICOM outputs of a DICOM job, stored in the tenant's DICOMweb destination (STOW-RS) when it has one."""
MAPS: dict[str, Output] = {"fa": FA, "md": MD, "ad": AD, "rd": RD}
"""The tensor maps by the name of their :class:`~core.tensor.fit.TensorMaps` attribute."""


def describe_outputs(out_dir: Path) -> dict[str, dict[str, Any]]:
    """``{key: {"filename", "size", "sha256"}}`` for each output present in ``out_dir``.

    Computed once by the worker when a job succeeds, so the gateway serves digests without
    hashing in a request.
    """
    found: dict[str, dict[str, Any]] = {}
    for output in OUTPUTS:
        path = out_dir / output.filename
        if path.is_file():
            found[output.key] = {"filename": output.filename, "size": path.stat().st_size, "sha256": sha256_of(path)}
    return found
