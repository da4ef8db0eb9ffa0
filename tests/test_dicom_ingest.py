"""DICOM ingest: every vendor series converts like dcm2niix's reference, series choice, archives.

The data are the dcm_qa archives in ``tests/data/dicom`` (see its README): unpacked once per
session into a temporary folder.
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from core.errors import (
    ArchiveError,
    NoDiffusionSeriesError,
    UnreadableFileError,
    UnsupportedInputError,
)
from core.ingest.archive import collect_inputs
from core.ingest.dicom import ingest_dicom
from core.ingest.dicom_convert import convert_group
from core.ingest.dicom_series import describe_series, group_series
from core.ingest.gradients import read_bvals, read_bvecs
from core.ingest.rules import UploadLimits

DATA = Path(__file__).parent / "data" / "dicom"
DATASETS = ("dcm_qa_ge", "dcm_qa_uih", "dcm_qa_canon_61", "dcm_qa_decubitus", "dcm_qa_philips_dwi", "dcm_qa_sag", "dcm_qa_xa30")

# (data set, input folder under the data set, series number, enhanced?, reference stem)
REF_CASES = [
    ("dcm_qa_ge", "In", 1, False, "Ax_DWI_TENSOR_R2_1"),
    ("dcm_qa_uih", "In", 9, False, "dti_tra_dir16_AP_9_134431"),
    ("dcm_qa_canon_61", "In/cl", 3000, False, "3000_DTI_PA-ortho_cl"),
    ("dcm_qa_canon_61", "In/enh", 3000, True, "3000_DTI_PA-ortho_enh"),
    ("dcm_qa_canon_61", "In/enh", 9000, True, "9000_SAG_DTI_PA-ortho_enh"),
    ("dcm_qa_decubitus", "In/HFS", 4, False, "ep2d_diff_mddw_20_p2_20220407150138"),
    ("dcm_qa_decubitus", "In/HFP", 3, False, "ep2d_diff_mddw_20_p2_20220407151756"),
    ("dcm_qa_philips_dwi", "In", 701, False, "701_DTI_Biobank_2mm_MB3S2_EPI_cl"),
    ("dcm_qa_sag", "In", 4, False, "4_DWI_SagAPmosaic"),
    ("dcm_qa_xa30", "In", 10, True, "10_DWI_dir80_PA"),
]


@pytest.fixture(scope="session")
def dicom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All archives unpacked; the Philips files gzipped again, as in the original export."""
    root = tmp_path_factory.mktemp("dicom")
    for name in DATASETS:
        with tarfile.open(DATA / f"{name}.tar.xz") as tar:
            tar.extractall(root, filter="data")
    for path in (root / "dcm_qa_philips_dwi" / "In" / "cl" / "DICOM").iterdir():
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes(), compresslevel=1))
        path.unlink()
    return root


def _assert_gradients_match(bval: Path, bvec: Path, ref_bval: Path, ref_bvec: Path) -> None:
    """b-values within 1 s/mm^2; b-vectors within 1e-3, a whole vector's sign flip allowed."""
    got_b, want_b = read_bvals(bval), read_bvals(ref_bval)
    assert got_b.shape == want_b.shape
    np.testing.assert_allclose(got_b, want_b, atol=1.0)
    got_v, want_v = read_bvecs(bvec), read_bvecs(ref_bvec)
    assert got_v.shape == want_v.shape
    for g, w in zip(got_v, want_v):
        assert min(np.abs(g - w).max(), np.abs(g + w).max()) < 1e-3, (g, w)


@pytest.mark.parametrize("case", REF_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in REF_CASES])
def test_series_converts_like_reference(dicom_data: Path, tmp_path: Path, case: tuple[str, str, int, bool, str]) -> None:
    name, folder, number, enhanced, stem = case
    collected = collect_inputs([dicom_data / name / folder], workdir=tmp_path / "files")
    groups, _ = group_series(collected.files)
    matching = [g for g in groups if g.series_number == number and (g.n_frames > len(g.files)) == enhanced]
    group = max(matching, key=lambda g: g.n_frames)  # Philips adds a private one-image object
    outputs = [o for o in convert_group(group, workdir=tmp_path / "conv", timeout_s=60) if o.bval is not None]
    assert len(outputs) == 1
    ref = dicom_data / name / "Ref"
    assert outputs[0].bvec is not None
    _assert_gradients_match(outputs[0].bval, outputs[0].bvec, ref / f"{stem}.bval", ref / f"{stem}.bvec")


