"""Refusals (issue 21): no numbers without a spinal cord, none that no cord has; impossible
geometry refused before any work; one patient, one study per job.

Each refusal is an :class:`~core.errors.InputError` subclass (422 in the service, exit 2 with one
line on stderr from the CLI) and leaves no output folder behind; the real cervical DWI and the
simulated studies still succeed.
"""

from __future__ import annotations

import struct
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import phantoms
import pydicom
import pytest
from dicom_synth import write_dicom_series

from cli.main import main
from core import pipeline
from core.errors import (
    ImageError,
    ImplausibleMeasuresError,
    InputError,
    MixedStudiesError,
    NoSpinalCordError,
)
from core.ingest import dicom as dicom_ingest
from core.ingest.dicom_checks import check_body_part
from core.ingest.nifti import load_nifti_dwi
from core.ingest.rules import MAX_RESAMPLED_SLICE_PX
from core.measures import plausibility
from core.segment.runtime import Segmenter
from core.settings import SHIPPED_MODEL_DIR

DICOM_DATA = Path(__file__).parent / "data" / "dicom"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _refused(args: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """Run the CLI: exit 2, one ``scsnet: error:`` line holding every one of ``words``, and the
    output folder (``--out``) not there, nor any staging folder beside it."""
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("scsnet: error: "), err
    for word in words:
        assert word in err, (word, err)
    out = Path(args[args.index("--out") + 1])
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith("." + out.name)], list(out.parent.iterdir())
    return err


@pytest.fixture(scope="module")
def shipped() -> Segmenter:
    return Segmenter(SHIPPED_MODEL_DIR)


# --- the real study and the simulated ones still succeed ----------------------------------------


def test_the_real_dwi_and_the_simulated_study_succeed(real_dwi_paths, shipped, decoder_dir, tmp_path) -> None:
    report = pipeline.analyze(
        [real_dwi_paths["image"]], bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"], out_dir=tmp_path / "real",
        segmenter=shipped,
    )
    assert report["qc"]["slices_without_cord"] == [] and 0.6e-3 < report["cord"]["md"]["median"] < 1.0e-3
    phantom = phantoms.region_phantom(tmp_path / "phantom", csf_rim=True)
    assert pipeline.analyze([phantom["image"]], out_dir=tmp_path / "sim", segmenter=Segmenter(decoder_dir))["cord"]["voxels"]


# --- no spinal cord ------------------------------------------------------------------------------


def test_a_cord_on_too_few_slices_is_refused(decoder_dir, tmp_path, capsys) -> None:
    """A simulated study whose cord is blanked out on 3 of its 4 slices: 1 of 4 is not enough."""
    info = phantoms.region_phantom(tmp_path / "study")
    img = nib.load(str(info["image"]))
    data = np.asarray(img.dataobj).copy()
    data[:, :, 1:] = 0.0
    nib.save(nib.Nifti1Image(data, img.affine), str(info["image"]))
    _refused(
        ["analyze", str(info["image"]), "--out", str(tmp_path / "out"), "--model-dir", str(decoder_dir)], capsys,
        "no spinal cord", "only 1 of the 4 slices",
    )
    with pytest.raises(NoSpinalCordError):
        pipeline.analyze([info["image"]], out_dir=tmp_path / "out", segmenter=Segmenter(decoder_dir))


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda lab: lab[:, :, :1], "only 1"),  # one slice: no continuity to judge
        (lambda lab: np.where(lab > 0, 0, 1).astype(np.uint8), "cross-section"),  # everything but the cord
        (lambda lab: lab[::3, ::3], "cross-section"),  # a speck
        (lambda lab: np.concatenate([lab[:, :, :2], np.roll(lab[:, :, 2:], 15, axis=0)], axis=2), "jumps"),
    ],
    ids=["one slice", "too large", "too small", "not continuous"],
)
def test_what_is_not_cord_like_is_refused(make, words) -> None:
    labels = phantoms.region_labels((40, 36, 4))
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    plausibility.check_cord(labels, affine=affine)  # the simulated cord itself passes
    with pytest.raises(NoSpinalCordError, match=words):
        plausibility.check_cord(make(labels), affine=affine)


def test_brain_dicom_is_refused_even_without_its_body_part(decoder_dir, tmp_path, capsys) -> None:
    """The GE brain DWI with BodyPartExamined and the description taken away: what the
    segmenter finds there is not a cord (it jumps across the head), so still no numbers."""
    with tarfile.open(DICOM_DATA / "dcm_qa_ge.tar.xz") as tar:
        tar.extractall(tmp_path, filter="data")
    for path in (tmp_path / "dcm_qa_ge" / "In").rglob("*"):
        if path.is_file():
            ds = pydicom.dcmread(path, force=True)
            if "BodyPartExamined" in ds:
                del ds.BodyPartExamined
            ds.SeriesDescription = "DTI"
            ds.save_as(path)
    _refused(
        ["analyze", str(tmp_path / "dcm_qa_ge" / "In"), "--out", str(tmp_path / "out"), "--model-dir", str(decoder_dir)],
        capsys, "no spinal cord was found",
    )


