"""Reading a DICOM diffusion study: sniff, group into series, convert with dcm2niix, choose.

The vendor-specific diffusion tags (GE, Siemens CSA / mosaic / XA enhanced, Philips, Canon, UIH)
are **not** parsed here: ``dcm2niix`` (the field's reference converter, shipped as a wheel) turns
every candidate series into NIfTI + FSL ``.bval`` / ``.bvec`` + BIDS JSON, and we judge the series
by that output. pydicom is used only for what is standard: sniffing which files are DICOM,
grouping them by series, the descriptive attributes, and the plane geometry needed to find the
source b=0 images a DICOM SEG must reference (see
:func:`~core.ingest.dicom_geometry.frame_voxel_indices`).

The steps of :func:`ingest_dicom`:

1. collect the upload into a flat directory (:mod:`core.ingest.archive`);
2. sniff DICOM files and group image files by (SeriesInstanceUID, SOP class) — a Canon export
   can hold the classic and the enhanced copy of one series under the same UID
   (:mod:`core.ingest.dicom_series`);
3. convert each group that could be a DWI (at least 7 images or frames) separately, so each
   output is known to come from one group; derived outputs (``_ADC``, ``_TRACEW``, ``_FA``, phase
   ``_ph`` ...) are ignored;
4. a group qualifies if an output has a b=0 volume (b < 50 s/mm^2) and diffusion directions that
   determine a tensor (design-matrix rank 6, i.e. at least 6 non-collinear directions); several
   qualifying series: the one with most volumes wins and a warning names the others
   (:mod:`core.ingest.dicom_convert`);
5. load the chosen output with :func:`~core.ingest.nifti.load_nifti_dwi` and locate its source
   b=0 images, one per slice (here, placing each with :mod:`core.ingest.dicom_geometry`).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from core.errors import UnsupportedInputError
from core.ingest.archive import collect_inputs
from core.ingest.dicom_checks import check_body_part, check_one_study, check_series_geometry
from core.ingest.dicom_convert import ConvertedVolume, choose_series
from core.ingest.dicom_geometry import PlaneGeometry, frame_planes, frame_voxel_indices
from core.ingest.dicom_series import (
    PIXEL_TAGS,
    SeriesGroup,
    group_series,
    int_or_none,
    read_header,
)
from core.ingest.dwi import DWI
from core.ingest.gradients import B0_THRESHOLD, read_bvals
from core.ingest.nifti import load_nifti_dwi
from core.ingest.rules import DEFAULT_LIMITS, UploadLimits

Layout = Literal["single-frame", "multi-frame", "mosaic"]


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
    accession_number: str | None
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
    # enhanced images keep their geometry in functional groups, even with one frame per file
    if (int_or_none(ds.get("NumberOfFrames")) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
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
            # Enhanced (multi-frame) files, even of one frame each, keep their geometry in their
            # functional groups: read them whole.
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
        accession_number=str(first.get("AccessionNumber") or "") or None,
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
    paths: Sequence[Path], *, workdir: Path, timeout_s: float = 300.0, limits: UploadLimits = DEFAULT_LIMITS,
    refuse_head: bool = False,
) -> DicomIngest:
    """Read a DICOM upload (files, folders, zips, gzipped files) into a :class:`DicomIngest`.

    Parameters
    ----------
    paths : what was uploaded.
    workdir : a job-private directory; receives ``files/`` (the flat collected inputs) and
        ``dcm2niix/`` (one conversion per candidate series), both emptied first. The source files referenced by
        ``series`` live here, so keep it until the DICOM SEG is written.
    timeout_s : total time allowed for dcm2niix over all series (s).
    limits : bounds on unpacking (see :class:`~core.ingest.rules.UploadLimits`).
    refuse_head : refuse a series of the head as soon as it is chosen, before its geometry is
        checked and its b=0 source images located (both read every file): the analysis does
        (:func:`core.pipeline.analyze`); converting a study does not.

    Raises
    ------
    ArchiveError, UnreadableFileError : unsafe or corrupt archives and files.
    UnsupportedInputError : no DICOM image in the upload.
    MixedStudiesError : images of more than one patient or study.
    NoDiffusionSeriesError : no series with a b=0 image and at least 6 directions.
    NoSpinalCordError : the chosen series is of the head (``refuse_head``;
        :func:`~core.ingest.dicom_checks.check_body_part`).
    ConversionError : dcm2niix failed or timed out.
    GradientError, ImageError : the chosen series' data does not validate as a DWI, or its
        geometry (pixel spacing, slice positions) is missing or impossible.
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
    check_one_study(groups)
    volume, warnings = choose_series(groups, workdir=workdir / "dcm2niix", timeout_s=timeout_s)
    if refuse_head:
        check_body_part(volume.group.body_part, volume.group.description)
    check_series_geometry(volume.group)
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
