"""DICOM SEG over the original GE b=0 images: segments, references and geometry read back."""

from __future__ import annotations

import tarfile
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from core.errors import UnsupportedInputError
from core.ingest.dicom import DicomIngest, ingest_dicom
from core.labels import REGIONS
from core.report.seg import write_seg

DATA = Path(__file__).parent / "data" / "dicom"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # highdicom on GE's one-part names


@pytest.fixture(scope="module")
def ge(tmp_path_factory: pytest.TempPathFactory) -> DicomIngest:
    root = tmp_path_factory.mktemp("ge")
    with tarfile.open(DATA / "dcm_qa_ge.tar.xz") as tar:
        tar.extractall(root, filter="data")
    return ingest_dicom([root / "dcm_qa_ge" / "In"], workdir=root / "work")


def _labels(shape: tuple[int, int, int]) -> np.ndarray:
    """A few voxels per code, in distinct, asymmetric places on both slices."""
    labels = np.zeros(shape, dtype=np.uint8)
    for code in range(1, 9):
        labels[10 + 20 * code, 30 + 7 * code, code % 2] = code
        labels[11 + 20 * code, 30 + 7 * code : 33 + 7 * code, (code + 1) % 2] = code
    return labels


def _seg_world_points(seg: hd.seg.Segmentation) -> dict[int, set[tuple[float, float, float]]]:
    """World RAS+ positions (mm, rounded) of the set pixels of every segment, from the SEG alone."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    spacing = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, dtype=float)
    frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    points: dict[int, set[tuple[float, float, float]]] = {}
    for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, frames):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        for r, c in zip(*np.nonzero(frame)):
            lps = ipp + c * spacing[1] * iop[:3] + r * spacing[0] * iop[3:]
            ras = lps * np.array([-1.0, -1.0, 1.0])
            points.setdefault(number, set()).add(tuple(np.round(ras, 1)))
    return points


def _label_world_points(labels: np.ndarray, affine: np.ndarray) -> dict[int, set[tuple[float, float, float]]]:
    points: dict[int, set[tuple[float, float, float]]] = {}
    for code in range(1, 10):  # the regions 1-8, and segment 9: the whole cord
        ijk = np.argwhere(labels == code if code < 9 else labels > 0)
        xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
        points[code] = {tuple(np.round(p, 1)) for p in xyz}
    return points


def _write_and_read(ge: DicomIngest, labels: np.ndarray, affine: np.ndarray, out: Path) -> hd.seg.Segmentation:
    write_seg(labels, affine=affine, series=ge.series, out_path=out, software_version="0.1.0-test")
    return hd.seg.segread(out)


def test_seg_segments_and_references(ge: DicomIngest, tmp_path: Path) -> None:
    labels = _labels(ge.dwi.shape)
    seg = _write_and_read(ge, labels, ge.dwi.affine, tmp_path / "seg.dcm")
    assert seg.SegmentationType == "BINARY"
    assert len(seg.SegmentSequence) == 9
    cord = seg.SegmentSequence[8]
    assert int(cord.SegmentNumber) == 9 and cord.SegmentLabel == "spinal cord"
    assert cord.SegmentedPropertyTypeCodeSequence[0].CodeValue == "2748008"
    for item, region in zip(seg.SegmentSequence, REGIONS):
        assert int(item.SegmentNumber) == region.code
        assert item.SegmentLabel == region.name
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "SCS-Net"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert prop.CodeValue == region.snomed[0]
        laterality = prop.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue
        assert laterality == ("7771000" if region.side == "left" else "24028007")
        rgb = hd.color.CIELabColor.from_dicom_value(tuple(item.RecommendedDisplayCIELabValue)).to_rgb()
        assert np.abs(np.subtract(rgb, region.colour)).max() <= 2
    b0_uids = {s.sop_instance_uid for s in ge.series.b0_sources}
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }
    assert referenced == b0_uids
    source = pydicom.dcmread(ge.series.b0_sources[0].path, stop_before_pixels=True)
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    for item in seg.PerFrameFunctionalGroupsSequence:
        frame_source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert frame_source in b0_uids


def test_seg_pixels_sit_at_the_label_world_positions(ge: DicomIngest, tmp_path: Path) -> None:
    labels = _labels(ge.dwi.shape)
    seg = _write_and_read(ge, labels, ge.dwi.affine, tmp_path / "seg.dcm")
    assert _seg_world_points(seg) == _label_world_points(labels, ge.dwi.affine)


@pytest.mark.parametrize("variant", ["flip_i", "flip_j", "transpose_ij", "flip_k_transpose"])
def test_seg_is_the_same_for_a_reoriented_grid(ge: DicomIngest, tmp_path: Path, variant: str) -> None:
    """The same label map on a flipped / transposed grid (array and affine together) must give
    the same SEG pixels: frames follow world positions, never array order."""
    labels = _labels(ge.dwi.shape)
    affine = ge.dwi.affine
    shape = np.array(labels.shape)
    flip = {"flip_i": 0, "flip_j": 1, "flip_k_transpose": 2}.get(variant)
    new_labels, new_affine = labels, affine.copy()
    if flip is not None:
        new_labels = np.flip(new_labels, axis=flip)
        f = np.eye(4)
        f[flip, flip], f[flip, 3] = -1, shape[flip] - 1
        new_affine = new_affine @ f
    if "transpose" in variant:
        new_labels = new_labels.transpose(1, 0, 2)
        new_affine = new_affine[:, [1, 0, 2, 3]]
    reference = _write_and_read(ge, labels, affine, tmp_path / "a.dcm")
    moved = _write_and_read(ge, np.ascontiguousarray(new_labels), new_affine, tmp_path / "b.dcm")
    assert _seg_world_points(moved) == _label_world_points(labels, affine)
    np.testing.assert_array_equal(reference.pixel_array, moved.pixel_array)


def test_seg_refused_for_mosaic_with_reason(ge: DicomIngest, tmp_path: Path) -> None:
    from dataclasses import replace

    mosaic = replace(ge.series, layout="mosaic", b0_sources=(), seg_unsupported_reason="mosaic images")
    with pytest.raises(UnsupportedInputError, match="mosaic images"):
        write_seg(_labels(ge.dwi.shape), affine=ge.dwi.affine, series=mosaic, out_path=tmp_path / "x.dcm", software_version="0")


def test_seg_off_grid_affine_refused(ge: DicomIngest, tmp_path: Path) -> None:
    shifted = ge.dwi.affine.copy()
    shifted[:3, 3] += shifted[:3, 0] * 0.5  # half a voxel: source pixels fall between voxels
    with pytest.raises(UnsupportedInputError, match="do not coincide"):
        write_seg(_labels(ge.dwi.shape), affine=shifted, series=ge.series, out_path=tmp_path / "x.dcm", software_version="0")


def test_seg_rejects_unknown_codes(ge: DicomIngest, tmp_path: Path) -> None:
    labels = _labels(ge.dwi.shape)
    labels[0, 0, 0] = 9
    with pytest.raises(ValueError, match="outside the label table"):
        write_seg(labels, affine=ge.dwi.affine, series=ge.series, out_path=tmp_path / "x.dcm", software_version="0")


def test_seg_on_enhanced_multiframe_references_b0_frames(tmp_path: Path) -> None:
    """Siemens XA enhanced (pixels zeroed in the test copy): the SEG references frames of the b=0
    file, and its pixels sit at the label map's world positions."""
    with tarfile.open(DATA / "dcm_qa_xa30.tar.xz") as tar:
        tar.extractall(tmp_path, filter="data")
    result = ingest_dicom([tmp_path / "dcm_qa_xa30" / "In"], workdir=tmp_path / "work")
    labels = np.zeros(result.dwi.shape, dtype=np.uint8)
    for code in range(1, 9):
        labels[5 + 6 * code, 20 + code, 3 * code] = code
    seg = _write_and_read(result, labels, result.dwi.affine, tmp_path / "seg.dcm")  # type: ignore[arg-type]
    assert _seg_world_points(seg) == _label_world_points(labels, result.dwi.affine)
    b0 = {s.frame_number for s in result.series.b0_sources}
    for item in seg.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == result.series.b0_sources[0].sop_instance_uid
        assert int(ref.ReferencedFrameNumber) in b0