@pytest.fixture(scope="module")
def small_cervical(real_dwi_paths, tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The real cervical DWI cut to its first b=0 and 8 directions (a quick DICOM series)."""
    folder = tmp_path_factory.mktemp("small")
    dwi = load_nifti_dwi(real_dwi_paths["image"], bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"])
    keep = list(range(9)) + [31]
    img = nib.load(str(real_dwi_paths["image"]))
    image = folder / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., keep], img.affine, img.header), str(image))
    return image, dwi.bvals[keep], dwi.bvecs[keep]


def _dicom(small_cervical, dest: Path, **kwargs: object) -> Path:
    image, bvals, bvecs = small_cervical
    write_dicom_series(image, bvals, bvecs, dest, **kwargs)  # type: ignore[arg-type]
    return dest


def test_a_head_series_is_refused_by_its_description(small_cervical, shipped, tmp_path, monkeypatch) -> None:
    """Refused as soon as the series is chosen: its geometry is not checked nor its b=0 source
    images located (each a read of every file, seconds on a large enhanced series)."""
    study = _dicom(small_cervical, tmp_path / "in", series_description="DTI brain")

    def not_now(*args: object, **kwargs: object) -> None:
        raise AssertionError("a head series was read on after it was chosen")

    monkeypatch.setattr(dicom_ingest, "check_series_geometry", not_now)
    monkeypatch.setattr(dicom_ingest, "locate_b0_sources", not_now)
    with pytest.raises(NoSpinalCordError, match="head or brain series"):
        pipeline.analyze([study], out_dir=tmp_path / "out", segmenter=shipped)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert pipeline.convert([study], out_dir=tmp_path / "converted")  # converting is no analysis: not refused


def test_a_head_body_part_is_refused() -> None:
    for part in ("HEAD", "brain", "Skull"):
        with pytest.raises(NoSpinalCordError, match="BodyPartExamined"):
            check_body_part(part, "DTI")
    check_body_part("CSPINE", "DTI cervical")
    check_body_part(None, "DTI headrest off")  # a word, not a substring


# --- implausible measures ------------------------------------------------------------------------


def test_b_values_times_1000_are_refused(real_dwi_paths, shipped, tmp_path, capsys) -> None:
    bval = tmp_path / "x1000.bval"
    bval.write_text(" ".join(f"{float(b) * 1000:g}" for b in real_dwi_paths["bval"].read_text().split()) + "\n")
    with pytest.raises(ImplausibleMeasuresError, match="b-values"):
        pipeline.analyze([real_dwi_paths["image"]], bval=bval, bvec=real_dwi_paths["bvec"], out_dir=tmp_path / "o", segmenter=shipped)
    _refused(
        ["analyze", str(real_dwi_paths["image"]), "--bval", str(bval), "--bvec", str(real_dwi_paths["bvec"]), "--out", str(tmp_path / "out")],
        capsys, "median MD", "b-values",
    )


def test_a_negative_scl_slope_is_refused(real_dwi_paths, shipped, tmp_path, capsys) -> None:
    img = nib.load(str(real_dwi_paths["image"]))
    flipped = nib.Nifti1Image(np.asarray(img.dataobj.get_unscaled()), img.affine, img.header.copy())
    flipped.header.set_slope_inter(-1.0, 0.0)
    image = tmp_path / "negative.nii.gz"
    nib.save(flipped, str(image))
    assert float(np.asarray(nib.load(str(image)).dataobj).max()) <= 0
    with pytest.raises(ImplausibleMeasuresError, match="scl_slope"):
        pipeline.analyze([image], bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"], out_dir=tmp_path / "o", segmenter=shipped)
    _refused(
        ["analyze", str(image), "--bval", str(real_dwi_paths["bval"]), "--bvec", str(real_dwi_paths["bvec"]), "--out", str(tmp_path / "out")],
        capsys, "scl_slope",
    )


@pytest.mark.parametrize(
    ("md", "fa", "snr", "words"),
    [
        (0.9e-6, 0.75, 6.0, "s/m\\^2"),
        (3.1e-3, 0.1, 6.0, "too small"),
        (0.8e-3, 0.0, 6.0, "FA is 0"),
        (0.8e-3, 0.7, -5.0, "negative"),
    ],
)
def test_measures_no_cord_has_are_refused(md: float, fa: float, snr: float, words: str) -> None:
    plausibility.check_measures({"md": {"median": 0.83e-3}, "fa": {"median": 0.76, "mean": 0.73}}, b0_snr=6.1)
    with pytest.raises(ImplausibleMeasuresError, match=words):
        plausibility.check_measures({"md": {"median": md}, "fa": {"median": fa, "mean": fa}}, b0_snr=snr)


# --- impossible geometry --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pixdim", "codes", "words"),
    [
        ((30.0, 1.0, 4.0), 1, "30"),
        ((0.01, 1.0, 4.0), 1, "0.01"),
        ((1.0, 1.0, 0.0), 0, "pixdim"),  # no qform/sform: never a silent 1 mm
    ],
    ids=["too large", "too small", "zero without qform or sform"],
)
def test_impossible_voxel_sizes_are_refused_before_any_work(pixdim, codes, words, decoder_dir, tmp_path, capsys) -> None:
    info = phantoms.region_phantom(tmp_path / "study")
    img = nib.load(str(info["image"]))
    image = tmp_path / "study" / "phantom.nii"  # beside phantom.bval / .bvec
    if codes:
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag(list(pixdim) + [1.0])), str(image))
    else:  # nibabel will not write a zero pixdim (it sets 1 mm): patch the bytes
        header = img.header.copy()
        header.set_qform(None, code=0)
        header.set_sform(None, code=0)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header), str(image))
        raw = bytearray(image.read_bytes())
        struct.pack_into("<3f", raw, 80, *pixdim)  # pixdim[1:4]
        image.write_bytes(bytes(raw))
        assert nib.load(str(image)).header.get_zooms()[:3] == (1.0, 1.0, 1.0)  # nibabel's silent default
    err = _refused(["analyze", str(image), "--out", str(tmp_path / "out"), "--model-dir", str(decoder_dir)], capsys, words)
    assert "voxel size" in err


def test_a_resampling_grid_is_bounded_before_it_is_allocated(decoder_dir) -> None:
    side = MAX_RESAMPLED_SLICE_PX // 10 + 1
    b0 = np.zeros((side, 8, 2), dtype=np.float32)  # 10 mm voxels to the decoder's 1 mm: too many pixels
    with pytest.raises(ImageError, match=f"more than the {MAX_RESAMPLED_SLICE_PX}"):
        Segmenter(decoder_dir).segment(b0, zooms_mm=(10.0, 10.0, 5.0))


def _edit(folder: Path, change) -> Path:
    for n, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        change(ds, n)
        ds.save_as(path)
    return folder


def test_dicom_without_pixel_spacing_is_refused(small_cervical, tmp_path, capsys) -> None:
    study = _edit(_dicom(small_cervical, tmp_path / "in"), lambda ds, n: delattr(ds, "PixelSpacing"))
    _refused(["analyze", str(study), "--out", str(tmp_path / "out")], capsys, "PixelSpacing")


def test_dicom_with_an_impossible_slice_thickness_is_refused(small_cervical, tmp_path, capsys) -> None:
    def thick(ds: pydicom.Dataset, n: int) -> None:
        ds.SliceThickness = 50.0

    study = _edit(_dicom(small_cervical, tmp_path / "in"), thick)
    _refused(["analyze", str(study), "--out", str(tmp_path / "out")], capsys, "SliceThickness", "50")


def test_dicom_images_all_at_one_position_are_refused(small_cervical, tmp_path) -> None:
    def one_place(ds: pydicom.Dataset, n: int) -> None:
        ds.ImagePositionPatient = [0.0, 0.0, 0.0]

    study = _edit(_dicom(small_cervical, tmp_path / "in"), one_place)
    with pytest.raises(InputError) as caught:
        pipeline.analyze([study], out_dir=tmp_path / "out", segmenter=Segmenter(SHIPPED_MODEL_DIR))
    assert isinstance(caught.value, ImageError) and "one position" in caught.value.detail, caught.value.detail


# --- one patient, one study ----------------------------------------------------------------------


def test_two_studies_in_one_upload_are_refused(tmp_path, capsys) -> None:
    for name in ("dcm_qa_ge", "dcm_qa_philips_dwi"):
        with tarfile.open(DICOM_DATA / f"{name}.tar.xz") as tar:
            tar.extractall(tmp_path / "upload", filter="data")
    err = _refused(["analyze", str(tmp_path / "upload"), "--out", str(tmp_path / "out")], capsys, "2 patient(s) and 2 studies")
    assert "Ax DWI TENSOR R2" in err and "DTI_Biobank_2mm_MB3S2_EPI" in err
    for ds in (pydicom.dcmread(p, stop_before_pixels=True, force=True) for p in (tmp_path / "upload").rglob("*") if p.is_file()):
        if ds.get("PatientName"):
            assert str(ds.PatientName) not in err
    with pytest.raises(MixedStudiesError):
        pipeline.analyze([tmp_path / "upload"], out_dir=tmp_path / "out", segmenter=Segmenter(SHIPPED_MODEL_DIR))
