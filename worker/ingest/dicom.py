"""Reading a DICOM diffusion study: sniff, group into series, convert with dcm2niix, choose.

The vendor-specific diffusion tags (GE, Siemens CSA / mosaic / XA enhanced, Philips, Canon, UIH)
are **not** parsed here: ``dcm2niix`` (the field's reference converter, shipped as a wheel) turns
every candidate series into NIfTI + FSL ``.bval`` / ``.bvec`` + BIDS JSON, and we judge the series
by that output. pydicom is used only for what is standard: sniffing which files are DICOM,
grouping them by series, the descriptive attributes, and the plane geometry needed to find the
source b=0 images a DICOM SEG must reference (see :func:`frame_voxel_indices`).

The steps of :func:`ingest_dicom`:

1. collect the upload into a flat directory (:mod:`worker.ingest.archive`);
2. sniff DICOM files and group image files by (SeriesInstanceUID, SOP class) — a Canon export
   can hold the classic and the enhanced copy of one series under the same UID;
3. convert each group that could be a DWI (at least 7 images or frames) separately, so each
   output is known to come from one group; derived outputs (``_ADC``, ``_TRACEW``, ``_FA``, phase
   ``_ph`` ...) are ignored;
4. a group qualifies if an output has a b=0 volume (b < 50 s/mm^2) and diffusion directions that
   determine a tensor (design-matrix rank 6, i.e. at least 6 non-collinear directions); several
   qualifying series: the one with most volumes wins and a warning names the others;
5. load the chosen output with :func:`~worker.ingest.nifti.load_nifti_dwi` and locate its source
   b=0 images, one per slice.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from worker.errors import (
    ConversionError,
    GradientError,
    NoDiffusionSeriesError,
    UnsupportedInputError,
)
from worker.ingest.archive import DEFAULT_LIMITS, ArchiveLimits, collect_inputs
from worker.ingest.dwi import DWI
from worker.ingest.gradients import B0_THRESHOLD, read_bvals, read_bvecs, tensor_rank
from worker.ingest.nifti import load_nifti_dwi

MIN_DWI_FRAMES = 7
"""A tensor needs one b=0 and six directions: a group with fewer images cannot be a DWI."""

DERIVED_SUFFIXES = ("_ADC", "_TRACEW", "_FA", "_ColFA", "_TENSOR", "_EXP", "_ph", "_real", "_imaginary", "_phMag")
"""dcm2niix name suffixes of derived or non-magnitude outputs, which are never the DWI."""

GEOMETRY_TOLERANCE = 0.1
"""Largest misfit (voxels) accepted when placing a source image on the NIfTI grid."""

Layout = Literal["single-frame", "multi-frame", "mosaic"]


# ----------------------------------------------------------------------------------------------
# Sniffing and grouping
# ----------------------------------------------------------------------------------------------


GROUPING_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
    "Rows", "Columns", "InstanceNumber", "NumberOfFrames", "SeriesDescription", "ProtocolName",
    "SeriesNumber", "Modality", "Manufacturer", "ImageType",
)  # fmt: skip
"""The attributes read while sniffing (reading only these is several times faster on Philips
headers full of private sequences)."""

PIXEL_TAGS = GROUPING_TAGS + (
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SamplesPerPixel",
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "PlanarConfiguration", "PixelData",
)  # fmt: skip
"""The attributes needed to place and compare a single-frame source image."""


def read_header(path: Path, *, tags: Sequence[str] | None = GROUPING_TAGS) -> Dataset | None:
    """The DICOM header of ``path`` (no pixel data; only ``tags`` unless None), or None if the file
    is not DICOM.

    Files with the standard 128-byte preamble are read directly; files without it are accepted
    when they start with a plausible group 0002 or 0008 element (as many old exports do).
    """
    specific = list(tags) if tags is not None else None
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=specific)
    except InvalidDicomError:
        pass
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        return None
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return None
    if head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=specific)
    except Exception:  # noqa: BLE001 - pydicom raises many types on garbage; garbage is not DICOM
        return None
    return ds if "SOPClassUID" in ds or "SeriesInstanceUID" in ds else None


@dataclass(frozen=True)
class SeriesGroup:
    """The image files of one series (and SOP class) found in an upload.

    Attributes
    ----------
    series_instance_uid, sop_class_uid : the grouping key.
    description : SeriesDescription, or ProtocolName, or "series <number>".
    modality, manufacturer, series_number : as in the header (None when absent).
    files : the DICOM files, sorted by InstanceNumber.
    n_frames : total number of frames (images) over all files.
    """

    series_instance_uid: str
    sop_class_uid: str
    description: str
    modality: str | None
    manufacturer: str | None
    series_number: int | None
    files: tuple[Path, ...]
    n_frames: int

    @property
    def n_images(self) -> int:
        return self.n_frames


def _description(ds: Dataset) -> str:
    for key in ("SeriesDescription", "ProtocolName"):
        text = str(ds.get(key, "") or "").strip()
        if text:
            return text
    number = ds.get("SeriesNumber")
    return f"series {number}" if number is not None else "unnamed series"


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def group_series(files: Sequence[Path]) -> tuple[list[SeriesGroup], list[Path]]:
    """Group DICOM image files by (SeriesInstanceUID, SOP class).

    Returns the groups (largest first) and the files that are not DICOM images (other files,
    DICOMDIR, presentation states, vendor private objects), which callers may ignore.
    """
    buckets: dict[tuple[str, str], list[tuple[int, Path, Dataset]]] = {}
    ignored: list[Path] = []
    for path in files:
        ds = read_header(path)
        if ds is None or "Rows" not in ds or "Columns" not in ds or "SeriesInstanceUID" not in ds:
            ignored.append(path)
            continue
        key = (str(ds.SeriesInstanceUID), str(ds.get("SOPClassUID", "")))
        buckets.setdefault(key, []).append((_int_or_none(ds.get("InstanceNumber")) or 0, path, ds))
    groups = []
    for (uid, sop_class), members in buckets.items():
        members.sort(key=lambda m: (m[0], m[1].name))
        first = members[0][2]
        groups.append(
            SeriesGroup(
                series_instance_uid=uid,
                sop_class_uid=sop_class,
                description=_description(first),
                modality=str(first.get("Modality")) if first.get("Modality") else None,
                manufacturer=str(first.get("Manufacturer")) if first.get("Manufacturer") else None,
                series_number=_int_or_none(first.get("SeriesNumber")),
                files=tuple(m[1] for m in members),
                n_frames=sum(_int_or_none(m[2].get("NumberOfFrames")) or 1 for m in members),
            )
        )
    groups.sort(key=lambda g: (-g.n_frames, g.series_number or 0, g.description))
    return groups, ignored


def describe_series(groups: Sequence[SeriesGroup], notes: dict[str, str] | None = None) -> str:
    """One phrase naming every series, e.g. ``2 series (T2 sagittal: 15 images; Localizer: 3
    images)``. ``notes`` maps a series UID to an extra remark (``3 directions``)."""
    notes = notes or {}
    parts = []
    for g in groups:
        modality = f" {g.modality}" if g.modality and g.modality != "MR" else ""
        word = "image" if g.n_frames == 1 else "images"
        note = notes.get(g.series_instance_uid + "|" + g.sop_class_uid)
        parts.append(f"{g.description}{modality}: {g.n_frames} {word}" + (f", {note}" if note else ""))
    noun = "series"
    return f"{len(groups)} {noun} ({'; '.join(parts)})"


# ----------------------------------------------------------------------------------------------
# Conversion with dcm2niix
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertedVolume:
    """One dcm2niix output (NIfTI + gradients + JSON sidecar) of one series group."""

    group: SeriesGroup
    nifti: Path
    bval: Path | None
    bvec: Path | None
    sidecar: Path | None

    @property
    def stem(self) -> str:
        return self.nifti.name.removesuffix(".gz").removesuffix(".nii")


def dcm2niix_binary() -> str:
    """Path of the dcm2niix executable: the PyPI wheel's, else one on PATH."""
    try:
        import dcm2niix  # the wheel ships the binary; imported lazily (optional at import time)

        path = Path(dcm2niix.bin)
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("dcm2niix")
    if found is None:
        raise ConversionError("the DICOM converter dcm2niix is not installed on this server")
    return found


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def convert_group(group: SeriesGroup, *, workdir: Path, timeout_s: float) -> list[ConvertedVolume]:
    """Run dcm2niix on one series group; return its outputs (derived images excluded).

    Raises :class:`ConversionError` if dcm2niix times out; a non-zero exit with no output
    returns an empty list (the caller decides whether that matters).
    """
    src = workdir / "in"
    out = workdir / "out"
    src.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(group.files):
        _link_or_copy(path, src / f"{i:06d}.dcm")
    cmd = [dcm2niix_binary(), "-z", "y", "-b", "y", "-ba", "n", "-f", "%s_%d", "-o", str(out), str(src)]
    try:
        subprocess.run(cmd, capture_output=True, timeout=max(timeout_s, 1.0), check=False)
    except subprocess.TimeoutExpired as exc:
        raise ConversionError(
            f"converting the DICOM series '{group.description}' took longer than {timeout_s:.0f} s "
            "and was stopped"
        ) from exc
    outputs = []
    for nifti in sorted(out.glob("*.nii.gz")):
        stem = nifti.name[: -len(".nii.gz")]
        if stem.endswith(DERIVED_SUFFIXES):
            continue
        sidecar = out / f"{stem}.json"
        if sidecar.is_file() and _is_derived(sidecar):
            continue
        bval, bvec = out / f"{stem}.bval", out / f"{stem}.bvec"
        outputs.append(
            ConvertedVolume(
                group=group,
                nifti=nifti,
                bval=bval if bval.is_file() else None,
                bvec=bvec if bvec.is_file() else None,
                sidecar=sidecar if sidecar.is_file() else None,
            )
        )
    return outputs


