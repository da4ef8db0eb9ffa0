"""Checks on a DICOM upload before its diffusion series is analysed: one patient and one study
per job, a series of the spine, not the head, and a series whose geometry can be trusted.

- :func:`check_one_study`: every image of the upload belongs to one PatientID and one
  StudyInstanceUID (a de-identified upload without them is accepted); otherwise
  :class:`~core.errors.MixedStudiesError` naming the counts and the series, never a name or ID.
- :func:`check_body_part`: the chosen series' header says it is of the head (BodyPartExamined
  HEAD, BRAIN or SKULL, or a series description naming the brain or head) ->
  :class:`~core.errors.NoSpinalCordError`, before its slices are checked and its b=0 source
  images located (each a read of every file);
- :func:`check_series_geometry`: every image of the chosen series has a PixelSpacing (classic)
  or a Pixel Measures functional group (enhanced) within the bounds of
  :func:`core.ingest.rules.check_voxel_size`, a SliceThickness / SpacingBetweenSlices within
  them where present, and the images of a non-mosaic series do not all share one
  ImagePositionPatient (slices that cannot be placed). dcm2niix would otherwise write a 1 mm
  default or a stack of coincident slices.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from core.errors import ImageError, MixedStudiesError, NoSpinalCordError
from core.ingest.dicom_geometry import frame_planes
from core.ingest.dicom_series import SeriesGroup, read_header
from core.ingest.rules import check_voxel_size

CLASSIC_GEOMETRY_TAGS = (
    "SOPClassUID", "Rows", "Columns", "NumberOfFrames", "ImageType", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
)  # fmt: skip
"""The geometry of a single-frame image (all before the private groups: a quick read; the SOP
class as :func:`~core.ingest.dicom_series.read_header` wants it of a file without preamble)."""

GEOMETRY_TAGS = CLASSIC_GEOMETRY_TAGS + ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
"""The geometry of a multi-frame image, which keeps it in its functional groups."""

SAME_POSITION_MM = 1e-3
"""Image positions closer than this are one position."""

HEAD_BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL"})
"""BodyPartExamined values of a head study."""

HEAD_DESCRIPTION = re.compile(r"\b(brain|head)\b", re.IGNORECASE)
"""A series description naming the brain or head (a word, so "forehead" or "headrest" do not count)."""


def check_one_study(groups: Sequence[SeriesGroup]) -> None:
    """Refuse an upload whose images belong to more than one patient or study.

    Raises
    ------
    MixedStudiesError : naming how many patients and studies, and the series found.
    """
    patients = frozenset().union(*(g.patient_ids for g in groups))
    studies = frozenset().union(*(g.study_instance_uids for g in groups))
    if len(patients) <= 1 and len(studies) <= 1:
        return
    shown = "; ".join(f"{g.description!r}" for g in groups[:4]) + ("; ..." if len(groups) > 4 else "")
    raise MixedStudiesError(
        f"the upload holds images of {len(patients)} patient(s) and {len(studies)} studies "
        f"({len(groups)} series: {shown}); upload one study of one patient per job"
    )


def check_body_part(body_part: str | None, series_description: str | None) -> None:
    """Refuse a DICOM study whose header says it is of the head or brain.

    Raises
    ------
    NoSpinalCordError : naming the attribute that says so.
    """
    if body_part is not None and body_part.strip().upper() in HEAD_BODY_PARTS:
        raise NoSpinalCordError(
            f"no spinal cord to measure: the DICOM says the study is of the {body_part.strip().lower()} "
            "(BodyPartExamined); scsnet measures the cervical spinal cord"
        )
    if series_description and HEAD_DESCRIPTION.search(series_description):
        raise NoSpinalCordError(
            f"no spinal cord to measure: the series {series_description!r} is a head or brain series; "
            "scsnet measures the cervical spinal cord"
        )


def check_series_geometry(group: SeriesGroup) -> None:
    """Refuse a series whose pixel spacing, slice thickness or slice positions are missing or
    impossible (see the module's docstring).

    Raises
    ------
    ImageError : naming the series and the attribute.
    """
    label = f"the series {group.description!r}"
    positions: list[np.ndarray] = []
    mosaic = False
    tags = GEOMETRY_TAGS if group.multi_frame else CLASSIC_GEOMETRY_TAGS
    for path in group.files:
        ds = read_header(path, tags=tags)
        if ds is None:
            raise ImageError(f"{label} has an image ({path.name}) whose header cannot be read")
        image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
        mosaic = mosaic or "MOSAIC" in image_type or "VFRAME" in image_type
        _check_spacing(ds, label=label)
        positions += [p.position for p in frame_planes(ds) if p is not None]
    if not mosaic and len(positions) > 1:
        spread = np.ptp(np.asarray(positions), axis=0)
        if float(np.max(spread)) < SAME_POSITION_MM:
            raise ImageError(
                f"all {len(positions)} images of {label} lie at one position (ImagePositionPatient): "
                "its slices cannot be placed"
            )


def _check_spacing(ds: Dataset, *, label: str) -> None:
    measures = _pixel_measures(ds)
    spacing = measures.get("PixelSpacing") if measures is not None else None
    if spacing is None or len(spacing) != 2:
        raise ImageError(f"{label} has no PixelSpacing: its voxel size is unknown")
    try:
        values = [float(v) for v in spacing]
    except (TypeError, ValueError):
        raise ImageError(f"{label} has a PixelSpacing that is not a number") from None
    check_voxel_size(values, field="PixelSpacing", label=label)
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):
        value = measures.get(keyword) if measures is not None else None
        if value is None or not str(value).strip():
            continue
        try:
            size = abs(float(value))  # some writers sign SpacingBetweenSlices by the stacking direction
        except (TypeError, ValueError):
            raise ImageError(f"{label} has a {keyword} that is not a number") from None
        check_voxel_size([size], field=keyword, label=label)


def _pixel_measures(ds: Dataset) -> Dataset | None:
    """Where the spacing lives: the Pixel Measures functional group of an enhanced image
    (shared, else the first frame's), or the data set itself."""
    if "SharedFunctionalGroupsSequence" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        return ds
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(keyword)
        if items:
            seq = items[0].get("PixelMeasuresSequence")
            if seq:
                return seq[0]
    return None
