"""Reading DICOM headers and grouping an upload's image files into series.

Only standard attributes are read here (pydicom, no pixel data): which files are DICOM, which
series and SOP class each image belongs to, and the descriptive attributes used to name a series
in messages. A Canon export can hold the classic and the enhanced copy of one series under the
same SeriesInstanceUID, hence the (SeriesInstanceUID, SOP class) grouping key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag, Tag

GROUPING_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
    "Rows", "Columns", "InstanceNumber", "NumberOfFrames", "SeriesDescription", "ProtocolName",
    "SeriesNumber", "Modality", "Manufacturer", "ImageType", "PatientID", "BodyPartExamined",
)  # fmt: skip
"""The attributes read while sniffing (reading only these is several times faster on Philips
headers full of private sequences)."""

PIXEL_TAGS = GROUPING_TAGS + (
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SamplesPerPixel",
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "PlanarConfiguration", "PixelData", "FloatPixelData", "DoubleFloatPixelData",
)  # fmt: skip
"""The attributes needed to place and compare a single-frame source image."""


def read_header(path: Path, *, tags: Sequence[str] | None = GROUPING_TAGS) -> Dataset | None:
    """The DICOM header of ``path`` (no pixel data; only ``tags`` unless None), or None if the file
    is not DICOM.

    Files with the standard 128-byte preamble are read directly; files without it are accepted
    when they start with a plausible group 0002 or 0008 element (as many old exports do). With
    ``tags``, reading stops at the first element past the last of them: the vendors' private
    groups (Philips keeps large nested sequences in 2001 and 2005) are then not parsed at all,
    which makes a Philips header about 2.5 times faster to read than with ``specific_tags``
    alone.
    """
    try:
        return _read(path, tags, force=False)
    except InvalidDicomError:
        pass
    except Exception:  # noqa: BLE001 - as below: a corrupt data set (even a bad deflate stream, zlib.error) is not DICOM
        return None
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return None
    if head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return None
    try:
        ds = _read(path, tags, force=True)
    except Exception:  # noqa: BLE001 - pydicom raises many types on garbage; garbage is not DICOM
        return None
    return ds if "SOPClassUID" in ds or "SeriesInstanceUID" in ds else None


def _read(path: Path, tags: Sequence[str] | None, *, force: bool) -> Dataset:
    """``pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)``, stopping at the
    first element past the last of ``tags`` (elements are stored in ascending tag order)."""
    if tags is None:
        return pydicom.dcmread(path, stop_before_pixels=True, force=force)
    specific = [Tag(keyword) for keyword in tags]
    last = max(specific)

    def past_last(tag: BaseTag, vr: str | None, length: int) -> bool:
        return tag > last

    with open(path, "rb") as handle:
        return read_partial(handle, stop_when=past_last, force=force, specific_tags=list(specific))


@dataclass(frozen=True)
class SeriesGroup:
    """The image files of one series (and SOP class) found in an upload.

    Attributes
    ----------
    series_instance_uid, sop_class_uid : the grouping key.
    description : SeriesDescription, or ProtocolName, or "series <number>".
    modality, manufacturer, series_number : as in the header (None when absent).
    body_part : BodyPartExamined of the first file (upper case; None when absent or empty).
    multi_frame : some file has NumberOfFrames (an enhanced, multi-frame object: its geometry is
        in its functional groups).
    files : the DICOM files, sorted by InstanceNumber.
    n_frames : total number of frames (images) over all files.
    patient_ids, study_instance_uids : the non-empty PatientID and StudyInstanceUID values of
        its files (one each in a well-formed series; see :mod:`core.ingest.dicom_checks`).
    """

    series_instance_uid: str
    sop_class_uid: str
    description: str
    modality: str | None
    manufacturer: str | None
    series_number: int | None
    files: tuple[Path, ...]
    n_frames: int
    patient_ids: frozenset[str] = frozenset()
    study_instance_uids: frozenset[str] = frozenset()
    body_part: str | None = None
    multi_frame: bool = False

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


def int_or_none(value: object) -> int | None:
    """``int(value)``, or None when the value is absent or not a number."""
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
        buckets.setdefault(key, []).append((int_or_none(ds.get("InstanceNumber")) or 0, path, ds))
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
                series_number=int_or_none(first.get("SeriesNumber")),
                files=tuple(m[1] for m in members),
                n_frames=sum(int_or_none(m[2].get("NumberOfFrames")) or 1 for m in members),
                patient_ids=_values(members, "PatientID"),
                study_instance_uids=_values(members, "StudyInstanceUID"),
                body_part=str(first.get("BodyPartExamined") or "").strip().upper() or None,
                multi_frame=any("NumberOfFrames" in m[2] for m in members),
            )
        )
    groups.sort(key=lambda g: (-g.n_frames, g.series_number or 0, g.description))
    return groups, ignored


def _values(members: Sequence[tuple[int, Path, Dataset]], keyword: str) -> frozenset[str]:
    """The distinct non-empty values of ``keyword`` over a group's headers."""
    return frozenset(v for v in (str(m[2].get(keyword) or "").strip() for m in members) if v)


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
