"""The upload rules, written once: what a study's files may be, how large, how they unpack and
how a gradient table reads.

Used by the gateway's early checks (``app.intake``, which sees only headers and zip
directories, so it can refuse at once) and by the ingest that reads the study
(:mod:`core.ingest.archive`, :mod:`core.ingest.gradients`), so a rule can never differ between
the two. The limits come from configuration (``SCSNET_MAX_ZIP_ENTRIES``,
``SCSNET_MAX_ZIP_EXPANDED_BYTES``; :class:`core.settings.IngestSettings`) and are passed in.

Pure standard library: the slim gateway imports this module without numpy.
"""

from __future__ import annotations

import math
import re
import stat
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.errors import ArchiveError, GradientError, ImageError

GIB = 1024**3
MAX_GRADIENT_FILE_BYTES = 1 << 20
"""A gradient table of thousands of volumes is a few tens of kB; anything above 1 MiB is not one."""

MIN_VOXEL_MM = 0.05
"""Smallest voxel edge (mm) accepted. Clinical cord DTI is 0.5-2 mm in-plane, 2-7 mm thick;
microscopy-scale spacing (or a header in metres read as mm) is not a diffusion study of a cord."""

MAX_VOXEL_MM = 20.0
"""Largest voxel edge (mm) accepted: a 20 mm voxel is already twice a cord's width."""

MAX_RESAMPLED_SLICE_PX = 4096
"""Most pixels along either axis of a slice resampled to the model's spacing (a 4096 x 4096
float32 slice is 64 MiB, and the network sees batches of them); checked before allocating."""

SKIPPED_ZIP_PREFIXES = ("__MACOSX/",)
"""Zip entries under these folders (and ``._*`` files) are macOS resource forks, never images."""


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on what one upload may hold and expand to.

    Attributes
    ----------
    max_files : most plain files, counting every zip entry (``SCSNET_MAX_ZIP_ENTRIES``).
    max_total_bytes : most bytes the upload may expand to once unpacked
        (``SCSNET_MAX_ZIP_EXPANDED_BYTES``).
    max_ratio : highest compression ratio (uncompressed / compressed) accepted for an entry
        larger than ``ratio_floor_bytes``; DICOM compresses 2-20x, zip bombs 1000x and more.
    ratio_floor_bytes : entries smaller than this skip the ratio check (tiny files can compress
        very well without being dangerous).
    """

    max_files: int = 20_000
    max_total_bytes: int = 4 * GIB
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 1 << 20


DEFAULT_LIMITS = UploadLimits()


def zip_file_entries(infos: Sequence[zipfile.ZipInfo]) -> list[zipfile.ZipInfo]:
    """The entries of a zip directory that are files (folders left out)."""
    return [info for info in infos if not info.is_dir()]


def is_skipped_entry(name: str) -> bool:
    """Whether a zip entry is a macOS resource fork, never an image."""
    name = name.replace("\\", "/")
    return name.startswith(SKIPPED_ZIP_PREFIXES) or PurePosixPath(name).name.startswith("._")


def check_zip_directory(infos: Sequence[zipfile.ZipInfo], *, label: str, limits: UploadLimits) -> None:
    """Refuse a zip whose central directory shows no files, too many files, too many bytes once
    unpacked, or an unsafe entry (:func:`check_zip_entry`). Reads only the directory.

    Raises
    ------
    ArchiveError : with a sentence naming ``label`` and what is wrong.
    """
    files = zip_file_entries(infos)
    if not files:
        raise ArchiveError(f"{label} is an empty zip archive: it contains no files")
    if len(files) > limits.max_files:
        raise ArchiveError(
            f"{label} holds {len(files)} files, more than the {limits.max_files} accepted; "
            "upload only the diffusion series"
        )
    declared = sum(info.file_size for info in files)
    if declared > limits.max_total_bytes:
        raise ArchiveError(
            f"{label} expands to {declared / GIB:.1f} GiB ({declared} bytes), more than the "
            f"{limits.max_total_bytes / GIB:g} GiB ({limits.max_total_bytes} bytes) accepted; "
            "upload only the diffusion series"
        )
    for info in files:
        check_zip_entry(info, label=label, limits=limits)


def check_zip_entry(info: zipfile.ZipInfo, *, label: str, limits: UploadLimits) -> None:
    """Refuse one unsafe zip entry: a path leaving the archive, a symbolic link, encryption, or
    a compression ratio typical of a zip bomb."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in PurePosixPath(name).parts:
        raise ArchiveError(
            f"{label} contains an entry with an unsafe path ({info.filename!r}) pointing outside "
            "the archive; it was refused"
        )
    if info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16):
        raise ArchiveError(f"{label} contains a symbolic link ({info.filename!r}); archives with links are refused")
    if info.flag_bits & 0x1:
        raise ArchiveError(f"{label} is password-protected; upload it without a password")
    if info.file_size > limits.ratio_floor_bytes:
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_ratio:
            raise ArchiveError(
                f"{label} entry {info.filename!r} expands {ratio:.0f} times (more than "
                f"{limits.max_ratio:g}), which is typical of a zip bomb; it was refused"
            )


