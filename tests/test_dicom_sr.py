"""DICOM SR (TID 1500) over the real cervical DWI written as DICOM: read back, the nine groups
carry report.json's values and point at the right SEG segments; a de-identified source still
gives a valid SR."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from dicom_synth import write_dicom_series
from dicom_validate import dciodvfy

from core import pipeline
from core.errors import UnsupportedInputError
from core.ingest.dicom import DicomSeriesInfo, ingest_dicom
from core.ingest.nifti import load_nifti_dwi
from core.labels import REGIONS
from core.report.dicom_source import SR_SERIES_NUMBER_OFFSET, TYPE2_PATIENT_STUDY
from core.report.sr import write_sr
from core.segment.runtime import Segmenter
from core.settings import SHIPPED_MODEL_DIR

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CODES = {"fa": "110808", "md": "113202", "ad": "113204", "rd": "113203"}
VOLUME_CODE = "118565006"


@dataclass(frozen=True)
class Analysed:
    """One analysis of the cervical DICOM study: its source folder, report, SEG and series."""

    dicom_dir: Path
    report: dict[str, Any]
    seg_path: Path
    series: DicomSeriesInfo
    workdir: Path


@pytest.fixture(scope="module")
def analysed(real_dwi_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Analysed:
    root = tmp_path_factory.mktemp("sr")
    dwi = load_nifti_dwi(real_dwi_paths["image"], bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"])
    write_dicom_series(real_dwi_paths["image"], dwi.bvals, dwi.bvecs, root / "DICOM" / "series5")
    out = root / "out"
    report = pipeline.analyze([root / "DICOM"], out_dir=out, segmenter=Segmenter(SHIPPED_MODEL_DIR))
    series = ingest_dicom([root / "DICOM"], workdir=root / "ingest").series
    return Analysed(root / "DICOM", report, out / "seg.dcm", series, root)


@pytest.fixture(scope="module")
def sr(analysed: Analysed) -> hd.sr.Comprehensive3DSR:
    path = analysed.workdir / "sr.dcm"
    uid = write_sr(analysed.report, series=analysed.series, seg_path=analysed.seg_path, out_path=path, software_version="0.1.0-test")
    document = hd.sr.srread(path)
    assert isinstance(document, hd.sr.Comprehensive3DSR)
    assert document.SeriesInstanceUID == uid
    return document


def _groups(sr: hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR) -> list[Any]:
    """The TID 1411 groups of an SR read back (its content must be a TID 1500 report)."""
    content = sr.content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content.get_volumetric_roi_measurement_groups()


def _measures(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> dict[str, float]:
    by_code = {m.name.value: m.value for m in group.get_measurements()}
    out = {key: by_code[code] for key, code in CODES.items() if code in by_code}
    out["volume_mm3"] = by_code[VOLUME_CODE]
    return out


def _expected(entry: dict[str, Any]) -> dict[str, float]:
    out = {key: entry[key]["mean"] for key in CODES if entry[key]["mean"] is not None}
    out["volume_mm3"] = entry["volume_mm3"]
    return out


def test_sr_is_a_tid1500_report_in_the_source_study(sr: hd.sr.Comprehensive3DSR, analysed: Analysed) -> None:
    source = pydicom.dcmread(analysed.series.b0_sources[0].path, stop_before_pixels=True)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SeriesNumber == 5 + SR_SERIES_NUMBER_OFFSET
    assert sr.SeriesDescription == "Cord DTI measures (SCS-Net) DTI cervical"
    assert sr.Manufacturer == "scsnet"
    model = analysed.report["model"]
    assert sr.SoftwareVersions == f"0.1.0-test (model {model['name']} {model['version']})"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}  # (study, series, instance, class)
    seg = pydicom.dcmread(analysed.seg_path, stop_before_pixels=True)
    assert {s.sop_instance_uid for s in analysed.series.b0_sources} | {seg.SOPInstanceUID} == evidence


def test_sr_groups_carry_the_report_values_and_segments(sr: hd.sr.Comprehensive3DSR, analysed: Analysed) -> None:
    groups = _groups(sr)
    assert len(groups) == 9
    seg = pydicom.dcmread(analysed.seg_path, stop_before_pixels=True)
    regions = {entry["code"]: entry for entry in analysed.report["regions"]}
    expected = [(r.code, r.key, regions[r.code]) for r in REGIONS] + [(9, "spinal_cord", analysed.report["cord"])]
    b0_uids = {s.sop_instance_uid for s in analysed.series.b0_sources}
    labels = {int(item.SegmentNumber): item.SegmentLabel for item in seg.SegmentSequence}
    assert labels[9] == "spinal cord" and all(labels[r.code] == r.name for r in REGIONS)
    for group, (segment, key, entry) in zip(groups, expected):
        assert group.tracking_identifier == key
        assert _measures(group) == _expected(entry), key  # exactly: the floats of report.json
        reference = group.referenced_segment
        assert reference is not None
        item = reference[0]
        assert item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert item.ReferencedSOPSequence[0].ReferencedSOPClassUID == seg.SOPClassUID
        assert int(item.ReferencedSOPSequence[0].ReferencedSegmentNumber) == segment
        assert {s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for s in reference[1:]} == b0_uids


def test_sr_groups_name_anatomy_and_laterality(sr: hd.sr.Comprehensive3DSR) -> None:
    groups = _groups(sr)
    for group, region in zip(groups, REGIONS):
        assert group.finding_type is not None and group.finding_type.value == region.snomed[0]
        (site,) = group.finding_sites
        assert site.value.value == region.snomed[0]
        assert site.laterality is not None
        assert site.laterality.value == ("7771000" if region.side == "left" else "24028007")
    cord = groups[8]
    assert cord.finding_type is not None and cord.finding_type.value == "2748008"
    assert cord.finding_sites[0].laterality is None
    fa = cord.get_measurements(name=hd.sr.CodedConcept("110808", "DCM", "Fractional Anisotropy"))[0]
    assert fa.unit.value == "1"
    md = cord.get_measurements(name=hd.sr.CodedConcept("113202", "DCM", "Mean Diffusivity"))[0]
    assert md.unit.value == "mm2/s"
    assert md.derivation is not None and md.derivation.value == "373098007"


def test_sr_conforms_to_the_standard(sr: hd.sr.Comprehensive3DSR, analysed: Analysed) -> None:
    errors = dciodvfy(analysed.workdir / "sr.dcm")
    assert not errors, "\n".join(errors)


def test_empty_region_keeps_its_group_without_means(analysed: Analysed, tmp_path: Path) -> None:
    report = {**analysed.report, "regions": [dict(r) for r in analysed.report["regions"]]}
    empty = {"mean": None, "sd": None, "median": None, "p25": None, "p75": None}
    report["regions"][2] = {**report["regions"][2], "voxels": 0, "volume_mm3": 0.0, **{k: empty for k in CODES}}
    write_sr(report, series=analysed.series, seg_path=analysed.seg_path, out_path=tmp_path / "sr.dcm", software_version="0")
    groups = _groups(hd.sr.srread(tmp_path / "sr.dcm"))
    assert len(groups) == 9
    assert _measures(groups[2]) == {"volume_mm3": 0.0}


def test_deidentified_source_gives_empty_type2_attributes(analysed: Analysed, tmp_path: Path) -> None:
    """Patient/study attributes deleted from every source file: the SR has them, empty. (The
    SEG of the identified copy is reused: same study, and this test is about the SR alone.)"""
    copy = tmp_path / "DICOM"
    shutil.copytree(analysed.dicom_dir, copy)
    for path in copy.rglob("IM*"):
        ds = pydicom.dcmread(path)
        for keyword in TYPE2_PATIENT_STUDY:
            delattr(ds, keyword)
        ds.save_as(path)
    series = ingest_dicom([copy], workdir=tmp_path / "ingest").series
    out = tmp_path / "sr.dcm"
    write_sr(analysed.report, series=series, seg_path=analysed.seg_path, out_path=out, software_version="0")
    sr = hd.sr.srread(out)
    for keyword in TYPE2_PATIENT_STUDY:
        assert keyword in sr, keyword
        assert not str(sr[keyword].value or ""), keyword
    assert sr.StudyInstanceUID == analysed.series.study_instance_uid
    assert len(_groups(sr)) == 9
    errors = dciodvfy(out)
    assert not errors, "\n".join(errors)


def test_sr_refused_without_source_images(analysed: Analysed, tmp_path: Path) -> None:
    from dataclasses import replace

    mosaic = replace(analysed.series, layout="mosaic", b0_sources=(), seg_unsupported_reason="mosaic images")
    with pytest.raises(UnsupportedInputError, match="mosaic images"):
        write_sr(analysed.report, series=mosaic, seg_path=analysed.seg_path, out_path=tmp_path / "x.dcm", software_version="0")
