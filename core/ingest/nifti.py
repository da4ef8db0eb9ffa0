"""Loading a 4D NIfTI with FSL-style gradient files into a :class:`~core.ingest.dwi.DWI`."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib

from core.digest import sha256_of
from core.errors import GradientError, ImageError, UnreadableFileError
from core.ingest.dwi import DWI, FileDigest, InputFormat, Provenance
from core.ingest.gradients import fsl_to_world, read_bvals, read_bvecs
from core.ingest.rules import check_voxel_size

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


MAX_VOXELS = 2_000_000_000 // 4
"""Most voxels (over all volumes) a study may declare: 2 GB as float32."""

DEFLATE_MAX_RATIO = 1032
"""Deflate cannot expand data more than about 1032 times: a gzipped file declaring more voxel
bytes than that is truncated or forged, and is refused before any buffer is allocated for it."""

GZIP_TRAILING_SLACK = 1 << 20
"""Bytes a gzipped NIfTI may hold beyond the image its header declares (writers add none)."""

_UNREADABLE = (
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,  # unknown datatype, impossible vox_offset, bad scaling
    ValueError,
    OverflowError,  # infinite or negative offsets and sizes reaching mmap or int()
    OSError,  # includes gzip.BadGzipFile
    EOFError,
    zlib.error,
)


def load_nifti_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI image fully into memory as float32 with its affine (voxel -> RAS+ mm).

    The header is checked before any voxel is read: dimensions must be positive, voxels real
    numbers (not complex or RGB), the affine finite, and the file must hold the voxel data it
    declares (a gzipped file is verified to its checksum), so a tiny forged file never makes us
    allocate gigabytes and a corrupt one is never read as silently wrong voxels.

    Raises :class:`UnreadableFileError` with a specific sentence for truncated, corrupt or
    non-NIfTI files, :class:`ImageError` for headers that declare an unusable image.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
    except _UNREADABLE as exc:
        raise UnreadableFileError(f"{path.name} is not a readable NIfTI image ({_reason(exc, path)})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UnreadableFileError(f"{path.name} is not a NIfTI image")
    shape = tuple(int(s) for s in img.shape)
    if not shape or min(shape) < 1:
        raise ImageError(f"{path.name} declares impossible dimensions {list(shape)} in its header")
    if len(shape) > 4 and all(s == 1 for s in shape[4:]):
        shape = shape[:4]
    n_voxels = math.prod(shape)  # Python ints: forged NIfTI-2 dimensions cannot overflow
    if n_voxels > MAX_VOXELS:
        raise ImageError(f"{path.name} declares {shape} voxels, too large for a diffusion study")
    dtype = img.header.get_data_dtype()
    if dtype.kind not in "iuf":
        raise ImageError(
            f"{path.name} holds {_dtype_name(dtype)} voxels; a diffusion series is real-valued (magnitude) data"
        )
    affine = img.affine
    if affine is None:
        raise ImageError(f"{path.name} has no orientation information")
    with np.errstate(all="ignore"):
        usable = np.all(np.isfinite(affine)) and np.all(np.isfinite(np.linalg.norm(affine[:3, :3], axis=0)))
    if not usable:
        raise ImageError(f"{path.name} has an orientation (affine) that is not finite")
    _check_geometry(img, affine, path=path)
    # the proxy's offset is the file's (the image's own header copy has it reset to 0)
    raw = _read_checked(path, offset=int(getattr(img.dataobj, "offset", 0)), n_bytes=n_voxels * dtype.itemsize)
    try:
        if raw is not None:  # gzipped: parse the verified bytes instead of decompressing twice
            img = type(img).from_bytes(raw)
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except _UNREADABLE as exc:
        raise UnreadableFileError(
            f"{path.name} is truncated or corrupt: its voxel data cannot be read ({_reason(exc, path)})"
        ) from exc
    return data, np.asarray(affine, dtype=np.float64)


def _check_geometry(img: nib.Nifti1Image | nib.Nifti2Image, affine: np.ndarray, *, path: Path) -> None:
    """Refuse voxel sizes outside the bounds of :func:`core.ingest.rules.check_voxel_size`,
    before any voxel is read. Without a qform or sform the voxel size is the header's
    ``pixdim`` itself (zero there is refused, never read as a 1 mm default); with one, the
    lengths of the affine's columns."""
    header = img.header
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        check_voxel_size(_raw_pixdim(path, type(header)), field="pixdim (the header has no qform or sform)", label=path.name)
    with np.errstate(all="ignore"):
        sizes = np.linalg.norm(affine[:3, :3], axis=0)
    check_voxel_size([float(v) for v in sizes], field="the qform/sform (pixdim)", label=path.name)


