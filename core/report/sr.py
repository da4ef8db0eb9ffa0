"""The report's region measures as a DICOM Structured Report (TID 1500 Measurement Report).

A PACS or a viewer (OHIF, 3D Slicer's QIICR tools, dcmqi) reads the measures of a study from a
Comprehensive 3D SR that points at the regions of the DICOM Segmentation (``seg.dcm``, see
:mod:`core.report.seg`): one TID 1411 "Volumetric ROI Measurements" group per region (segments
1-8, the label codes of :mod:`core.labels`) and one for the whole spinal cord (segment 9). The
values are report.json's, unchanged: the mean FA, MD, AD and RD over the region's voxels and the
region's volume.

Every concept is a standard code; no private coding scheme is needed:

=================  ===================================  ==================  ====================
measure            concept name (scheme, code)          unit (UCUM)         report.json
=================  ===================================  ==================  ====================
FA                 DCM 110808 Fractional Anisotropy     ``1`` no units      ``fa.mean``
MD                 DCM 113202 Mean Diffusivity          ``mm2/s``           ``md.mean``
AD                 DCM 113204 Axial Diffusivity         ``mm2/s``           ``ad.mean``
RD                 DCM 113203 Radial Diffusivity        ``mm2/s``           ``rd.mean``
volume             SCT 118565006 Volume                 ``mm3``             ``volume_mm3``
=================  ===================================  ==================  ====================

FA, MD, AD and RD carry the derivation SCT 373098007 "Mean" (the mean over the region's voxels).
Each group's finding type is the region's anatomic structure (SNOMED CT, the SEG's segmented
property type: 14892003 Lateral funiculus, 59752008 Dorsal funiculus, 31701002 Ventral
funiculus, 12958003 Spinal cord gray matter; 2748008 Spinal cord for the whole cord), its
finding category SCT 91723000 Anatomical Structure, and its finding site the same structure with
the patient's laterality (SCT 272741003 Laterality: 7771000 Left or 24028007 Right; none for the
whole cord). The procedure reported is LOINC 25056-3 "MRI unspecified body region" (CID 100,
Quantitative Diagnostic Imaging Procedures). The observer is a device: the SCS-Net algorithm,
with a Device Observer UID derived from the software version and the model's SHA-256, so one
build of scsnet with one model is always the same device.

A region with no voxel has no mean: its FA/MD/AD/RD are left out, its group (with volume 0)
is kept, so the SR always holds nine groups.

The Comprehensive 3D SR IOD has no Frame of Reference module; the frame of reference of the
regions is the SEG's, which the SR references.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from highdicom._standard_utils import get_sop_class_iod_map
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from core.errors import UnsupportedInputError
from core.ingest.dicom import DicomSeriesInfo, SourceFrame
from core.labels import LATERALITY_SNOMED, REGIONS
from core.report.dicom_source import (
    ALGORITHM_NAME,
    ANATOMICAL_STRUCTURE,
    CORD_SEGMENT_NUMBER,
    CORD_TRACKING_ID,
    MANUFACTURER,
    SPINAL_CORD,
    SR_SERIES_NUMBER_OFFSET,
    new_series,
    software_versions,
    source_header,
)

PROCEDURE_REPORTED = hd.sr.CodedConcept("25056-3", "LN", "MRI unspecified body region")
MEAN = hd.sr.CodedConcept("373098007", "SCT", "Mean")

NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
MM2_PER_S = hd.sr.CodedConcept("mm2/s", "UCUM", "mm2/s")
CUBIC_MM = hd.sr.CodedConcept("mm3", "UCUM", "cubic millimeter")
VOLUME = hd.sr.CodedConcept("118565006", "SCT", "Volume")


@dataclass(frozen=True)
class Quantity:
    """One diffusion measure of a region: its report.json key, DICOM concept and unit."""

    key: str
    concept: hd.sr.CodedConcept
    unit: hd.sr.CodedConcept


QUANTITIES: tuple[Quantity, ...] = (
    Quantity("fa", hd.sr.CodedConcept("110808", "DCM", "Fractional Anisotropy"), NO_UNITS),
    Quantity("md", hd.sr.CodedConcept("113202", "DCM", "Mean Diffusivity"), MM2_PER_S),
    Quantity("ad", hd.sr.CodedConcept("113204", "DCM", "Axial Diffusivity"), MM2_PER_S),
    Quantity("rd", hd.sr.CodedConcept("113203", "DCM", "Radial Diffusivity"), MM2_PER_S),
)
"""FA (dimensionless) and MD, AD, RD (mm^2/s), in report order."""


@dataclass(frozen=True)
class RegionGroup:
    """What one measurement group needs: segment, tracking id, anatomy and the measured entry."""

    segment_number: int
    tracking_id: str
    structure: hd.sr.CodedConcept
    laterality: hd.sr.CodedConcept | None
    measured: dict[str, Any]


def region_groups(report: dict[str, Any]) -> list[RegionGroup]:
    """The nine groups of a report: regions 1-8 in label order, then the whole cord (segment 9).

    ``report`` is a report.json document (schema ``core/report/report.schema.json``); its
    ``regions[]`` are matched to :data:`core.labels.REGIONS` by ``code``.
    """
    by_code = {int(entry["code"]): entry for entry in report["regions"]}
    missing = [r.code for r in REGIONS if r.code not in by_code]
    if missing:
        raise ValueError(f"the report has no region entry for code(s) {missing}")
    groups = []
    for region in REGIONS:
        code, meaning = LATERALITY_SNOMED[region.side]
        groups.append(
            RegionGroup(
                segment_number=region.code,
                tracking_id=region.key,
                structure=hd.sr.CodedConcept(region.snomed[0], "SCT", region.snomed[1]),
                laterality=hd.sr.CodedConcept(code, "SCT", meaning),
                measured=by_code[region.code],
            )
        )
    groups.append(RegionGroup(CORD_SEGMENT_NUMBER, CORD_TRACKING_ID, SPINAL_CORD, None, report["cord"]))
    return groups


def measurements(measured: dict[str, Any], *, algorithm: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    """The TID 300 measurements of one region: mean FA, MD, AD, RD (those not None) and volume.

    ``measured`` is a report.json region (or ``cord``) entry; values are passed on as stored
    (float), diffusivities in mm^2/s, volume in mm^3.
    """
    out = []
    for quantity in QUANTITIES:
        value = measured[quantity.key]["mean"]
        if value is None:  # an empty region has no mean; the group keeps its volume (0)
            continue
        out.append(
            hd.sr.Measurement(
                name=quantity.concept, value=float(value), unit=quantity.unit, derivation=MEAN, algorithm_id=algorithm
            )
        )
    out.append(hd.sr.Measurement(name=VOLUME, value=float(measured["volume_mm3"]), unit=CUBIC_MM, algorithm_id=algorithm))
    return out


def measurement_group(
    group: RegionGroup,
    *,
    seg: Dataset,
    source_images: list[hd.sr.SourceImageForSegmentation],
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """One TID 1411 group: the SEG segment it measures, its anatomy and its measurements."""
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=group.tracking_id),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=group.segment_number,
            source_images=source_images,
        ),
        finding_type=group.structure,
        finding_category=ANATOMICAL_STRUCTURE,
        finding_sites=[hd.sr.FindingSite(anatomic_location=group.structure, laterality=group.laterality)],
        measurements=measurements(group.measured, algorithm=algorithm),
    )


def _source_headers(sources: tuple[SourceFrame, ...]) -> list[Dataset]:
    """The headers of the distinct source files of ``sources``, in first-seen order, checked
    for what the SR's references and evidence need."""
    paths = list(dict.fromkeys(Path(s.path) for s in sources))
    headers = [source_header(p) for p in paths]
    # highdicom copies the patient/study modules by looking the source's SOP class up in its
    # table of the standard and fails with a KeyError on a class it does not know (private ones)
    iods = get_sop_class_iod_map()
    for ds in headers:
        if not str(ds.get("SeriesInstanceUID", "") or ""):
            raise UnsupportedInputError("the source images have no SeriesInstanceUID, so no DICOM report can reference them")
        if ds.SOPClassUID not in iods:
            raise UnsupportedInputError(
                f"the source images are of a SOP class ({ds.SOPClassUID}) that DICOM results cannot be derived from"
            )
    if len({str(ds.StudyInstanceUID) for ds in headers}) != 1:
        raise UnsupportedInputError("the source b=0 images belong to several studies, so one DICOM report cannot cover them")
    return headers


