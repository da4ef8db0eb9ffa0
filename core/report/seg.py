"""Writing the eight cord regions as a DICOM Segmentation over the original b=0 images.

The label map lives on dcm2niix's NIfTI grid; a PACS shows a SEG over the *source* images, so
every SEG frame must be in a source image's own rows and columns. Each source b=0 image (or
frame) is placed on the grid with :func:`core.ingest.dicom_geometry.frame_voxel_indices` (its
ImagePositionPatient / ImageOrientationPatient in LPS, mapped to RAS+ and through the inverse
affine), which gives, for every source pixel, the voxel it is — whatever flips or transposition
dcm2niix applied. The frame is then ``labels[i, j, k]`` gathered at those indices; nothing is
assumed about axis order.

Source layouts:

- single-frame series (GE, Philips, Canon classic): one source image per slice, the b=0 ones;
- enhanced multi-frame (Canon enhanced, Siemens XA; all volumes in one file, one file per
  volume, or one frame per file): the SEG holds one frame per slice of the grid, placed by the
  b=0 source frame's own position (highdicom matches it to the source frames at that position),
  so frames of other volumes at the same position never make duplicate planes;
- mosaics (Siemens ``MOSAIC``, UIH ``VFRAME``) pack several slices in one image; their frame
  geometry does not describe the tiles, so **no SEG is written**: :func:`write_seg` raises
  :class:`~core.errors.UnsupportedInputError` with the reason from
  :attr:`DicomSeriesInfo.seg_unsupported_reason`; the pipeline should check
  ``series.seg_supported`` first and report the reason as a warning.

Segments are BINARY (widest PACS support), numbered by the public label codes 1-8, plus segment
9, the whole spinal cord (the union of 1-8), which the measurement report's whole-cord group
references. Patient and study attributes come from the source headers, completed with empty
type-2 values where a de-identified source lacks them (:mod:`core.report.dicom_source`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from core.errors import UnsupportedInputError
from core.ingest.dicom import DicomSeriesInfo, SourceFrame
from core.ingest.dicom_geometry import PlaneGeometry, frame_planes, frame_voxel_indices
from core.labels import LATERALITY_SNOMED, REGIONS, Region
from core.report.dicom_source import (
    ALGORITHM_NAME,
    ANATOMICAL_STRUCTURE,
    CORD_SEGMENT_NUMBER,
    CORD_TRACKING_ID,
    SEG_SERIES_NUMBER_OFFSET,
    SPINAL_CORD,
    complete_for_derivation,
    new_series,
    source_header,
)

CORD_COLOUR = (255, 255, 255)


def segment_description(region: Region, *, software_version: str) -> hd.seg.SegmentDescription:
    """The SegmentDescription of one region: SNOMED category/type, laterality, colour, algorithm."""
    description = hd.seg.SegmentDescription(
        segment_number=region.code,
        segment_label=region.name,
        segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=hd.sr.CodedConcept(region.snomed[0], "SCT", region.snomed[1]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME,
            family=codes.cid7162.ArtificialIntelligence,
            version=software_version,
        ),
        tracking_id=region.key,
        tracking_uid=hd.UID(),
        anatomic_regions=[SPINAL_CORD],
        display_color=hd.color.CIELabColor.from_rgb(*region.colour),
    )
    code, meaning = LATERALITY_SNOMED[region.side]
    property_type = description.SegmentedPropertyTypeCodeSequence[0]
    property_type.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept(code, "SCT", meaning)]
    return description


def cord_segment_description(*, software_version: str) -> hd.seg.SegmentDescription:
    """The SegmentDescription of the whole spinal cord (segment 9, the union of 1-8)."""
    return hd.seg.SegmentDescription(
        segment_number=CORD_SEGMENT_NUMBER,
        segment_label="spinal cord",
        segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=SPINAL_CORD,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME,
            family=codes.cid7162.ArtificialIntelligence,
            version=software_version,
        ),
        tracking_id=CORD_TRACKING_ID,
        tracking_uid=hd.UID(),
        display_color=hd.color.CIELabColor.from_rgb(*CORD_COLOUR),
    )


def _frame_labels(
    labels: NDArray[np.uint8], plane: PlaneGeometry | None, affine: NDArray[np.float64]
) -> NDArray[np.uint8]:
    """The label map resampled (by index, exactly) onto one source frame: (rows, columns)."""
    if plane is None:
        raise UnsupportedInputError("a source image has no plane position, so the segmentation cannot be placed")
    shape = (int(labels.shape[0]), int(labels.shape[1]), int(labels.shape[2]))
    idx = frame_voxel_indices(plane, affine=affine, shape=shape)
    return labels[idx[0], idx[1], idx[2]]


def _single_frame_sources(
    sources: tuple[SourceFrame, ...], labels: NDArray[np.uint8], affine: NDArray[np.float64]
) -> tuple[list[Dataset], NDArray[np.uint8]]:
    datasets: list[Dataset] = [source_header(s.path) for s in sources]
    frames = [_frame_labels(labels, frame_planes(ds)[0], affine) for ds in datasets]
    _share_orientation(datasets)
    return datasets, np.stack(frames)


def _share_orientation(datasets: list[Dataset], *, tolerance: float = 1e-4) -> None:
    """Give every (in-memory) source header the first one's ImageOrientationPatient when they
    agree within ``tolerance``: GE writes values differing by ~1e-8 between slices, which
    highdicom (exact comparison) would otherwise reject. The files are not modified."""
    first = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    for ds in datasets[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), first, atol=tolerance):
            raise UnsupportedInputError(
                "the source b=0 images are not parallel, so one DICOM segmentation cannot cover them"
            )
        ds.ImageOrientationPatient = datasets[0].ImageOrientationPatient


@dataclass(frozen=True)
class _Placed:
    """SEG frames placed by position: one per slice, with the geometry highdicom needs."""

    source: Dataset
    others: list[Dataset]
    pixel_array: NDArray[np.uint8]
    plane_positions: list[hd.PlanePositionSequence]
    plane_orientation: hd.PlaneOrientationSequence
    pixel_measures: hd.PixelMeasuresSequence


def _multi_frame_sources(
    sources: tuple[SourceFrame, ...], labels: NDArray[np.uint8], affine: NDArray[np.float64]
) -> _Placed:
    """One SEG frame per source b=0 frame, placed by that frame's position. highdicom takes one
    multi-frame source image: the first file is it, the others (one file per volume or per
    frame) are added to the references afterwards."""
    headers: dict[Path, Dataset] = {}
    for source in sources:
        if source.path not in headers:
            headers[source.path] = complete_for_derivation(pydicom.dcmread(source.path, stop_before_pixels=True, force=True))
            _share_frame_geometry(headers[source.path])
    frames, positions, planes = [], [], []
    for source in sources:
        plane = frame_planes(headers[source.path])[(source.frame_number or 1) - 1]
        frames.append(_frame_labels(labels, plane, affine))
        assert plane is not None  # _frame_labels refused a frame without one
        planes.append(plane)
        positions.append(hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, [float(v) for v in plane.position]))
    first = planes[0]
    if any(not np.allclose(p.orientation, first.orientation, atol=1e-4) for p in planes):
        raise UnsupportedInputError("the source b=0 images are not parallel, so one DICOM segmentation cannot cover them")
    slice_spacing = float(np.linalg.norm(planes[1].position - first.position)) if len(planes) > 1 else None
    thickness = _slice_thickness(headers[sources[0].path]) or slice_spacing or 1.0
    ordered = list(headers.values())
    return _Placed(
        source=ordered[0],
        others=ordered[1:],
        pixel_array=np.stack(frames),
        plane_positions=positions,
        plane_orientation=hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, [float(v) for v in first.orientation]),
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=[float(v) for v in first.spacing], slice_thickness=thickness),
    )


def _slice_thickness(ds: Dataset) -> float | None:
    """SliceThickness (mm) of a multi-frame image: its shared pixel measures, else its first
    frame's, else the top-level attribute."""
    for groups in (ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")):
        if groups and "PixelMeasuresSequence" in groups[0] and "SliceThickness" in groups[0].PixelMeasuresSequence[0]:
            return float(groups[0].PixelMeasuresSequence[0].SliceThickness)
    return float(ds.SliceThickness) if ds.get("SliceThickness") else None


def _reference_others(seg: hd.seg.Segmentation, others: list[Dataset]) -> None:
    """List the source files highdicom was not given (one per volume or per frame) among the
    SEG's referenced instances of the source series."""
    if not others:
        return
    instances = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    known = {str(item.ReferencedSOPInstanceUID) for item in instances}
    for ds in others:
        if str(ds.SOPInstanceUID) not in known:
            item = Dataset()
            item.ReferencedSOPClassUID = ds.SOPClassUID
            item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            instances.append(item)


def _share_frame_geometry(ds: Dataset) -> None:
    """Copy a per-frame PixelMeasures / PlaneOrientation into the shared functional groups of the
    in-memory header when every frame has the same one (Siemens XA writes them per frame, and
    highdicom reads them from the shared groups). The file is not modified."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.SharedFunctionalGroupsSequence[0]
    for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        if keyword in shared or not per_frame or keyword not in per_frame[0]:
            continue
        first = per_frame[0][keyword].value
        if any(not _same_item(item[keyword].value[0], first[0]) for item in per_frame if keyword in item):
            raise UnsupportedInputError(
                "the frames of the multi-frame source differ in pixel size or orientation, so one "
                "DICOM segmentation cannot cover them"
            )
        setattr(shared, keyword, first)


def _same_item(a: Dataset, b: Dataset, *, tolerance: float = 1e-4) -> bool:
    """Whether two pixel-measures / plane-orientation items agree numerically."""
    for keyword in ("PixelSpacing", "SliceThickness", "ImageOrientationPatient"):
        if (keyword in a) != (keyword in b):
            return False
        if keyword in a and not np.allclose(
            np.asarray(a[keyword].value, dtype=np.float64), np.asarray(b[keyword].value, dtype=np.float64), atol=tolerance
        ):
            return False
    return True


def _check_labels(labels: NDArray[np.generic]) -> NDArray[np.uint8]:
    array = np.asarray(labels)
    if array.ndim != 3:
        raise ValueError(f"labels must be a 3D (X, Y, Z) label map, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must hold integer codes, got dtype {array.dtype}")
    valid = {0} | {r.code for r in REGIONS}
    found = set(np.unique(array).tolist())
    if not found <= valid:
        raise ValueError(f"labels hold codes {sorted(found - valid)} outside the label table 0-8")
    return array.astype(np.uint8, copy=False)


def write_seg(
    labels: NDArray[np.generic],
    *,
    affine: NDArray[np.float64],
    series: DicomSeriesInfo,
    out_path: Path,
    software_version: str,
) -> hd.seg.Segmentation:
    """Write the label map as a DICOM Segmentation referencing the source b=0 images; returns it.

    Parameters
    ----------
    labels : (X, Y, Z) integer label map, codes 0-8 (:mod:`core.labels`), on the grid of the
        converted series (the dcm2niix NIfTI, ``DicomIngest.nifti``).
    affine : (4, 4) voxel index -> world RAS+ (mm) of that grid.
    series : the chosen series (``DicomIngest.series``); its source files must still exist.
    out_path : where to write the SEG (``.dcm``).
    software_version : scsnet / model version, recorded as the algorithm version.

    Raises
    ------
    UnsupportedInputError : the series cannot carry a SEG (mosaic, sources off the grid, b=0
        frames over several multi-frame files); the reason is a sentence for the report.
    ValueError : ``labels`` is not a 3D integer map of known codes (a programming error).
    """
    array = _check_labels(labels)
    if not series.seg_supported:
        raise UnsupportedInputError(series.seg_unsupported_reason or "the series has no source b=0 images")
    affine = np.asarray(affine, dtype=np.float64)
    descriptions = [segment_description(r, software_version=software_version) for r in REGIONS]
    descriptions.append(cord_segment_description(software_version=software_version))
    common = dict(
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        device_serial_number="none",
        content_label="CORD_REGIONS",
        content_description="Eight cervical spinal cord regions and the whole cord (SCS-Net)",
        **new_series(series, offset=SEG_SERIES_NUMBER_OFFSET, kind="Cord regions", software_version=software_version),
    )
    if series.layout == "multi-frame":
        placed = _multi_frame_sources(series.b0_sources, array, affine)
        seg = hd.seg.Segmentation(
            source_images=[placed.source],
            pixel_array=_segments(placed.pixel_array),
            plane_positions=placed.plane_positions,
            plane_orientation=placed.plane_orientation,
            pixel_measures=placed.pixel_measures,
            **common,  # type: ignore[arg-type]
        )
        _reference_others(seg, placed.others)
    else:
        source_images, pixel_array = _single_frame_sources(series.b0_sources, array, affine)
        seg = hd.seg.Segmentation(source_images=source_images, pixel_array=_segments(pixel_array), **common)  # type: ignore[arg-type]
    seg.save_as(Path(out_path))
    return seg


def _segments(frames: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """(frames, rows, columns, 9) one boolean plane per segment: the regions 1-8, then the cord."""
    planes = [frames == region.code for region in REGIONS] + [frames > 0]
    return np.stack(planes, axis=-1)
