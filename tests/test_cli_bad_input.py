"""Bad input through the command line: exit 2, one specific line on stderr, nothing written."""

from __future__ import annotations

import gzip
import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import phantoms
import pytest

from cli.main import main

Case = Callable[[Path], list[str]]


def _study(tmp: Path, **kwargs: object) -> dict[str, object]:
    return phantoms.region_phantom(tmp / "study", **kwargs)  # type: ignore[arg-type]


def _rewrite(tmp: Path, *, data=None, bval: str | None = None, bvec: str | None = None) -> list[str]:
    info = _study(tmp)
    image = Path(info["image"])
    if data is not None:
        img = nib.load(str(image))
        nib.save(nib.Nifti1Image(data(np.asarray(img.dataobj)), img.affine), str(image))
    if bval is not None:
        image.with_name("phantom.bval").write_text(bval)
    if bvec is not None:
        image.with_name("phantom.bvec").write_text(bvec)
    return [str(image)]


def _bvec_text(vectors: np.ndarray) -> str:
    return "\n".join(" ".join(f"{v:.6f}" for v in row) for row in vectors.T) + "\n"


def _few_directions(tmp: Path, n: int) -> list[str]:
    info = _study(tmp, n_dirs=n)
    return [str(info["image"])]


def _truncated_gzip(tmp: Path) -> list[str]:
    image = Path(_study(tmp)["image"])
    raw = image.read_bytes()
    image.write_bytes(raw[: len(raw) // 2])
    return [str(image)]


def _junk(name: str) -> Case:
    def case(tmp: Path) -> list[str]:
        path = tmp / name
        path.write_bytes(b"this is not an image \x00\x01\x02" * 50)
        return [str(path)]

    return case


def _three_d(tmp: Path) -> list[str]:
    return _rewrite(tmp, data=lambda a: a[..., 0])


def _collinear(tmp: Path) -> list[str]:
    axes = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1.0]])
    vecs = np.concatenate([[[0, 0, 0]], np.tile(axes, (10, 1)), [[0, 0, 0]]])
    return _rewrite(tmp, bvec=_bvec_text(vecs))


def _long_vector(tmp: Path) -> list[str]:
    vecs = np.concatenate([[[0, 0, 0]], phantoms.gradient_scheme(30), [[0, 0, 0]]])
    vecs[5] *= 2.0
    return _rewrite(tmp, bvec=_bvec_text(vecs))


def _missing_gradients(tmp: Path) -> list[str]:
    image = Path(_study(tmp)["image"])
    image.with_name("phantom.bval").unlink()
    return [str(image)]


def _empty_zip(tmp: Path) -> list[str]:
    path = tmp / "study.zip"
    with zipfile.ZipFile(path, "w"):
        pass
    return [str(path)]


def _corrupt_zip(tmp: Path) -> list[str]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.dcm", b"x" * 5000)
    path = tmp / "study.zip"
    path.write_bytes(buf.getvalue()[:200])
    return [str(path)]


