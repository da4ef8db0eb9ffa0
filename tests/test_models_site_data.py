"""Training and fine-tuning from a site's own labelled data (`python -m models.train --data DIR`)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from models.generator import Acquisition, generate
from models.train import SiteDataError, load_site_data
from models.train import main as train_main

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "scsnet"
ACQ = Acquisition(spacing_mm=(0.9, 0.9), thickness_mm=5.0, shape=(48, 40), snr=30.0, pe_axis=1)


def _volume() -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, 3) b0 and labels in RAS voxel order from three synthetic slices."""
    slices = [generate(seed, acquisition=ACQ) for seed in (11, 12, 13)]
    return np.stack([s.b0 for s in slices], axis=2), np.stack([s.labels for s in slices], axis=2)


def _write_case(folder: Path, case: str, b0: np.ndarray, labels: np.ndarray, *, flip_x: bool = False) -> None:
    affine = np.diag([0.9, 0.9, 5.0, 1.0])
    if flip_x:  # stored right-to-left (LAS): same anatomy, other voxel order
        b0, labels = b0[::-1], labels[::-1]
        affine[0, 0] = -0.9
        affine[0, 3] = 0.9 * (b0.shape[0] - 1)
    nib.save(nib.Nifti1Image(b0.astype(np.float32), affine), folder / f"{case}_b0.nii.gz")
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), folder / f"{case}_labels.nii.gz")


def test_site_slices_follow_the_affine_not_the_stored_order(tmp_path: Path) -> None:
    b0, labels = _volume()
    _write_case(tmp_path, "ras", b0, labels)
    _write_case(tmp_path, "las", b0, labels, flip_x=True)
    slices = load_site_data(tmp_path)
    n = (labels.reshape(-1, 3) > 0).any(axis=0).sum()
    assert len(slices) == 2 * n  # every slice with cord, from both cases
    las, ras = slices[:n], slices[n:]  # cases in name order
    for (img_a, lab_a), (img_b, lab_b) in zip(las, ras):
        assert np.array_equal(lab_a, lab_b) and np.allclose(img_a, img_b)
    lab = ras[0][1]
    left, right = np.argwhere(np.isin(lab, [1, 2, 3, 4])).mean(0), np.argwhere(lab >= 5).mean(0)
    assert left[0] < right[0]  # the patient's left at smaller x on the model grid too


def test_fine_tuning_on_site_data_exports_a_model(tmp_path: Path) -> None:
    data = tmp_path / "site"
    data.mkdir()
    _write_case(data, "case1", *_volume())
    out = tmp_path / "model"
    train_main([
        "--out", str(out), "--data", str(data), "--synthetic-fraction", "0", "--init", str(SHIPPED / "scsnet.pt"),
        "--steps", "2", "--batch", "2", "--patch", "48", "--warmup-samples", "2", "--val-samples", "2",
        "--fresh", "1", "--log-every", "1", "--lr", "1e-4",
    ])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"] == json.loads((SHIPPED / "manifest.json").read_text())["parameters"]
    assert f"site data from {data}" in manifest["training"]["data"]
    assert "fine-tuned from" in manifest["training"]["data"] and manifest["training"]["steps"] == 2


@pytest.mark.parametrize("spoil, message", [
    ("no_labels", "has no matching case1_labels"),
    ("bad_code", "labels must be whole codes 0-8"),
    ("fractional", "labels must be whole codes 0-8"),
    ("other_grid", "not on the same voxel grid"),
    ("corrupt", "is not a readable NIfTI image"),
    ("empty", "no labelled cord slices"),
])
def test_unusable_site_data_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], spoil: str,
                                                   message: str) -> None:
    data = tmp_path / "site"
    data.mkdir()
    b0, labels = _volume()
    if spoil != "empty":
        _write_case(data, "case1", b0, labels)
    lab_path = data / "case1_labels.nii.gz"
    if spoil == "no_labels":
        lab_path.unlink()
    elif spoil == "bad_code":
        nib.save(nib.Nifti1Image(np.where(labels == 3, 9, labels).astype(np.uint8), np.diag([0.9, 0.9, 5.0, 1.0])), lab_path)
    elif spoil == "fractional":
        nib.save(nib.Nifti1Image(labels.astype(np.float32) * 0.5, np.diag([0.9, 0.9, 5.0, 1.0])), lab_path)
    elif spoil == "other_grid":
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.diag([0.8, 0.9, 5.0, 1.0])), lab_path)
    elif spoil == "corrupt":
        lab_path.write_bytes(lab_path.read_bytes()[:200])
    with pytest.raises(SiteDataError, match=message):
        load_site_data(data)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--out", str(tmp_path / "model"), "--data", str(data), "--steps", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "model" / "scsnet.onnx").exists()
