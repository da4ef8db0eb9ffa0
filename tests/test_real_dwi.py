"""The shipped model on the real cervical DWI, through the installed ``scsnet`` console script:
the cord is found on every slice, in anatomically sensible places, and the numbers are
plausible for healthy cervical cord (domain.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from core.labels import BY_CODE, WHITE_MATTER_CODES
from core.report.build import validate_report
from core.segment.csf_rim import CSF_MD_MM2_S, FA_FRACTION
from core.settings import SHIPPED_MODEL_DIR


@pytest.fixture(scope="module")
def run(real_dwi_paths, tmp_path_factory) -> tuple[dict, Path]:
    assert (SHIPPED_MODEL_DIR / "manifest.json").is_file(), "the shipped model is missing"
    scsnet = shutil.which("scsnet", path=str(Path(sys.executable).parent))
    assert scsnet, "the scsnet console script is not installed in this environment"
    out = tmp_path_factory.mktemp("real") / "out"
    proc = subprocess.run(
        [scsnet, "analyze", str(real_dwi_paths["image"]), "--bval", str(real_dwi_paths["bval"]), "--bvec", str(real_dwi_paths["bvec"]), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    return json.loads((out / "report.json").read_text()), out


def test_report_is_valid_and_complete(run) -> None:
    report, out = run
    validate_report(report)
    assert report["input"]["orientation"] == "LAS"
    assert report["acquisition"]["n_b0"] == 5 and report["acquisition"]["n_directions"] == 30
    assert report["model"]["name"] == "scsnet"
    for name in ("labels", "fa", "md", "ad", "rd", "b0"):
        assert nib.load(str(out / f"{name}.nii.gz")).shape == (96, 36, 15)


def test_cord_on_every_slice_with_plausible_area(run) -> None:
    report, _ = run
    assert report["qc"]["slices_without_cord"] == []
    areas = [s["cord_area_mm2"] for s in report["slices"]]
    assert len(areas) == 15
    assert min(areas) > 30 and max(areas) < 130, areas


def test_cord_sits_where_the_cord_is(run) -> None:
    """The cord is the low-MD, high-FA disc near array (48, 15): check the labels overlap it."""
    _, out = run
    labels = np.asarray(nib.load(str(out / "labels.nii.gz")).dataobj)
    ii, jj, _ = np.nonzero(labels)
    assert 40 <= np.median(ii) <= 56 and 8 <= np.median(jj) <= 22


def test_left_regions_lie_at_smaller_world_x_and_dorsal_behind_ventral(run) -> None:
    _, out = run
    img = nib.load(str(out / "labels.nii.gz"))
    labels = np.asarray(img.dataobj)
    idx = np.argwhere(labels > 0)
    world = nib.affines.apply_affine(img.affine, idx)
    codes = labels[tuple(idx.T)]
    centre = {code: world[codes == code].mean(axis=0) for code in range(1, 9) if (codes == code).any()}
    assert len(centre) == 8
    for code in range(1, 5):
        left, right = BY_CODE[code], BY_CODE[code + 4]
        assert centre[code][0] < centre[code + 4][0], (left.name, right.name)
    for dorsal, ventral in ((2, 3), (6, 7)):
        assert centre[dorsal][1] < centre[ventral][1]  # posterior = smaller world y


def test_cord_diffusion_is_healthy_cord_like(run) -> None:
    report, _ = run
    wm = [r for r in report["regions"] if r["key"].endswith(("lateral", "dorsal"))]
    for region in wm:
        assert 0.45 < region["fa"]["mean"] < 0.95, region["name"]
        assert 0.4e-3 < region["md"]["mean"] < 1.3e-3, region["name"]


def test_the_csf_rim_trim_takes_a_thin_csf_like_rim_and_no_more(run) -> None:
    """On the real cord the trim gives back a few outline voxels, each with CSF-like MD and low
    FA, and leaves every region (ventral funiculi included) with white-matter-like MD."""
    report, out = run
    rim = report["refinement"]
    assert rim["md_threshold_mm2_s"] == CSF_MD_MM2_S
    assert 0 < rim["voxels_removed"] < 0.15 * (rim["cord_voxels"] + rim["voxels_removed"])
    labels = np.asarray(nib.load(str(out / "labels.nii.gz")).dataobj)
    md = np.asarray(nib.load(str(out / "md.nii.gz")).dataobj)
    assert rim["cord_voxels"] == int((labels > 0).sum())
    assert np.median(md[labels > 0]) < 1.0e-3
    for region in report["regions"]:
        assert 0.4e-3 < region["md"]["mean"] < 1.2e-3, region["name"]
    # the FA line: 0.4 of each slice's white-matter median FA (taken before the trim), and the
    # outline it leaves is above it (bar a voxel uncovered under the second layer)
    assert rim["fa_fraction_of_white_matter"] == FA_FRACTION
    fa = np.asarray(nib.load(str(out / "fa.nii.gz")).dataobj)
    lines = rim["fa_threshold_by_slice"]
    assert len(lines) == labels.shape[2]
    below = outline = 0
    for z, line in enumerate(lines):
        cord = labels[:, :, z] > 0
        white = np.median(fa[:, :, z][np.isin(labels[:, :, z], WHITE_MATTER_CODES)])
        assert 0.9 < line / (FA_FRACTION * white) < 1.01, z
        edge = cord & ~ndimage.binary_erosion(cord, ndimage.generate_binary_structure(2, 1))
        below, outline = below + int((fa[:, :, z][edge] < line).sum()), outline + int(edge.sum())
    assert below <= 0.02 * outline


def test_the_refinement_by_md_adds_tissue_and_takes_csf(run, real_dwi_paths, tmp_path) -> None:
    """Against the network's first pass alone (``--no-refine``), the voxels the refinement
    (CSF-contrast pass, trim) adds have cord-like MD and white-matter-like FA, and the ones it
    removes CSF-like MD; each set is a thin layer."""
    report, out = run
    scsnet = shutil.which("scsnet", path=str(Path(sys.executable).parent))
    raw_out = tmp_path / "raw"
    proc = subprocess.run(
        [scsnet, "analyze", str(real_dwi_paths["image"]), "--bval", str(real_dwi_paths["bval"]), "--bvec", str(real_dwi_paths["bvec"]),
         "--out", str(raw_out), "--no-refine"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rim = report["refinement"]
    assert rim["csf_contrast_pass"] is True
    labels = np.asarray(nib.load(str(out / "labels.nii.gz")).dataobj)
    raw = np.asarray(nib.load(str(raw_out / "labels.nii.gz")).dataobj)
    md = np.asarray(nib.load(str(out / "md.nii.gz")).dataobj)
    fa = np.asarray(nib.load(str(out / "fa.nii.gz")).dataobj)
    added, removed = (labels > 0) & (raw == 0), (labels == 0) & (raw > 0)
    for change in (added, removed):
        assert 0 < change.sum() < 0.15 * (raw > 0).sum()
    assert np.median(md[added]) < 1.2e-3 and fa[added].mean() > 0.5
    assert np.median(md[removed]) > 1.6e-3