def _is_derived(sidecar: Path) -> bool:
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    image_type = meta.get("ImageType") or []
    return isinstance(image_type, list) and "DERIVED" in [str(t).upper() for t in image_type]


@dataclass(frozen=True)
class GradientSummary:
    """What a converted output's gradient table offers: volumes, b=0 count, tensor rank."""

    n_volumes: int
    n_b0: int
    rank: int

    @property
    def qualifies(self) -> bool:
        return self.n_b0 >= 1 and self.rank >= 6


def summarise_gradients(volume: ConvertedVolume) -> GradientSummary | None:
    """Read an output's ``.bval``/``.bvec``; None when it has no (readable, consistent) table."""
    if volume.bval is None or volume.bvec is None:
        return None
    try:
        bvals = read_bvals(volume.bval)
        bvecs = read_bvecs(volume.bvec)
    except GradientError:
        return None
    if bvecs.shape[0] != bvals.size:
        return None
    dw = bvals >= B0_THRESHOLD
    norms = np.linalg.norm(bvecs[dw], axis=1)
    vectors = bvecs[dw][norms > 0.5] / norms[norms > 0.5, None]
    return GradientSummary(n_volumes=int(bvals.size), n_b0=int((~dw).sum()), rank=tensor_rank(vectors))


# ----------------------------------------------------------------------------------------------
# Choosing the diffusion series
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    volume: ConvertedVolume
    gradients: GradientSummary