def test_decubitus_prone_is_supine_turned_about_the_bore(dicom_data: Path, tmp_path: Path) -> None:
    """HFS and HFP ran the same scanner-frame gradient table: each matches its own Ref, and in
    world (patient RAS+) space the prone vectors are the supine ones turned 180 degrees about the
    bore axis (x and y negated), as they must be when the patient lies face down."""
    hfs = ingest_dicom([dicom_data / "dcm_qa_decubitus" / "In" / "HFS"], workdir=tmp_path / "hfs")
    hfp = ingest_dicom([dicom_data / "dcm_qa_decubitus" / "In" / "HFP"], workdir=tmp_path / "hfp")
    ref = dicom_data / "dcm_qa_decubitus" / "Ref"
    for result, stem in ((hfs, "ep2d_diff_mddw_20_p2_20220407150138"), (hfp, "ep2d_diff_mddw_20_p2_20220407151756")):
        _assert_gradients_match(result.bval, result.bvec, ref / f"{stem}.bval", ref / f"{stem}.bvec")
    turned = hfs.dwi.bvecs * np.array([-1.0, -1.0, 1.0])
    for g, w in zip(hfp.dwi.bvecs, turned):
        assert min(np.abs(g - w).max(), np.abs(g + w).max()) < 0.01, (g, w)
    assert not np.allclose(hfp.dwi.bvecs, hfs.dwi.bvecs, atol=0.1)
    assert hfp.series.seg_unsupported_reason is not None and "mosaic" in hfp.series.seg_unsupported_reason


def test_ingest_ge_gives_dwi_and_b0_sources(dicom_data: Path, tmp_path: Path) -> None:
    result = ingest_dicom([dicom_data / "dcm_qa_ge" / "In"], workdir=tmp_path)
    dwi = result.dwi
    assert dwi.shape == (256, 256, 2) and dwi.bvals.size == 7
    assert dwi.provenance.format == "dicom"
    assert dwi.provenance.manufacturer == "GE MEDICAL SYSTEMS"
    assert dwi.provenance.series_description == "Ax DWI TENSOR R2"
    assert len(dwi.provenance.files) == 14 and result.warnings == ()
    series = result.series
    assert series.layout == "single-frame" and series.seg_supported
    assert [s.slice_index for s in series.b0_sources] == [0, 1]
    b0_volume = int(np.flatnonzero(dwi.bvals == 0)[0])
    for source in series.b0_sources:  # the referenced image is the b=0 image of its slice
        pixels = pydicom.dcmread(source.path).pixel_array.astype(np.float32)
        assert np.isclose(pixels.sum(), dwi.data[..., source.slice_index, b0_volume].sum())


def test_ingest_gzipped_philips(dicom_data: Path, tmp_path: Path) -> None:
    """gzipped DICOM, a DICOMDIR, a text file and non-image objects in the same upload."""
    result = ingest_dicom([dicom_data / "dcm_qa_philips_dwi" / "In"], workdir=tmp_path)
    assert result.dwi.bvals.size == 17 and int((result.dwi.bvals == 0).sum()) == 5  # b=0.001-0.004
    assert len(result.series.b0_sources) == 32


def test_ingest_enhanced_xa30_references_frames(dicom_data: Path, tmp_path: Path) -> None:
    result = ingest_dicom([dicom_data / "dcm_qa_xa30" / "In"], workdir=tmp_path)
    series = result.series
    assert series.layout == "multi-frame" and series.seg_supported
    assert len(series.b0_sources) == 39
    assert all(s.frame_number is not None for s in series.b0_sources)
    assert len({s.path for s in series.b0_sources}) == 1


def _fake_series(sources: list[Path], out_dir: Path, *, description: str, n: int) -> list[Path]:
    """``n`` non-diffusion images made from GE files: new series UID, no diffusion tags."""
    out_dir.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    paths = []
    for i in range(n):
        ds = pydicom.dcmread(sources[i % len(sources)])
        for tag in (0x00431039, 0x001910BB, 0x001910BC, 0x001910BD, 0x00189087):
            if tag in ds:
                del ds[tag]
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesDescription = description
        ds.SeriesNumber = 100 + n
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(5 * i)]
        path = out_dir / f"{description.replace(' ', '_')}_{i}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def test_dwi_chosen_among_other_series(dicom_data: Path, tmp_path: Path) -> None:
    ge = sorted((dicom_data / "dcm_qa_ge" / "In").rglob("*MRDC*"))
    t2 = tmp_path / "t2"
    _fake_series(ge, t2, description="T2 sagittal", n=15)
    result = ingest_dicom([dicom_data / "dcm_qa_ge" / "In", t2], workdir=tmp_path / "work")
    assert result.dwi.provenance.series_description == "Ax DWI TENSOR R2"
    assert result.warnings == ()