def _source_references(headers: list[Dataset], sources: tuple[SourceFrame, ...]) -> list[hd.sr.SourceImageForSegmentation]:
    """One "Source Image for Segmentation" item per source file, naming its b=0 frames when the
    file is multi-frame (built from the UIDs, so a source without Modality is no obstacle)."""
    frames: dict[str, list[int]] = {}
    for s in sources:
        if s.frame_number is not None:
            frames.setdefault(s.sop_instance_uid, []).append(s.frame_number)
    return [
        hd.sr.SourceImageForSegmentation(
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            referenced_frame_numbers=sorted(frames[ds.SOPInstanceUID]) if ds.SOPInstanceUID in frames else None,
        )
        for ds in headers
    ]


def _read_seg(seg_path: Path, *, study_instance_uid: str) -> Dataset:
    """The SEG the groups reference; it must belong to the source study."""
    seg = pydicom.dcmread(Path(seg_path), stop_before_pixels=True)
    if str(seg.get("StudyInstanceUID", "")) != study_instance_uid:
        raise ValueError(f"{seg_path} is not a segmentation of study {study_instance_uid}")
    return seg


def observation_context(*, software_version: str, model: dict[str, Any]) -> hd.sr.ObservationContext:
    """TID 1001 with a device observer: the SCS-Net algorithm of this software and model.

    The Device Observer UID is derived from the software version and the model's SHA-256, so it
    names one build of the algorithm, not one run.
    """
    uid = generate_uid(entropy_srcs=[ALGORITHM_NAME, software_version, str(model.get("sha256", ""))])
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uid,
        name=ALGORITHM_NAME,
        manufacturer_name=MANUFACTURER,
        model_name=f"{model.get('name', 'unknown')} {model.get('version', '')}".strip(),
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def algorithm_identification(*, software_version: str, model: dict[str, Any]) -> hd.sr.AlgorithmIdentification:
    """TID 4019: the algorithm name and ``"<scsnet version> / model <name> <version>"``."""
    name, version = model.get("name", "unknown"), model.get("version", "unknown")
    return hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=f"{software_version} / model {name} {version}")