def _reason(summary: GradientSummary | None) -> str | None:
    if summary is None:
        return None
    if summary.n_b0 == 0:
        return f"{summary.n_volumes} volumes without a b=0 image"
    return f"{summary.n_volumes} volumes with too few diffusion directions for a tensor"


def choose_series(
    groups: Sequence[SeriesGroup], *, workdir: Path, timeout_s: float
) -> tuple[ConvertedVolume, tuple[str, ...]]:
    """Convert the candidate groups and choose the diffusion series.

    Returns the chosen output and warning sentences (empty unless several series qualified).
    Raises :class:`NoDiffusionSeriesError` naming every series found when none qualifies, and
    :class:`ConversionError` when dcm2niix produced nothing for a group that could be a DWI.
    """
    deadline = time.monotonic() + timeout_s
    candidates: list[_Candidate] = []
    notes: dict[str, str] = {}
    failed: list[SeriesGroup] = []
    for index, group in enumerate(groups):
        if group.n_frames < MIN_DWI_FRAMES:
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConversionError(f"converting the upload took longer than {timeout_s:.0f} s and was stopped")
        outputs = convert_group(group, workdir=workdir / f"series{index:03d}", timeout_s=remaining)
        if not outputs:
            failed.append(group)
        for volume in outputs:
            summary = summarise_gradients(volume)
            if summary is not None and summary.qualifies:
                candidates.append(_Candidate(volume, summary))
            elif (reason := _reason(summary)) is not None:
                notes[group.series_instance_uid + "|" + group.sop_class_uid] = reason
    if not candidates:
        if failed and not notes:
            names = ", ".join(f"'{g.description}'" for g in failed)
            raise ConversionError(f"the DICOM converter could not read the series {names}")
        raise NoDiffusionSeriesError(
            f"the upload holds {describe_series(groups, notes)} but none is a diffusion series with "
            "a b=0 image and at least 6 diffusion directions"
        )
    candidates.sort(key=lambda c: (-c.gradients.n_volumes, c.volume.group.series_number or 0))
    chosen = candidates[0]
    return chosen.volume, _choice_warning(chosen, candidates[1:])


