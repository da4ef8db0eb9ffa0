"""One entry point for every kind of input: a 4D NIfTI with gradient files, or DICOM (files,
folders, zips, gzipped files). Returns the validated study and, for DICOM, what the converter
wrote and what a DICOM SEG needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import InputError, UnsupportedInputError
from core.ingest.dwi import DWI
from core.ingest.nifti import is_nifti_name, load_nifti_dwi
from core.ingest.rules import DEFAULT_LIMITS, UploadLimits

if TYPE_CHECKING:
    from core.ingest.dicom import DicomIngest


@dataclass(frozen=True)
class Study:
    """A loaded study: the DWI, and the DICOM ingest record when the input was DICOM."""

    dwi: DWI
    dicom: DicomIngest | None = None


def load_study(
    inputs: Sequence[Path],
    *,
    workdir: Path,
    bval: Path | None = None,
    bvec: Path | None = None,
    limits: UploadLimits = DEFAULT_LIMITS,
    refuse_head: bool = False,
) -> Study:
    """Load ``inputs`` as one diffusion study.

    A single ``.nii`` / ``.nii.gz`` is read with its gradient files (``bval``/``bvec`` or its
    BIDS siblings); anything else is treated as DICOM and converted with dcm2niix into
    ``workdir``, unpacked within ``limits``; ``refuse_head``: a DICOM series of the head is
    refused as soon as it is chosen (:func:`core.ingest.dicom.ingest_dicom`).
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise InputError("no input was given")
    for p in paths:
        if not p.exists():
            raise InputError(f"{p} does not exist")
    niftis = [p for p in paths if p.is_file() and is_nifti_name(p)]
    if niftis:
        if len(paths) != 1:
            raise UnsupportedInputError(
                "give one NIfTI image per study (with --bval/--bvec), not NIfTI mixed with other files"
            )
        return Study(dwi=load_nifti_dwi(paths[0], bval=bval, bvec=bvec))
    if bval is not None or bvec is not None:
        raise UnsupportedInputError("--bval/--bvec go with a NIfTI image; DICOM carries its own gradients")
    from core.ingest.dicom import ingest_dicom

    ingest = ingest_dicom(paths, workdir=workdir, limits=limits, refuse_head=refuse_head)
    return Study(dwi=ingest.dwi, dicom=ingest)
