"""DICOM through the whole pipeline: real GE DICOM in a zip, and the real cervical DWI written
as a DICOM series, which must give the same answers as its NIfTI original."""

from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from dicom_synth import write_dicom_series

from cli.main import main
from core import pipeline
from core.ingest.nifti import load_nifti_dwi
from core.segment.runtime import Segmenter
from core.settings import SHIPPED_MODEL_DIR

DATA = Path(__file__).parent / "data" / "dicom"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.writestr(path.relative_to(folder.parent).as_posix(), path.read_bytes())
    return target


def test_ge_zip_through_the_cli_is_refused_as_a_brain_study(tmp_path: Path, decoder_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The GE DICOM is a brain DWI (BodyPartExamined BRAIN): exit 2, one line saying there is
    no spinal cord, and nothing written (the zip is read, converted and chosen first)."""
    with tarfile.open(DATA / "dcm_qa_ge.tar.xz") as tar:
        tar.extractall(tmp_path, filter="data")
    upload = _zip_folder(tmp_path / "dcm_qa_ge" / "In", tmp_path / "study.zip")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["analyze", str(upload), "--out", str(out), "--model-dir", str(decoder_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no spinal cord" in err and "brain" in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.fixture(scope="module")
def cervical_dicom(real_dwi_paths, tmp_path_factory) -> Path:
    dwi = load_nifti_dwi(real_dwi_paths["image"], bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"])
    folder = tmp_path_factory.mktemp("cervical") / "DICOM" / "series5"
    write_dicom_series(real_dwi_paths["image"], dwi.bvals, dwi.bvecs, folder)
    return folder.parent


def test_cervical_dicom_matches_its_nifti_original(cervical_dicom, real_dwi_paths, tmp_path) -> None:
    """Same study by two routes: labels and FA agree in world space, SEG sits on the b=0 images."""
    segmenter = Segmenter(SHIPPED_MODEL_DIR)
    from_dicom = pipeline.analyze([cervical_dicom], out_dir=tmp_path / "dicom", segmenter=segmenter)
    from_nifti = pipeline.analyze(
        [real_dwi_paths["image"]], out_dir=tmp_path / "nifti", segmenter=segmenter, bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"]
    )
    assert from_dicom["input"]["orientation"] != from_nifti["input"]["orientation"]  # dcm2niix stores it otherwise
    for a, b in zip(from_dicom["regions"], from_nifti["regions"]):
        assert a["voxels"] == pytest.approx(b["voxels"], rel=0.05, abs=3), a["name"]
        assert a["fa"]["mean"] == pytest.approx(b["fa"]["mean"], abs=0.01), a["name"]
    lab_d = nib.as_closest_canonical(nib.load(str(tmp_path / "dicom" / "labels.nii.gz")))
    lab_n = nib.as_closest_canonical(nib.load(str(tmp_path / "nifti" / "labels.nii.gz")))
    np.testing.assert_allclose(lab_d.affine, lab_n.affine, atol=1e-3)
    agree = np.mean(np.asarray(lab_d.dataobj)[np.asarray(lab_n.dataobj) > 0] == np.asarray(lab_n.dataobj)[np.asarray(lab_n.dataobj) > 0])
    assert agree > 0.95

    seg = hd.seg.segread(tmp_path / "dicom" / "seg.dcm")
    assert seg.number_of_segments == 9  # the eight regions and the whole cord
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert len(referenced) == 15  # one b=0 image per slice
    # every labelled voxel of slice k is in the SEG frame that references slice k's b=0 image
    total = sum(int(seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[uid], segment_numbers=[code], assert_missing_frames_are_empty=True, ignore_spatial_locations=True
    ).sum()) for uid in referenced for code in range(1, 9))
    assert total == int((np.asarray(lab_d.dataobj) > 0).sum())
    cord = sum(int(seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[uid], segment_numbers=[9], assert_missing_frames_are_empty=True, ignore_spatial_locations=True
    ).sum()) for uid in referenced)
    assert cord == total


def test_convert_a_dicom_folder_names_the_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tarfile.open(DATA / "dcm_qa_ge.tar.xz") as tar:
        tar.extractall(tmp_path, filter="data")
    out = tmp_path / "conv"
    assert main(["convert", str(tmp_path / "dcm_qa_ge" / "In"), "--out", str(out)]) == 0, capsys.readouterr().err
    assert "converted 7 volumes" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["dwi.bval", "dwi.bvec", "dwi.json", "dwi.nii.gz"]
    sidecar = json.loads((out / "dwi.json").read_text())
    assert sidecar["input"]["series_description"]
    assert sidecar["acquisition"]["n_b0"] >= 1
    assert sidecar["dcm2niix"]["Manufacturer"].upper().startswith("GE")
    again = load_nifti_dwi(out / "dwi.nii.gz")
    assert again.data.shape[3] == 7