def _gz_junk(tmp: Path) -> list[str]:
    path = tmp / "IM0001.gz"
    payload = gzip.compress(np.random.default_rng(0).bytes(20000))
    path.write_bytes(payload[: len(payload) // 2])
    return [str(path)]


def _folder_without_dicom(tmp: Path) -> list[str]:
    folder = tmp / "study"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "notes.txt").write_text("hello")
    (folder / "readme.pdf").write_bytes(b"%PDF-1.4 junk")
    return [str(folder)]


def _empty_folder(tmp: Path) -> list[str]:
    folder = tmp / "empty"
    folder.mkdir()
    return [str(folder)]


def _nifti_and_more(tmp: Path) -> list[str]:
    image = Path(_study(tmp)["image"])
    other = tmp / "other.dcm"
    other.write_bytes(b"x")
    return [str(image), str(other)]


def _zero_voxel_size(tmp: Path) -> list[str]:
    """A header whose sform collapses the third axis (written by hand: nibabel refuses to)."""
    image = Path(_study(tmp)["image"])
    img = nib.load(str(image))
    hdr = img.header.copy()
    hdr.set_qform(None, code=0)
    hdr["srow_z"] = [0.0, 0.0, 0.0, 0.0]
    hdr["sform_code"] = 1
    out = nib.Nifti1Image(np.asarray(img.dataobj), None, hdr)
    nib.save(out, str(image))
    assert abs(np.linalg.det(nib.load(str(image)).affine[:3, :3])) < 1e-9
    return [str(image)]


CASES: dict[str, tuple[Case, str]] = {
    "path that does not exist": (lambda t: [str(t / "nothing.nii.gz")], r"does not exist"),
    "truncated gzip NIfTI": (_truncated_gzip, r"truncated or corrupt|not a readable NIfTI"),
    "junk bytes named .nii.gz": (_junk("x.nii.gz"), r"not a readable NIfTI"),
    "junk bytes named .nii": (_junk("x.nii"), r"not a readable NIfTI"),
    "3D image": (_three_d, r"is 3D .* must be 4D"),
    "b-value count differs": (lambda t: _rewrite(t, bval="0 " + "800 " * 30 + "\n"), r"b-value file has 31 entries but the image has 32 volumes"),
    "b-vector count differs": (
        lambda t: _rewrite(t, bvec=_bvec_text(np.concatenate([[[0, 0, 0]], phantoms.gradient_scheme(30)]))),
        r"b-vector file has 31 entries but the image has 32 volumes",
    ),
    "NaN voxels": (lambda t: _rewrite(t, data=lambda a: np.where(a > 500, np.nan, a)), r"NaN or infinite voxel values"),
    "infinite voxels": (lambda t: _rewrite(t, data=lambda a: np.where(a > 500, np.inf, a)), r"NaN or infinite voxel values"),
    "no b=0 volume": (lambda t: _rewrite(t, bval="800 " * 32 + "\n"), r"no b=0 volume"),
    "under 6 directions": (lambda t: _few_directions(t, 5), r"5 distinct diffusion directions"),
    "collinear directions": (_collinear, r"3 distinct diffusion directions"),
    "b-vector not of unit length": (_long_vector, r"not of unit length"),
    "non-numeric b-values": (lambda t: _rewrite(t, bval="0 800 eight-hundred\n"), r"not a number"),
    "b-vector table of 4 rows": (lambda t: _rewrite(t, bvec="0 1\n0 1\n0 1\n0 1\n"), r"should have 3 rows"),
    "negative b-value": (lambda t: _rewrite(t, bval="0 -800" + " 800" * 30 + "\n"), r"negative b-values"),
    "NaN in b-vectors": (lambda t: _rewrite(t, bvec="nan " * 32 + "\n" + "0 " * 32 + "\n" + "1 " * 32 + "\n"), r"NaN or infinite"),
    "empty b-value file": (lambda t: _rewrite(t, bval=""), r"b-value file .* is empty"),
    "gradient files missing": (_missing_gradients, r"no gradient files for phantom.nii.gz"),
    "zero voxel size": (_zero_voxel_size, r"degenerate|zero voxel size|orientation"),
    "NIfTI mixed with other files": (_nifti_and_more, r"one NIfTI image per study"),
    "single-volume 4D": (lambda t: _rewrite(t, data=lambda a: a[..., :1], bval="0\n", bvec="0\n0\n0\n"), r"no usable volumes"),
    "empty zip": (_empty_zip, r"empty"),
    "corrupt zip": (_corrupt_zip, r"(corrupt|not a valid|cannot be read).*zip|zip.*(corrupt|not a valid|cannot be read)"),
    "truncated gzip file": (_gz_junk, r"gzip|truncated|corrupt"),
    "folder without DICOM": (_folder_without_dicom, r"DICOM"),
    "empty folder": (_empty_folder, r"no files|empty"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_a_specific_line(name: str, tmp_path: Path, decoder_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, pattern = CASES[name]
    inputs = make(tmp_path)
    out = tmp_path / "out"
    code = main(["analyze", *inputs, "--out", str(out), "--model-dir", str(decoder_dir)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("scsnet: error: ")
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_output_folder_with_other_files_is_not_overwritten(tmp_path: Path, decoder_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = phantoms.region_phantom(tmp_path / "study")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code = main(["analyze", str(info["image"]), "--out", str(out), "--model-dir", str(decoder_dir)])
    assert code == 2
    assert "holds other files" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_bval_with_dicom_input_is_refused(tmp_path: Path, decoder_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "dicom"
    folder.mkdir()
    (tmp_path / "x.bval").write_text("0\n")
    code = main(["analyze", str(folder), "--bval", str(tmp_path / "x.bval"), "--bvec", str(tmp_path / "x.bval"), "--out", str(tmp_path / "o"), "--model-dir", str(decoder_dir)])
    assert code == 2
    assert "DICOM carries its own gradients" in capsys.readouterr().err


def test_unavailable_model_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = phantoms.region_phantom(tmp_path / "study")
    code = main(["analyze", str(info["image"]), "--out", str(tmp_path / "o"), "--model-dir", str(tmp_path)])
    assert code == 3
    assert "no model manifest" in capsys.readouterr().err


def test_at_least_twenty_kinds() -> None:
    assert len(CASES) >= 20
