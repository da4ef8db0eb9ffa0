"""What an upload is: check it cheaply, reject at once what can be rejected, and arrange it.

Given the received parts, :func:`arrange` decides by content (:mod:`app.sniff`) whether the
study is one NIfTI with its gradient files or DICOM (files and/or zips), checks what a header
read can check (a NIfTI without gradients, gradient counts against the volume count, zip
entries that are unsafe or too many), and renames the parts into the job's input folder under
names the service chooses (never the client's file names, which may carry patient names):

- NIfTI: ``dwi.nii`` or ``dwi.nii.gz``, ``dwi.bval``, ``dwi.bvec``;
- DICOM: ``dicom/000000.dcm`` (or ``.dcm.gz``) and ``dicom/000001.zip`` ...

It returns the job's input manifest. Full, safe extraction of zips happens in the worker
(``worker.ingest.archive``); this is only the early, cheap part.
"""

from __future__ import annotations

import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from app.errors import InvalidRequest
from app.sniff import Kind, head, read_numbers, sniff
from app.uploads import Form, Part
from worker.errors import ArchiveError, GradientError, ImageError, UnsupportedInputError

MAX_GRADIENT_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class ZipLimits:
    """What a zip upload may declare: entries and total unpacked bytes."""

    max_entries: int
    max_expanded_bytes: int


def check_zip(path: Path, *, label: str, limits: ZipLimits) -> None:
    """Reject a zip whose central directory shows traversal, links, too many entries or too
    many bytes once unpacked. Reads only the directory (no decompression)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ArchiveError(f"{label} is not a readable zip archive (it is corrupt or truncated)") from exc
    if len(infos) > limits.max_entries:
        raise ArchiveError(f"{label} holds {len(infos)} entries, more than the limit of {limits.max_entries}")
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_expanded_bytes:
        raise ArchiveError(
            f"{label} expands to {declared} bytes, more than the limit of {limits.max_expanded_bytes}; "
            "upload only the diffusion series"
        )
    for info in infos:
        name = info.filename.replace("\\", "/")
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in PurePosixPath(name).parts:
            raise ArchiveError(f"{label} contains an entry with an unsafe path pointing outside the archive")
        if info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16):
            raise ArchiveError(f"{label} contains a symbolic link; archives with links are refused")


def _gradient_rows(part: Part, label: str) -> list[list[float]]:
    if part.size > MAX_GRADIENT_FILE_BYTES:
        raise GradientError(f"the {label} file is {part.size} bytes, far too large for a gradient table")
    try:
        rows = read_numbers(part.path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GradientError(f"the {label} file is not a table of numbers") from exc
    if not rows:
        raise GradientError(f"the {label} file is empty")
    return rows


def _check_gradients(bval: Part, bvec: Part, n_volumes: int) -> None:
    """b-values: one row or column of ``n_volumes``; b-vectors: 3 x N or N x 3."""
    bvals = [v for row in _gradient_rows(bval, "bval") for v in row]
    if len(bvals) != n_volumes:
        raise GradientError(f"the image has {n_volumes} volumes but the bval file has {len(bvals)} b-values")
    rows = _gradient_rows(bvec, "bvec")
    shape = (len(rows), len(rows[0]))
    if any(len(r) != shape[1] for r in rows) or (3, n_volumes) != shape and (n_volumes, 3) != shape:
        raise GradientError(
            f"the bvec file must hold 3 x {n_volumes} or {n_volumes} x 3 numbers (the image has "
            f"{n_volumes} volumes); it holds {shape[0]} rows of {shape[1]}"
        )


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


def arrange(form: Form, *, dest: Path, zip_limits: ZipLimits) -> dict[str, Any]:
    """Check the received parts and move them to their final names in ``dest``.

    Returns the input manifest ``{"kind", "paths", "bval", "bvec", "files"}`` with paths
    relative to ``dest``. Raises a :class:`~worker.errors.ScsnetError` (4xx) for anything the
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
            check_zip(part.path, label=f"file {index + 1} of the upload", limits=zip_limits)
            suffix = ".zip"
        else:
            suffix = ".dcm.gz" if head(part.path, 4)[1] else ".dcm"
        part.path.rename(folder / f"{index:06d}{suffix}")
    return {"kind": "dicom", "paths": ["dicom"], "bval": None, "bvec": None, "files": digests}