def _choice_warning(chosen: _Candidate, others: Sequence[_Candidate]) -> tuple[str, ...]:
    if not others:
        return ()

    def name(c: _Candidate) -> str:
        number = c.volume.group.series_number
        where = f"series {number}, " if number is not None else ""
        return f"'{c.volume.group.description}' ({where}{c.gradients.n_volumes} volumes)"

    rest = "; ".join(name(c) for c in others)
    why = "the one with most volumes" if chosen.gradients.n_volumes > others[0].gradients.n_volumes else (
        "the first of those with most volumes"
    )
    return (f"the upload holds {len(others) + 1} diffusion series: analysed {name(chosen)}, {why}, and ignored {rest}",)


# ----------------------------------------------------------------------------------------------
# Geometry: where each source image sits on the NIfTI grid
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlaneGeometry:
    """The plane of one source image or frame, in DICOM patient coordinates (LPS, mm).

    Attributes
    ----------
    position : (3,) ImagePositionPatient, centre of the first (top-left) pixel.
    orientation : (6,) ImageOrientationPatient: row direction (along a row, i.e. increasing
        column index) then column direction (down a column, increasing row index).
    spacing : (row spacing, column spacing) from PixelSpacing, mm.
    rows, columns : image size.
    """

    position: NDArray[np.float64]
    orientation: NDArray[np.float64]
    spacing: tuple[float, float]
    rows: int
    columns: int


def frame_voxel_indices(
    plane: PlaneGeometry, *, affine: NDArray[np.float64], shape: tuple[int, int, int]
) -> NDArray[np.intp]:
    """For every pixel of a source image, the NIfTI voxel it is.

    The pixel at (row r, column c) lies at ``P + c * dc * R + r * dr * C`` (LPS), which becomes RAS+
    by negating x and y, and then a voxel index through the inverse of ``affine``. The source
    plane must lie exactly on the grid (axis-aligned, integer positions within
    :data:`GEOMETRY_TOLERANCE` voxels, inside the volume) — true for dcm2niix output of a
    single-frame or enhanced series, false for a mosaic.

    Parameters
    ----------
    plane : geometry of the source image.
    affine : (4, 4) NIfTI voxel -> world RAS+ (mm).
    shape : (X, Y, Z) grid size.

    Returns
    -------
    (3, rows, columns) integer voxel indices (i, j, k) of each source pixel.

    Raises
    ------
    UnsupportedInputError : the source plane does not coincide with a slice of the grid.
    """
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    row_dir = lps_to_ras @ plane.orientation[:3]
    col_dir = lps_to_ras @ plane.orientation[3:]
    origin = lps_to_ras @ plane.position
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    step_c = inv[:3, :3] @ (row_dir * plane.spacing[1])  # one column to the right
    step_r = inv[:3, :3] @ (col_dir * plane.spacing[0])  # one row down
    start = inv[:3, :3] @ origin + inv[:3, 3]
    rows = np.arange(plane.rows)[:, None, None]
    cols = np.arange(plane.columns)[None, :, None]
    coords = start + cols * step_c + rows * step_r  # (rows, columns, 3)
    indices = np.rint(coords)
    misfit = float(np.abs(coords - indices).max())
    for step in (step_c, step_r):
        if np.count_nonzero(np.abs(step) > GEOMETRY_TOLERANCE) != 1:
            raise UnsupportedInputError(
                "the source images are not aligned with the converted volume's slices, so the "
                "segmentation cannot be placed on them"
            )
    if misfit > GEOMETRY_TOLERANCE or indices.min() < 0 or np.any(indices.max(axis=(0, 1)) >= np.asarray(shape)):
        raise UnsupportedInputError(
            "the source images do not coincide with the converted volume's slices (mosaic or "
            "resampled images), so the segmentation cannot be placed on them"
        )
    return np.moveaxis(indices.astype(np.intp), 2, 0)


