"""The QC picture as a DICOM Secondary Capture in the source study, on the real cervical DWI
written as DICOM; it and the SEG of the same study are checked with dciodvfy."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_synth import write_dicom_series
from dicom_validate import dciodvfy, dciodvfy_output
from numpy.typing import NDArray
from PIL import Image
from pydicom.uid import SecondaryCaptureImageStorage

from core.errors import UnsupportedInputError
from core.ingest.dicom import DicomIngest, ingest_dicom
from core.ingest.nifti import load_nifti_dwi
from core.report.dicom_source import TYPE2_PATIENT_STUDY
from core.report.qc import write_qc_png
from core.report.sc import write_qc_sc
from core.report.seg import write_seg

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # highdicom on one-part names
VERSION = "0.1.0-test"


@pytest.fixture(scope="module")
def cervical_folder(real_dwi_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real cervical DWI as a classic DICOM MR series (series number 5)."""
    dwi = load_nifti_dwi(real_dwi_paths["image"], bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"])
    folder = tmp_path_factory.mktemp("cervical") / "DICOM" / "series5"
    write_dicom_series(real_dwi_paths["image"], dwi.bvals, dwi.bvecs, folder)
    return folder.parent


@pytest.fixture(scope="module")
def cervical(cervical_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> DicomIngest:
    return ingest_dicom([cervical_folder], workdir=tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def deidentified(cervical_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> DicomIngest:
    """The same study with the type-2 patient/study attributes deleted from the files on disk."""
    folder = tmp_path_factory.mktemp("deid") / "DICOM"
    shutil.copytree(cervical_folder, folder)
    for path in folder.rglob("IM*"):
        ds = pydicom.dcmread(path)
        for keyword in TYPE2_PATIENT_STUDY:
            delattr(ds, keyword)
        ds.save_as(path, enforce_file_format=True)
    return ingest_dicom([folder], workdir=tmp_path_factory.mktemp("deid_work"))


def _labels(shape: tuple[int, ...]) -> NDArray[np.uint8]:
    """Eight bars of codes 1-8 across the middle of every slice."""
    labels = np.zeros(shape[:3], dtype=np.uint8)
    cx, cy = shape[0] // 2, shape[1] // 2
    for code in range(1, 9):
        labels[cx - 4 + code, cy - 2 : cy + 2, :] = code
    return labels


@pytest.fixture(scope="module")
def qc_png(cervical: DicomIngest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A QC picture of the study drawn by the real :func:`write_qc_png`."""
    dwi = cervical.dwi
    b0 = dwi.data[..., dwi.bvals == 0].mean(axis=-1)
    fa = np.clip(b0 / max(float(b0.max()), 1e-6), 0, 1)
    zooms = np.linalg.norm(dwi.affine[:3, :3], axis=0)
    out = tmp_path_factory.mktemp("qc") / "qc.png"
    write_qc_png(b0, fa, _labels(dwi.data.shape), out, zooms_mm=(float(zooms[0]), float(zooms[1]), float(zooms[2])))
    return out


def _png_rgb(path: Path) -> NDArray[np.uint8]:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_sc_in_the_source_study_with_the_png_pixels(cervical: DicomIngest, qc_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "qc.dcm"
    series_uid = write_qc_sc(qc_png, series=cervical.series, out_path=out, software_version=VERSION)
    sc = pydicom.dcmread(out)
    source = pydicom.dcmread(cervical.series.b0_sources[0].path, stop_before_pixels=True)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.file_meta.MediaStorageSOPClassUID == SecondaryCaptureImageStorage
    assert sc.SeriesInstanceUID == series_uid != cervical.series.series_instance_uid
    assert sc.StudyInstanceUID == source.StudyInstanceUID == cervical.series.study_instance_uid
    for keyword in ("PatientID", "PatientName", "StudyID", "StudyDate", "StudyTime"):
        assert sc[keyword].value == source[keyword].value, keyword
    assert sc.SeriesNumber == 5 + 1002
    assert sc.Modality == "OT"
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    np.testing.assert_array_equal(sc.pixel_array, _png_rgb(qc_png))
    assert sc.ConversionType == "WSD"
    assert sc.SeriesDescription == "QC (SCS-Net) DTI cervical"
    assert (sc.Manufacturer, sc.ManufacturerModelName, sc.SoftwareVersions) == ("scsnet", "SCS-Net", VERSION)
    assert list(sc.PatientOrientation) == ["L", "P"]
    assert sc.BodyPartExamined == "CSPINE"
    assert "FrameOfReferenceUID" not in sc


def test_sc_of_a_deidentified_source_has_empty_type2_values(
    deidentified: DicomIngest, qc_png: Path, tmp_path: Path
) -> None:
    source = pydicom.dcmread(deidentified.series.b0_sources[0].path, stop_before_pixels=True)
    assert not any(keyword in source for keyword in TYPE2_PATIENT_STUDY)  # the files stay as sent
    out = tmp_path / "qc.dcm"
    write_qc_sc(qc_png, series=deidentified.series, out_path=out, software_version=VERSION)
    sc = pydicom.dcmread(out)
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    for keyword in TYPE2_PATIENT_STUDY:
        assert keyword in sc, keyword
        assert sc[keyword].value in (None, ""), keyword


@pytest.mark.parametrize("study", ["cervical", "deidentified"])
def test_sc_conforms_to_the_standard(study: str, qc_png: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    ingest: DicomIngest = request.getfixturevalue(study)
    out = tmp_path / "qc.dcm"
    write_qc_sc(qc_png, series=ingest.series, out_path=out, software_version=VERSION)
    errors = dciodvfy(out)
    assert not errors, dciodvfy_output(out)


def test_sc_without_body_part_draws_the_laterality_question(
    cervical: DicomIngest, qc_png: Path, tmp_path: Path
) -> None:
    """Why the SC names its body part, and the validator's excuse mechanism at work: without
    Body Part Examined dciodvfy cannot tell that the cord is unpaired and asks for Laterality."""
    out = tmp_path / "qc.dcm"
    write_qc_sc(qc_png, series=cervical.series, out_path=out, software_version=VERSION)
    ds = pydicom.dcmread(out)
    del ds.BodyPartExamined
    ds.save_as(out, enforce_file_format=True)
    laterality = r"Type 2C Conditional Element=<Laterality> Module=<GeneralSeries>"
    assert any("<Laterality>" in e for e in dciodvfy(out))
    assert dciodvfy(out, known_false_positives={laterality: "the spinal cord is not a paired structure"}) == []


def test_sc_drops_the_alpha_of_an_rgba_png(cervical: DicomIngest, tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (21, 34, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "qc.png")
    write_qc_sc(tmp_path / "qc.png", series=cervical.series, out_path=tmp_path / "qc.dcm", software_version=VERSION)
    np.testing.assert_array_equal(pydicom.dcmread(tmp_path / "qc.dcm").pixel_array, rgba[..., :3])


def test_sc_without_a_source_image_is_refused(cervical: DicomIngest, qc_png: Path, tmp_path: Path) -> None:
    empty = replace(cervical.series, b0_sources=(), files=())
    with pytest.raises(UnsupportedInputError, match="no source image"):
        write_qc_sc(qc_png, series=empty, out_path=tmp_path / "qc.dcm", software_version=VERSION)


def test_sc_falls_back_to_any_file_of_a_mosaic_series(cervical: DicomIngest, qc_png: Path, tmp_path: Path) -> None:
    mosaic = replace(cervical.series, layout="mosaic", b0_sources=(), seg_unsupported_reason="mosaic images")
    write_qc_sc(qc_png, series=mosaic, out_path=tmp_path / "qc.dcm", software_version=VERSION)
    assert pydicom.dcmread(tmp_path / "qc.dcm").StudyInstanceUID == cervical.series.study_instance_uid


@pytest.mark.parametrize(
    ("keyword", "value", "match"),
    [("StudyInstanceUID", None, "no StudyInstanceUID"), ("PatientSex", "X", "not valid DICOM")],
)
def test_sc_refuses_a_source_without_a_usable_study(
    cervical: DicomIngest, qc_png: Path, tmp_path: Path, keyword: str, value: str | None, match: str
) -> None:
    source = tmp_path / "source.dcm"
    ds = pydicom.dcmread(cervical.series.b0_sources[0].path)
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    ds.save_as(source, enforce_file_format=True)
    broken = replace(cervical.series, b0_sources=(replace(cervical.series.b0_sources[0], path=source),))
    with pytest.raises(UnsupportedInputError, match=match):
        write_qc_sc(qc_png, series=broken, out_path=tmp_path / "qc.dcm", software_version=VERSION)


def test_seg_of_the_same_study_conforms_to_the_standard(cervical: DicomIngest, tmp_path: Path) -> None:
    out = tmp_path / "seg.dcm"
    labels = _labels(cervical.dwi.data.shape)
    write_seg(labels, affine=cervical.dwi.affine, series=cervical.series, out_path=out, software_version=VERSION)
    errors = dciodvfy(out)
    assert not errors, dciodvfy_output(out)