def write_sr(
    report: dict[str, Any],
    *,
    series: DicomSeriesInfo,
    seg_path: Path,
    out_path: Path,
    software_version: str,
) -> str:
    """Write the report's region measures as a TID 1500 Comprehensive 3D SR; return its
    SeriesInstanceUID.

    Parameters
    ----------
    report : the report.json document of the study (its ``regions``, ``cord`` and ``model``).
    series : the analysed series (``DicomIngest.series``); its source b=0 files must still
        exist. The SR joins their study; patient and study attributes come from them (empty
        where a de-identified source has none).
    seg_path : the DICOM Segmentation of the same study (:func:`core.report.seg.write_seg`),
        whose segments 1-8 are the regions and 9 the whole cord.
    out_path : where to write the SR (``.dcm``).
    software_version : the scsnet version, recorded as Software Versions and in the algorithm
        version.

    Raises
    ------
    UnsupportedInputError : the series has no source b=0 images (mosaic) or they lack what a
        derived DICOM object must carry; the sentence says which.
    ValueError : ``report`` lacks a region, or ``seg_path`` is not a SEG of the source study
        (programming errors).
    """
    if not series.seg_supported:
        raise UnsupportedInputError(series.seg_unsupported_reason or "the series has no source b=0 images")
    headers = _source_headers(series.b0_sources)
    seg = _read_seg(seg_path, study_instance_uid=str(headers[0].StudyInstanceUID))
    model = report.get("model") or {}
    algorithm = algorithm_identification(software_version=software_version, model=model)
    sources = _source_references(headers, series.b0_sources)
    content = hd.sr.MeasurementReport(
        observation_context=observation_context(software_version=software_version, model=model),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[
            measurement_group(group, seg=seg, source_images=sources, algorithm=algorithm)
            for group in region_groups(report)
        ],
    )
    attributes = new_series(
        series, offset=SR_SERIES_NUMBER_OFFSET, kind="Cord DTI measures", software_version=software_versions(software_version, model)
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*headers, seg],
        content=content[0],
        is_complete=True,
        device_serial_number="none",
        **attributes,
    )
    sr.save_as(Path(out_path))
    return str(attributes["series_instance_uid"])