def test_no_diffusion_series_names_what_was_found(dicom_data: Path, tmp_path: Path) -> None:
    ge = sorted((dicom_data / "dcm_qa_ge" / "In").rglob("*MRDC*"))
    up = tmp_path / "upload"
    _fake_series(ge, up / "t2", description="T2 sagittal", n=15)
    _fake_series(ge, up / "loc", description="Localizer", n=3)
    with pytest.raises(NoDiffusionSeriesError) as info:
        ingest_dicom([up], workdir=tmp_path / "work")
    detail = info.value.detail
    assert "2 series (T2 sagittal: 15 images; Localizer: 3 images)" in detail
    assert "none is a diffusion series" in detail


def test_too_few_directions_is_explained(dicom_data: Path, tmp_path: Path) -> None:
    """The GE DWI cut to its first 4 volumes (b=0 + 3 directions): no tensor possible."""
    ge = sorted((dicom_data / "dcm_qa_ge" / "In").rglob("*MRDC*"), key=lambda p: int(p.name.split(".")[-1]))
    up = tmp_path / "upload"
    up.mkdir()
    for path in ge[:8]:  # instance order: both slices of each volume in turn
        shutil.copy(path, up / path.name)
    with pytest.raises(NoDiffusionSeriesError, match="too few diffusion directions"):
        ingest_dicom([up], workdir=tmp_path / "work")


def _as_one_study(source: Path, like: Path, dest: Path) -> Path:
    """The DICOM files under ``source`` copied into the patient and study of ``like``'s first file."""
    first = pydicom.dcmread(next(p for p in sorted(like.rglob("*")) if p.is_file()), stop_before_pixels=True)
    dest.mkdir(parents=True)
    for n, path in enumerate(sorted(p for p in source.rglob("*") if p.is_file())):
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.StudyInstanceUID = first.PatientID, first.StudyInstanceUID
        ds.save_as(dest / f"{n:05d}.dcm")
    return dest


def test_two_diffusion_series_most_volumes_wins_with_warning(dicom_data: Path, tmp_path: Path) -> None:
    """Two diffusion series of one study (the UIH series moved into the GE study): one is chosen."""
    uih = _as_one_study(dicom_data / "dcm_qa_uih" / "In", dicom_data / "dcm_qa_ge" / "In", tmp_path / "uih")
    result = ingest_dicom([dicom_data / "dcm_qa_ge" / "In", uih], workdir=tmp_path / "work")
    assert result.dwi.bvals.size == 17
    assert result.dwi.provenance.series_description == "dti_tra_dir16_AP_SaveBySlc"
    [warning] = result.warnings
    assert "2 diffusion series" in warning and "'dti_tra_dir16_AP_SaveBySlc'" in warning
    assert "'Ax DWI TENSOR R2' (series 1, 7 volumes)" in warning
    assert result.dwi.provenance.warnings == result.warnings
    assert result.series.layout == "mosaic" and not result.series.seg_supported


def test_upload_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedInputError, match="none of the 1 uploaded files is a DICOM image"):
        ingest_dicom([tmp_path / "notes.txt"], workdir=tmp_path / "work")


def test_describe_series(dicom_data: Path, tmp_path: Path) -> None:
    collected = collect_inputs([dicom_data / "dcm_qa_canon_61" / "In" / "enh"], workdir=tmp_path)
    groups, _ = group_series(collected.files)
    assert describe_series(groups) == "2 series (DTI_PA-ortho: 520 images; SAG_DTI_PA-ortho: 520 images)"


# --------------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------------


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)
    return path


def test_zip_with_nested_folders_and_gz_entries(dicom_data: Path, tmp_path: Path) -> None:
    ge = sorted((dicom_data / "dcm_qa_ge" / "In").rglob("*MRDC*"))
    entries = {}
    for i, path in enumerate(ge):
        if i % 2:
            entries[f"study/a/b/{path.name}.gz"] = gzip.compress(path.read_bytes())
        else:
            entries[f"study/{path.name}"] = path.read_bytes()
    entries["__MACOSX/study/._x"] = b"junk"
    upload = _zip(tmp_path / "upload.zip", entries)
    result = ingest_dicom([upload], workdir=tmp_path / "work")
    assert result.dwi.bvals.size == 7
    assert [d.name for d in result.dwi.provenance.files] == ["upload.zip"]


def test_collect_gz_file_and_folder(tmp_path: Path) -> None:
    src = tmp_path / "src" / "deep" / "er"
    src.mkdir(parents=True)
    (src / "a.dcm.gz").write_bytes(gzip.compress(b"A" * 100))
    (src / "b").write_bytes(b"B")
    collected = collect_inputs([tmp_path / "src"], workdir=tmp_path / "out")
    assert sorted(p.read_bytes()[:1] for p in collected.files) == [b"A", b"B"]
    assert all(p.parent == tmp_path / "out" for p in collected.files)
    assert any(p.name.endswith("a.dcm") for p in collected.files)


