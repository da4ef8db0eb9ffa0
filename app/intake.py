"""What an upload is: check it cheaply, reject at once what can be rejected, and arrange it.

Given the received parts, :func:`arrange` decides by content (:mod:`core.ingest.sniff`) whether the
study is one NIfTI with its gradient files or DICOM (files and/or zips), checks what a header
read can check (a NIfTI without gradients, gradient counts against the volume count, zip
entries that are unsafe or too many), and renames the parts into the job's input folder under
names the service chooses (never the client's file names, which may carry patient names):

- NIfTI: ``dwi.nii`` or ``dwi.nii.gz``, ``dwi.bval``, ``dwi.bvec``;
- DICOM: ``dicom/000000.dcm`` (or ``.dcm.gz``) and ``dicom/000001.zip`` ...

It returns the job's input manifest. The rules are :mod:`core.ingest.rules`, the ones the
worker's ingest applies again when it unpacks the study (``core.ingest.archive``); this is only
the early, cheap part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.uploads import Form, Part
from core.errors import GradientError, ImageError, UnsupportedInputError
from core.ingest import rules
from core.ingest.sniff import Kind, head, sniff
from service.errors import InvalidRequest


def check_zip(path: Path, *, label: str, limits: rules.UploadLimits) -> None:
    """Refuse a zip whose central directory breaks the upload rules (traversal, links,
    encryption, bombs, too many files or bytes); reads only the directory."""
    rules.check_zip_directory(rules.open_zip_directory(path, label=label), label=label, limits=limits)


def _check_gradients(bval: Part, bvec: Part, n_volumes: int) -> None:
    """The gradient files read by the same rules the analysis applies, counted against the
    image's volumes."""
    bval_name, bvec_name = "(the 'bval' field)", "(the 'bvec' field)"
    bvals = rules.bvalues_of(rules.read_table(bval.path, what="b-value", name=bval_name), name=bval_name)
    bvecs = rules.bvectors_of(rules.read_table(bvec.path, what="b-vector", name=bvec_name), name=bvec_name)
    rules.check_gradient_counts(n_bvals=len(bvals), n_bvecs=len(bvecs), n_volumes=n_volumes)


def _nifti_manifest(image: Part, dims: tuple[int, ...], bval: Part | None, bvec: Part | None, dest: Path) -> dict[str, Any]:
    if bval is None or bvec is None:
        raise GradientError("a NIfTI upload needs its gradient files: send them as the bval and bvec fields")
    if len(dims) != 4 or dims[3] < 2:
        raise ImageError(f"the NIfTI image is {len(dims)}-dimensional {list(dims)}; a diffusion series is 4D")
    _check_gradients(bval, bvec, dims[3])
    _, gzipped = head(image.path, 4)
    name = "dwi.nii.gz" if gzipped else "dwi.nii"
    image.path.rename(dest / name)
    bval.path.rename(dest / "dwi.bval")
    bvec.path.rename(dest / "dwi.bvec")
    return {"kind": "nifti", "paths": [name], "bval": "dwi.bval", "bvec": "dwi.bvec"}


def arrange(form: Form, *, dest: Path, limits: rules.UploadLimits) -> dict[str, Any]:
    """Check the received parts and move them to their final names in ``dest``.

    Returns the input manifest ``{"kind", "paths", "bval", "bvec", "files"}`` with paths
    relative to ``dest``, unpacked within ``limits``. Raises a :class:`~core.errors.ScsnetError` (4xx) for anything the
    headers already show to be unusable.
    """
    files = [p for p in form.parts if p.field == "files"]
    bvals = [p for p in form.parts if p.field == "bval"]
    bvecs = [p for p in form.parts if p.field == "bvec"]
    if not files:
        raise InvalidRequest("the upload holds no study: send one or more files in the 'files' field")
    if len(bvals) > 1 or len(bvecs) > 1:
        raise InvalidRequest("send at most one bval and one bvec file")
    bval, bvec = (bvals[0] if bvals else None), (bvecs[0] if bvecs else None)
    digests = [{"field": p.field, "size": p.size, "sha256": p.sha256} for p in form.parts]
    kinds = [sniff(p.path) for p in files]
    niftis = [(p, dims) for p, (kind, dims) in zip(files, kinds) if kind == Kind.nifti]
    for index, (kind, _) in enumerate(kinds):
        if kind in (Kind.text, Kind.unknown):
            raise UnsupportedInputError(
                f"file {index + 1} of the upload is neither NIfTI, DICOM nor a zip of DICOM (judged by its content)"
            )
    if niftis:
        if len(files) != 1:
            raise UnsupportedInputError("send one NIfTI image per study, not NIfTI mixed with other files")
        image, dims = niftis[0]
        manifest = _nifti_manifest(image, dims or (), bval, bvec, dest)
        return {**manifest, "files": digests}
    if bval is not None or bvec is not None:
        raise UnsupportedInputError("bval and bvec go with a NIfTI image; DICOM carries its own gradients")
    folder = dest / "dicom"
    folder.mkdir()
    for index, (part, (kind, _)) in enumerate(zip(files, kinds)):
        if kind == Kind.zip:
            check_zip(part.path, label=f"file {index + 1} of the upload", limits=limits)
            suffix = ".zip"
        else:
            suffix = ".dcm.gz" if head(part.path, 4)[1] else ".dcm"
        part.path.rename(folder / f"{index:06d}{suffix}")
    return {"kind": "dicom", "paths": ["dicom"], "bval": None, "bvec": None, "files": digests}