def _raw_pixdim(path: Path, header_class: type[nib.Nifti1Header]) -> list[float]:
    """``pixdim[1:4]`` as the file holds them: nibabel's loader silently turns a zero into 1 mm
    (its header check "fixes" it), which is exactly the default we must not take. The sign is
    dropped (without a qform the voxel axes' directions are undefined anyway)."""
    try:
        with nib.openers.ImageOpener(str(path)) as stream:
            raw = header_class.from_fileobj(stream, check=False)
    except _UNREADABLE as exc:
        raise UnreadableFileError(f"{path.name} is not a readable NIfTI image ({_reason(exc, path)})") from exc
    return [abs(float(v)) for v in raw["pixdim"][1:4]]


def _dtype_name(dtype: np.dtype) -> str:
    return "colour (RGB)" if dtype.fields else "complex" if dtype.kind == "c" else str(dtype)


def _read_checked(path: Path, *, offset: int, n_bytes: int) -> bytes | None:
    """Check that the file holds the ``n_bytes`` of voxels its header declares after ``offset``;
    for a gzipped file, also return its decompressed bytes (None for a plain file).

    A plain file is checked by its size. A gzipped one is first bounded by deflate's largest
    expansion (no buffer is allocated for a forged size), then decompressed once, to its end,
    with a ceiling, so that a stream cut short or failing its CRC is refused here rather than
    read as silently wrong voxels (nibabel stops reading where the image ends, before the
    checksum). ISA-L (``isal``) decompresses about twice as fast as zlib; the result is the same.

    Raises :class:`UnreadableFileError` with a specific sentence.
    """
    size = path.stat().st_size
    needed = max(offset, 0) + n_bytes
    name = path.name.lower()
    if name.endswith(".nii") and size < needed:
        raise UnreadableFileError(
            f"{path.name} is truncated: its header declares {needed} bytes of image but the file holds {size}"
        )
    if not name.endswith(".gz"):
        return None
    if needed > size * DEFLATE_MAX_RATIO + (1 << 16):
        raise UnreadableFileError(
            f"{path.name} is truncated or corrupt: its header declares {needed} bytes of image, more "
            f"than a {size}-byte gzip file can hold"
        )
    limit = needed + GZIP_TRAILING_SLACK
    try:
        with igzip.open(path, "rb") as stream:
            raw = stream.read(limit + 1)  # reaching the end of the stream verifies its CRC and length
    except (OSError, EOFError, zlib.error, isal_zlib.error) as exc:
        raise UnreadableFileError(
            f"{path.name} is truncated or corrupt: its gzip stream cannot be read to the end ({_reason(exc, path)})"
        ) from exc
    if len(raw) > limit:
        raise UnreadableFileError(
            f"{path.name} decompresses to more than the {needed} bytes its header declares; "
            "it is corrupt or a compression bomb"
        )
    if len(raw) < needed:
        raise UnreadableFileError(
            f"{path.name} is truncated: its header declares {needed} bytes of image but it holds {len(raw)}"
        )
    return raw


def _reason(exc: BaseException, path: Path | None = None) -> str:
    """The first line of an exception's message, without the server's folders in it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if path is not None:
        text = text.replace(str(path), path.name).replace(str(path.parent), "")
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
