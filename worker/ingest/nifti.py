"""Loading a 4D NIfTI with FSL-style gradient files into a :class:`~worker.ingest.dwi.DWI`."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from worker.errors import GradientError, ImageError, UnreadableFileError
from worker.ingest.dwi import DWI, FileDigest, InputFormat, Provenance, sha256_of
from worker.ingest.gradients import fsl_to_world, read_bvals, read_bvecs

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti_name(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def stem_of(path: Path) -> str:
    """``x.nii.gz`` -> ``x`` (the BIDS stem shared with ``x.bval`` / ``x.bvec``)."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_gradient_files(image: Path) -> tuple[Path, Path]:
    """The ``.bval`` / ``.bvec`` beside ``image`` with the same stem (BIDS, dcm2niix style)."""
    stem = stem_of(image)
    bval = image.with_name(stem + ".bval")
    bvec = image.with_name(stem + ".bvec")
    missing = [p.name for p in (bval, bvec) if not p.is_file()]
    if missing:
        raise GradientError(
            f"no gradient files for {image.name}: give --bval and --bvec, or put "
            f"{' and '.join(missing)} beside the image"
        )
    return bval, bvec


def load_nifti_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI image fully into memory as float32 with its affine (voxel -> RAS+ mm).

    Raises :class:`UnreadableFileError` with a specific sentence for truncated, corrupt or
    non-NIfTI files.
    """
    try:
        img = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, ValueError, OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UnreadableFileError(f"{path.name} is not a readable NIfTI image ({_reason(exc)})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UnreadableFileError(f"{path.name} is not a NIfTI image")
    shape = img.shape
    if len(shape) > 4 and all(s == 1 for s in shape[4:]):
        shape = shape[:4]
    n_voxels = int(np.prod(shape, dtype=np.int64))
    if n_voxels > 2_000_000_000 // 4:
        raise ImageError(f"{path.name} declares {shape} voxels, too large for a diffusion study")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except (ValueError, OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UnreadableFileError(
            f"{path.name} is truncated or corrupt: its voxel data cannot be read ({_reason(exc)})"
        ) from exc
    affine = img.affine
    if affine is None:
        raise ImageError(f"{path.name} has no orientation information")
    return data, np.asarray(affine, dtype=np.float64)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def load_nifti_dwi(
    image: Path,
    *,
    bval: Path | None = None,
    bvec: Path | None = None,
    source_format: InputFormat = "nifti",
    digests: tuple[FileDigest, ...] | None = None,
    series_description: str | None = None,
    manufacturer: str | None = None,
    series_instance_uid: str | None = None,
    warnings: tuple[str, ...] = (),
) -> DWI:
    """Load a 4D NIfTI and its FSL gradient files as a validated :class:`DWI`.

    Gradient files default to the BIDS siblings (same stem, ``.bval`` / ``.bvec``). FSL
    b-vectors are converted to world RAS+ with the image's affine.
    """
    image = Path(image)
    data, affine = load_nifti_image(image)
    if bval is None or bvec is None:
        found_bval, found_bvec = find_gradient_files(image)
        bval = bval or found_bval
        bvec = bvec or found_bvec
    bvals = read_bvals(bval)
    bvecs_fsl = read_bvecs(bvec)
    bvecs_world = fsl_to_world(bvecs_fsl, affine)
    if digests is None:
        digests = tuple(FileDigest(p.name, sha256_of(p)) for p in (image, Path(bval), Path(bvec)))
    provenance = Provenance(
        format=source_format,
        files=digests,
        series_description=series_description,
        manufacturer=manufacturer,
        series_instance_uid=series_instance_uid,
        warnings=warnings,
    )
    return DWI(data=data, affine=affine, bvals=bvals, bvecs=bvecs_world, provenance=provenance)