@pytest.mark.parametrize("name", ["../evil.dcm", "/etc/evil.dcm", "a/../../evil.dcm", "C:/evil.dcm"])
def test_zip_path_traversal_refused(tmp_path: Path, name: str) -> None:
    upload = _zip(tmp_path / "up.zip", {"ok.dcm": b"x", name: b"y"})
    with pytest.raises(ArchiveError, match="unsafe path"):
        collect_inputs([upload], workdir=tmp_path / "work")
    assert not (tmp_path / "evil.dcm").exists()


def test_zip_symlink_refused(tmp_path: Path) -> None:
    upload = tmp_path / "up.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        info = zipfile.ZipInfo("link.dcm")
        info.create_system = 3
        info.external_attr = (0o120777 << 16)
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="symbolic link"):
        collect_inputs([upload], workdir=tmp_path / "work")


def test_zip_bomb_refused(tmp_path: Path) -> None:
    upload = _zip(tmp_path / "bomb.zip", {"big.dcm": bytes(16 * 1024 * 1024)})
    with pytest.raises(ArchiveError, match="zip bomb"):
        collect_inputs([upload], workdir=tmp_path / "work")


def test_zip_size_and_count_limits(tmp_path: Path) -> None:
    upload = _zip(tmp_path / "many.zip", {f"{i}.dcm": b"x" for i in range(12)})
    with pytest.raises(ArchiveError, match="more than the 10 accepted"):
        collect_inputs([upload], workdir=tmp_path / "w1", limits=UploadLimits(max_files=10))
    upload = _zip(tmp_path / "big.zip", {"a.dcm": np.random.default_rng(0).bytes(5000)})
    with pytest.raises(ArchiveError, match="GiB"):
        collect_inputs([upload], workdir=tmp_path / "w2", limits=UploadLimits(max_total_bytes=4000))


def test_gzip_bomb_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.dcm.gz"
    bomb.write_bytes(gzip.compress(bytes(16 * 1024 * 1024)))
    with pytest.raises(ArchiveError, match="compression bomb"):
        collect_inputs([bomb], workdir=tmp_path / "work")


def test_nested_zip_refused(tmp_path: Path) -> None:
    inner = _zip(tmp_path / "inner.zip", {"a.dcm": b"x"})
    upload = _zip(tmp_path / "outer.zip", {"inner.zip": inner.read_bytes()})
    with pytest.raises(ArchiveError, match="nested archives are not accepted"):
        collect_inputs([upload], workdir=tmp_path / "work")


def test_empty_zip(tmp_path: Path) -> None:
    upload = _zip(tmp_path / "empty.zip", {})
    with pytest.raises(ArchiveError, match="empty.zip is an empty zip archive"):
        collect_inputs([upload], workdir=tmp_path / "work")


def test_corrupt_zip(tmp_path: Path) -> None:
    good = _zip(tmp_path / "good.zip", {"a.dcm": b"x" * 1000}).read_bytes()
    (tmp_path / "cut.zip").write_bytes(good[: len(good) // 2])
    with pytest.raises(ArchiveError, match="cut.zip is not a readable zip archive"):
        collect_inputs([tmp_path / "cut.zip"], workdir=tmp_path / "work")
    (tmp_path / "junk.zip").write_bytes(b"this is not a zip file at all")
    with pytest.raises(ArchiveError, match="junk.zip is not a readable zip archive"):
        collect_inputs([tmp_path / "junk.zip"], workdir=tmp_path / "work2")


def test_zip_entry_with_bad_data(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.dcm", np.random.default_rng(1).bytes(4000))
    data = bytearray(buffer.getvalue())
    data[60:200] = bytes(140)  # damage the compressed stream, keep the directory
    (tmp_path / "bad.zip").write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="bad.zip is corrupt"):
        collect_inputs([tmp_path / "bad.zip"], workdir=tmp_path / "work")


def test_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(np.random.default_rng(2).bytes(10000))
    (tmp_path / "IM_0001.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFileError, match="IM_0001.gz is a truncated or corrupt gzip file"):
        collect_inputs([tmp_path / "IM_0001.gz"], workdir=tmp_path / "work")


def test_symlinks_in_folders_are_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    up = tmp_path / "up"
    up.mkdir()
    (up / "a.dcm").write_bytes(b"x")
    (up / "link").symlink_to(secret)
    collected = collect_inputs([up], workdir=tmp_path / "work")
    assert [p.read_bytes() for p in collected.files] == [b"x"]
