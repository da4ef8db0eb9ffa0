"""The outputs a job offers for download: one table for routes, links, media types and digests."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.digest import sha256_of

NIFTI_GZ = "application/gzip"


@dataclass(frozen=True)
class Artifact:
    """One downloadable output: ``/v1/jobs/{id}/{key}`` serves ``filename`` as ``media_type``."""

    key: str
    filename: str
    media_type: str
    summary: str


ARTIFACTS: tuple[Artifact, ...] = (
    Artifact("report", "report.json", "application/json", "The report (JSON Schema: worker/report/report.schema.json)."),
    Artifact("labels", "labels.nii.gz", NIFTI_GZ, "Eight-region labels (uint8 NIfTI) on the input's grid."),
    Artifact("seg", "seg.dcm", "application/dicom", "DICOM Segmentation over the source b=0 images (DICOM input)."),
    Artifact("maps/fa", "fa.nii.gz", NIFTI_GZ, "Fractional anisotropy map."),
    Artifact("maps/md", "md.nii.gz", NIFTI_GZ, "Mean diffusivity map (mm^2/s)."),
    Artifact("maps/ad", "ad.nii.gz", NIFTI_GZ, "Axial diffusivity map (mm^2/s)."),
    Artifact("maps/rd", "rd.nii.gz", NIFTI_GZ, "Radial diffusivity map (mm^2/s)."),
    Artifact("b0", "b0.nii.gz", NIFTI_GZ, "Mean of every b=0 volume."),
    Artifact("qc.png", "qc.png", "image/png", "QC picture: regions outlined on b0, and FA."),
    Artifact("dwi", "dwi.nii.gz", NIFTI_GZ, "The converted diffusion series (DICOM input)."),
    Artifact("dwi.bval", "dwi.bval", "text/plain", "b-values of the converted series (FSL)."),
    Artifact("dwi.bvec", "dwi.bvec", "text/plain", "b-vectors of the converted series (FSL)."),
    Artifact("dwi.json", "dwi.json", "application/json", "Conversion sidecar of the converted series."),
)
BY_KEY = {a.key: a for a in ARTIFACTS}


def job_links(job_id: str, artifacts: dict[str, Any]) -> dict[str, str]:
    """Links of a job: itself, and each output it has."""
    links = {"self": f"/v1/jobs/{job_id}"}
    links.update({a.key: f"/v1/jobs/{job_id}/{a.key}" for a in ARTIFACTS if a.key in artifacts})
    return links


def describe_outputs(out_dir: Path) -> dict[str, dict[str, Any]]:
    """``{key: {"filename", "size", "sha256"}}`` for each artifact present in ``out_dir``.

    Computed once by the worker when a job succeeds, so the gateway serves digests without
    hashing in a request.
    """
    found: dict[str, dict[str, Any]] = {}
    for artifact in ARTIFACTS:
        path = out_dir / artifact.filename
        if path.is_file():
            found[artifact.key] = {"filename": artifact.filename, "size": path.stat().st_size, "sha256": sha256_of(path)}
    return found


def digest_headers(sha256_hex: str) -> dict[str, str]:
    """``Repr-Digest`` (RFC 9530) and its predecessor ``Digest`` (RFC 3230) for a file."""
    b64 = base64.b64encode(bytes.fromhex(sha256_hex)).decode()
    return {"Repr-Digest": f"sha-256=:{b64}:", "Digest": f"sha-256={b64}", "ETag": f'"{sha256_hex}"'}