def open_zip(path: Path, *, label: str) -> zipfile.ZipFile:
    """The zip at ``path``, opened (its central directory read, nothing decompressed)."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ArchiveError(f"{label} is not a readable zip archive (it is corrupt or truncated)") from exc


def open_zip_directory(path: Path, *, label: str) -> list[zipfile.ZipInfo]:
    """The central directory of the zip at ``path`` (nothing is decompressed)."""
    with open_zip(path, label=label) as archive:
        return archive.infolist()


# --- gradient tables --------------------------------------------------------------------------


def read_table(path: Path, *, what: str, name: str | None = None) -> list[list[float]]:
    """Rows of numbers of a gradient file (``what``: "b-value" or "b-vector"; ``name``: how
    messages call the file, its file name by default).

    Numbers are separated by spaces, tabs or commas; blank lines and lines starting with ``#``
    are skipped. Every row must have the same length and every number must be finite.

    Raises
    ------
    GradientError : too large, not text, empty, ragged, not numbers, NaN or infinite.
    """
    name = name or Path(path).name
    try:
        size = Path(path).stat().st_size
        if size > MAX_GRADIENT_FILE_BYTES:
            raise GradientError(f"the {what} file {name} is {size} bytes, far too large for a gradient table")
        text = Path(path).read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise GradientError(f"the {what} file {name} cannot be read as text") from exc
    return parse_table(text, what=what, name=name)


def parse_table(text: str, *, what: str, name: str) -> list[list[float]]:
    """The rows of numbers in ``text`` (see :func:`read_table`); ``name`` is used in messages."""
    rows = [line.replace(",", " ").split() for line in text.splitlines()]
    rows = [r for r in rows if r and not r[0].startswith("#")]
    if not rows:
        raise GradientError(f"the {what} file {name} is empty")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise GradientError(f"the {what} file {name} has rows of different lengths ({sorted(widths)})")
    try:
        values = [[float(v) for v in r] for r in rows]
    except ValueError as exc:
        raise GradientError(f"the {what} file {name} contains text that is not a number") from exc
    if not all(math.isfinite(v) for r in values for v in r):
        raise GradientError(f"the {what} file {name} contains NaN or infinite values")
    return values


def bvalues_of(rows: list[list[float]], *, name: str) -> list[float]:
    """The b-values (s/mm^2) of a table that is one row or one column; none negative."""
    if len(rows) != 1 and len(rows[0]) != 1:
        raise GradientError(
            f"the b-value file {name} should be one row or one column, "
            f"but has {len(rows)} rows of {len(rows[0])} values"
        )
    bvals = [v for row in rows for v in row]
    if any(b < 0 for b in bvals):
        raise GradientError(f"the b-value file {name} contains negative b-values")
    return bvals


def bvectors_of(rows: list[list[float]], *, name: str) -> list[list[float]]:
    """The b-vectors, N rows of (x, y, z), of a table in 3 x N (FSL) or N x 3 layout; a 3 x 3
    table is read as FSL's three rows."""
    n_rows, n_cols = len(rows), len(rows[0])
    if n_rows == 3:
        return [list(col) for col in zip(*rows)]
    if n_cols == 3:
        return [list(r) for r in rows]
    raise GradientError(
        f"the b-vector file {name} should have 3 rows (x, y, z) or 3 columns, but is {n_rows} x {n_cols}"
    )


def check_gradient_counts(*, n_bvals: int, n_bvecs: int, n_volumes: int) -> None:
    """One b-value and one b-vector per volume."""
    if n_bvals != n_volumes:
        raise GradientError(f"the b-value file has {n_bvals} entries but the image has {n_volumes} volumes")
    if n_bvecs != n_volumes:
        raise GradientError(f"the b-vector file has {n_bvecs} entries but the image has {n_volumes} volumes")


# --- image geometry ---------------------------------------------------------------------------


def check_voxel_size(sizes_mm: Sequence[float], *, field: str, label: str) -> None:
    """Refuse voxel edges outside [:data:`MIN_VOXEL_MM`, :data:`MAX_VOXEL_MM`] mm (zero,
    negative, NaN included); ``field`` names where they were read (``pixdim``, ``PixelSpacing``,
    ``SliceThickness``...), ``label`` the file or series.

    Raises
    ------
    ImageError : a sentence naming ``label``, ``field`` and the values.
    """
    values = [float(v) for v in sizes_mm]
    if not values or not all(math.isfinite(v) and MIN_VOXEL_MM <= v <= MAX_VOXEL_MM for v in values):
        shown = ", ".join(f"{v:g}" for v in values) or "none"
        what = "a zero voxel size" if 0.0 in values else "voxel size(s)"
        raise ImageError(
            f"{label} has {what} ({shown} mm) in {field}, outside the {MIN_VOXEL_MM:g}-"
            f"{MAX_VOXEL_MM:g} mm a diffusion study of the cord can have; the image geometry is missing or wrong"
        )


def check_resampled_slice(shape: Sequence[int], *, label: str = "the image") -> None:
    """Refuse a slice that would exceed :data:`MAX_RESAMPLED_SLICE_PX` along an axis once
    resampled to the model's spacing (called before the resampled array is allocated)."""
    if max(int(s) for s in shape) > MAX_RESAMPLED_SLICE_PX:
        raise ImageError(
            f"{label} would be resampled to slices of {' x '.join(str(int(s)) for s in shape)} pixels, more "
            f"than the {MAX_RESAMPLED_SLICE_PX} accepted along an axis: the field of view or voxel size is implausible"
        )
