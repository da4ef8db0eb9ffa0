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
- enhanced multi-frame (Canon enhanced, Siemens XA): the file holding the b=0 frames is the
  source; frames of other volumes stay empty (and are omitted), so the SEG references exactly
  the b=0 frames;
- mosaics (Siemens ``MOSAIC``, UIH ``VFRAME``) pack several slices in one image; their frame
  geometry does not describe the tiles, so **no SEG is written**: :func:`write_seg` raises
  :class:`~core.errors.UnsupportedInputError` with the reason from
  :attr:`DicomSeriesInfo.seg_unsupported_reason`; the pipeline should check
  ``series.seg_supported`` first and report the reason as a warning.

Segments are BINARY (widest PACS support), numbered by the public label codes 1-8.
"""

from __future__ import annotations

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

ALGORITHM_NAME = "SCS-Net"
ANATOMICAL_STRUCTURE = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
SPINAL_CORD = hd.sr.CodedConcept("2748008", "SCT", "Spinal cord")
SEG_SERIES_NUMBER_OFFSET = 1000
"""The SEG's series number is the source's plus this, so it sorts next to it in a PACS."""


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
    datasets: list[Dataset] = [pydicom.dcmread(s.path, stop_before_pixels=True) for s in sources]
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


def _multi_frame_source(
    sources: tuple[SourceFrame, ...], labels: NDArray[np.uint8], affine: NDArray[np.float64]
) -> tuple[list[Dataset], NDArray[np.uint8]]:
    paths = {s.path for s in sources}
    if len(paths) != 1:
        raise UnsupportedInputError(
            "the b=0 images are spread over several multi-frame files, which one DICOM segmentation "
            "cannot reference"
        )
    ds = pydicom.dcmread(next(iter(paths)), stop_before_pixels=True)
    _share_frame_geometry(ds)
    planes = frame_planes(ds)
    pixel_array = np.zeros((len(planes), int(ds.Rows), int(ds.Columns)), dtype=np.uint8)
    for source in sources:
        assert source.frame_number is not None
        f = source.frame_number - 1
        pixel_array[f] = _frame_labels(labels, planes[f], affine)
    return [ds], pixel_array


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
) -> None:
    """Write the label map as a DICOM Segmentation referencing the source b=0 images.

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
    if series.layout == "multi-frame":
        source_images, pixel_array = _multi_frame_source(series.b0_sources, array, affine)
    else:
        source_images, pixel_array = _single_frame_sources(series.b0_sources, array, affine)
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(r, software_version=software_version) for r in REGIONS],
        series_instance_uid=hd.UID(),
        series_number=(series.series_number or 0) + SEG_SERIES_NUMBER_OFFSET,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="scsnet",
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=software_version,
        device_serial_number="none",
        content_label="CORD_REGIONS",
        content_description="Eight cervical spinal cord regions (SCS-Net)",
        series_description=f"Cord regions (SCS-Net) on {series.series_description}"[:64],
    )
    seg.save_as(Path(out_path))