def _plane_from_dataset(ds: Dataset) -> PlaneGeometry | None:
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
        return None
    return PlaneGeometry(
        position=np.asarray(ds.ImagePositionPatient, dtype=np.float64),
        orientation=np.asarray(ds.ImageOrientationPatient, dtype=np.float64),
        spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
    )


def _frame_item(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """A functional group item for ``frame`` (0-based), per-frame first, else shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    items = ([per_frame[frame]] if per_frame and frame < len(per_frame) else []) + ([shared[0]] if shared else [])
    for item in items:
        seq = item.get(keyword)
        if seq:
            return seq[0]
    return None


def frame_planes(ds: Dataset) -> list[PlaneGeometry | None]:
    """The plane geometry of every frame of a single- or multi-frame image (None where absent)."""
    n_frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return [_plane_from_dataset(ds)] * n_frames
    planes: list[PlaneGeometry | None] = []
    for f in range(n_frames):
        pos = _frame_item(ds, f, "PlanePositionSequence")
        ori = _frame_item(ds, f, "PlaneOrientationSequence")
        meas = _frame_item(ds, f, "PixelMeasuresSequence")
        if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
            planes.append(None)
            continue
        planes.append(
            PlaneGeometry(
                position=np.asarray(pos.ImagePositionPatient, dtype=np.float64),
                orientation=np.asarray(ori.ImageOrientationPatient, dtype=np.float64),
                spacing=(float(meas.PixelSpacing[0]), float(meas.PixelSpacing[1])),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
            )
        )
    return planes


# ----------------------------------------------------------------------------------------------
# The source b=0 images (what a DICOM SEG references)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFrame:
    """One source image (or one frame of a multi-frame file) lying on one slice of the grid.

    Attributes
    ----------
    path : the DICOM file (in the job's working directory).
    sop_instance_uid : its SOPInstanceUID.
    frame_number : 1-based frame number in a multi-frame file; None for a single-frame image.
    slice_axis, slice_index : the NIfTI axis the image cuts (2 for dcm2niix's 2D stacks) and the
        index along it.
    """

    path: Path
    sop_instance_uid: str
    frame_number: int | None
    slice_axis: int
    slice_index: int


@dataclass(frozen=True)
class DicomSeriesInfo:
    """The chosen series, with what a DICOM SEG over the original images needs.

    ``b0_sources`` holds one source b=0 image (or frame) per slice of the converted grid, ordered
    by slice index; it is empty when ``seg_unsupported_reason`` says why a SEG cannot be placed
    (mosaic images, undecodable pixels, source planes off the grid). Patient and study
    attributes are copied by highdicom from the source files themselves.
    """

    study_instance_uid: str
    series_instance_uid: str
    series_number: int | None
    series_description: str
    modality: str
    manufacturer: str | None
    sop_class_uid: str
    frame_of_reference_uid: str | None
    layout: Layout
    files: tuple[Path, ...]
    b0_sources: tuple[SourceFrame, ...] = ()
    seg_unsupported_reason: str | None = None

    @property
    def seg_supported(self) -> bool:
        return self.seg_unsupported_reason is None and bool(self.b0_sources)


MOSAIC_REASON = (
    "the diffusion series is stored as mosaic images (several slices packed in one image), on "
    "which a DICOM segmentation cannot be placed; the regions are given as NIfTI only"
)


def _layout(ds: Dataset, shape: tuple[int, int, int]) -> Layout:
    if (_int_or_none(ds.get("NumberOfFrames")) or 1) > 1:
        return "multi-frame"
    image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
    if "MOSAIC" in image_type or "VFRAME" in image_type:
        return "mosaic"
    if sorted((int(ds.Rows), int(ds.Columns))) != sorted(shape[:2]) and int(ds.Rows) * int(ds.Columns) > shape[0] * shape[1]:
        return "mosaic"
    return "single-frame"


@dataclass
class _SliceChoice:
    """Best source frame found so far for one slice: exact b=0 match beats correlation."""

    source: SourceFrame
    exact_volume: int | None
    score: float


@dataclass
class _Matcher:
    """Compares source frames with the converted b=0 volumes (unscaled stored values)."""

    raw: NDArray[np.generic]
    b0_volumes: NDArray[np.intp]
    affine: NDArray[np.float64]
    choices: dict[int, _SliceChoice] = field(default_factory=dict)
    slice_axis: int | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.raw.shape[0]), int(self.raw.shape[1]), int(self.raw.shape[2]))

    def offer(self, pixels: NDArray[np.generic], plane: PlaneGeometry, *, path: Path, uid: str, frame: int | None) -> None:
        idx = frame_voxel_indices(plane, affine=self.affine, shape=self.shape)
        constant = [a for a in range(3) if idx[a].min() == idx[a].max()]
        axis = constant[0]
        if self.slice_axis is None:
            self.slice_axis = axis
        if axis != self.slice_axis:
            raise UnsupportedInputError("the source images of the series are not all parallel")
        k = int(idx[axis, 0, 0])
        grid = self.raw[idx[0], idx[1], idx[2]]  # (rows, columns, N)
        exact = next((int(v) for v in self.b0_volumes if np.array_equal(grid[..., v], pixels)), None)
        mean_b0 = grid[..., self.b0_volumes].astype(np.float64).mean(axis=-1)
        score = _correlation(mean_b0, pixels.astype(np.float64))
        source = SourceFrame(path=path, sop_instance_uid=uid, frame_number=frame, slice_axis=axis, slice_index=k)
        current = self.choices.get(k)
        if current is None or _better(exact, score, current):
            self.choices[k] = _SliceChoice(source=source, exact_volume=exact, score=score)


def _better(exact: int | None, score: float, current: _SliceChoice) -> bool:
    if exact is not None and current.exact_volume is None:
        return True
    if exact is not None and current.exact_volume is not None:
        return exact < current.exact_volume
    return current.exact_volume is None and score > current.score


def _correlation(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def locate_b0_sources(
    files: Sequence[Path], *, nifti: Path, bvals: NDArray[np.float64]
) -> tuple[Layout, tuple[SourceFrame, ...], str | None]:
    """Find, for every slice of the converted grid, the source image that is its b=0 image.

    Each source image (or frame) is placed on the NIfTI grid by its plane geometry
    (:func:`frame_voxel_indices`), then its stored pixel values are compared with every b=0
    volume of dcm2niix's output at that slice: an exact match with the first b=0 volume wins;
    without any exact match (rescaled output) the image best correlated with the mean b=0 slice
    is taken. Vendor diffusion tags are never read.

    Returns the layout, the sources ordered by slice index, and the reason a SEG cannot be made
    (None when every slice has a source).
    """
    img = nib.load(str(nifti))
    assert isinstance(img, (nib.Nifti1Image, nib.Nifti2Image))  # dcm2niix writes NIfTI-1
    raw = np.asarray(img.dataobj.get_unscaled())  # type: ignore[attr-defined]
    if raw.ndim != 4:
        return "single-frame", (), "the converted series is not a 4D volume"
    matcher = _Matcher(raw=raw, b0_volumes=np.flatnonzero(bvals < B0_THRESHOLD), affine=np.asarray(img.affine))
    layout: Layout = "single-frame"
    for n, path in enumerate(files):
        try:
            # Multi-frame files need their functional groups: read them whole.
            ds = pydicom.dcmread(path, force=True, specific_tags=None if layout == "multi-frame" or n == 0 else list(PIXEL_TAGS))
            if n == 0:
                layout = _layout(ds, matcher.shape)
                if layout == "mosaic":
                    return layout, (), MOSAIC_REASON
            _offer_dataset(matcher, ds, path)
        except UnsupportedInputError as exc:
            return layout, (), exc.detail
        except (ValueError, RuntimeError, NotImplementedError, AttributeError) as exc:
            return layout, (), f"the source images cannot be decoded on this server ({type(exc).__name__})"
    n_slices = matcher.shape[matcher.slice_axis if matcher.slice_axis is not None else 2]
    if len(matcher.choices) != n_slices:
        return layout, (), (
            f"only {len(matcher.choices)} of the {n_slices} slices have a source image, so the "
            "segmentation cannot be placed on the original images"
        )
    return layout, tuple(matcher.choices[k].source for k in sorted(matcher.choices)), None


def _offer_dataset(matcher: _Matcher, ds: Dataset, path: Path) -> None:
    planes = frame_planes(ds)
    pixels = ds.pixel_array
    n_frames = len(planes)
    if n_frames == 1 and pixels.ndim == 2:
        pixels = pixels[None]
    for f, plane in enumerate(planes):
        if plane is None:
            raise UnsupportedInputError(f"a source image ({path.name}) has no plane position or orientation")
        matcher.offer(
            pixels[f],
            plane,
            path=path,
            uid=str(ds.SOPInstanceUID),
            frame=f + 1 if "NumberOfFrames" in ds and n_frames > 1 else None,
        )


def series_info(group: SeriesGroup, volume: ConvertedVolume, bvals: NDArray[np.float64]) -> DicomSeriesInfo:
    """Describe the chosen series and locate its source b=0 images."""
    first = read_header(group.files[0], tags=None)
    assert first is not None  # it was read when grouping
    layout, sources, reason = locate_b0_sources(group.files, nifti=volume.nifti, bvals=bvals)
    return DicomSeriesInfo(
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=group.series_instance_uid,
        series_number=group.series_number,
        series_description=group.description,
        modality=str(first.get("Modality", "MR")),
        manufacturer=group.manufacturer,
        sop_class_uid=group.sop_class_uid,
        frame_of_reference_uid=str(first.FrameOfReferenceUID) if "FrameOfReferenceUID" in first else None,
        layout=layout,
        files=group.files,
        b0_sources=sources,
        seg_unsupported_reason=reason,
    )


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomIngest:
    """A DICOM upload turned into a validated DWI.

    Attributes
    ----------
    dwi : the study (b-vectors in world RAS+), provenance naming the series and input digests.
    nifti, bval, bvec, sidecar : dcm2niix's output for the chosen series (sidecar may be None).
    series : the chosen series and its source b=0 images, for a DICOM SEG.
    warnings : sentences for the report (e.g. which of several diffusion series was analysed).
    """

    dwi: DWI
    nifti: Path
    bval: Path
    bvec: Path
    sidecar: Path | None
    series: DicomSeriesInfo
    warnings: tuple[str, ...] = ()


def ingest_dicom(
    paths: Sequence[Path], *, workdir: Path, timeout_s: float = 300.0, limits: ArchiveLimits = DEFAULT_LIMITS
) -> DicomIngest:
    """Read a DICOM upload (files, folders, zips, gzipped files) into a :class:`DicomIngest`.

    Parameters
    ----------
    paths : what was uploaded.
    workdir : a job-private directory; receives ``files/`` (the flat collected inputs) and
        ``dcm2niix/`` (one conversion per candidate series), both emptied first. The source files referenced by
        ``series`` live here, so keep it until the DICOM SEG is written.
    timeout_s : total time allowed for dcm2niix over all series (s).
    limits : bounds on unpacking (see :class:`~worker.ingest.archive.ArchiveLimits`).

    Raises
    ------
    ArchiveError, UnreadableFileError : unsafe or corrupt archives and files.
    UnsupportedInputError : no DICOM image in the upload.
    NoDiffusionSeriesError : no series with a b=0 image and at least 6 directions.
    ConversionError : dcm2niix failed or timed out.
    GradientError, ImageError : the chosen series' data does not validate as a DWI.
    """
    workdir = Path(workdir)
    for ours in ("files", "dcm2niix"):  # a redelivered job starts clean
        shutil.rmtree(workdir / ours, ignore_errors=True)
    collected = collect_inputs(paths, workdir=workdir / "files", limits=limits)
    groups, ignored = group_series(collected.files)
    if not groups:
        raise UnsupportedInputError(
            f"none of the {len(ignored)} uploaded files is a DICOM image; upload the DICOM files "
            "of the diffusion series (or a NIfTI with its .bval and .bvec)"
        )
    volume, warnings = choose_series(groups, workdir=workdir / "dcm2niix", timeout_s=timeout_s)
    assert volume.bval is not None and volume.bvec is not None  # qualified series have both
    group = volume.group
    dwi = load_nifti_dwi(
        volume.nifti,
        bval=volume.bval,
        bvec=volume.bvec,
        source_format="dicom",
        digests=collected.digests,
        series_description=group.description,
        manufacturer=group.manufacturer,
        series_instance_uid=group.series_instance_uid,
        warnings=warnings,
    )
    series = series_info(group, volume, read_bvals(volume.bval))
    return DicomIngest(
        dwi=dwi,
        nifti=volume.nifti,
        bval=volume.bval,
        bvec=volume.bvec,
        sidecar=volume.sidecar,
        series=series,
        warnings=warnings,
    )
