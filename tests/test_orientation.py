"""Orientation invariance on the real cervical DWI: re-storing the same acquisition with its
axes flipped or transposed (affine and b-vectors with them) must not change FA, MD or the
labels anywhere in world space, nor the principal direction in world space."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from core import pipeline
from core.ingest.nifti import load_nifti_dwi
from core.segment.runtime import Segmenter
from core.settings import SHIPPED_MODEL_DIR
from core.tensor.fit import TensorFitter


def _restore(image: Path, bval: Path, bvec: Path, out: Path, *, flips: tuple[int, ...], perm: tuple[int, int, int]) -> Path:
    """Write the same acquisition stored differently.

    The b-vectors are derived independently of scsnet's own conversion: FSL vectors are the
    voxel-frame vectors with x negated when det(affine) > 0. Flipping array axis k negates voxel
    component k; transposing axes permutes the components.
    """
    img = nib.load(str(image))
    data = np.asarray(img.dataobj)
    affine = img.affine.copy()
    fsl = np.loadtxt(bvec)  # (3, N)
    vox = fsl.copy()
    if np.linalg.det(affine[:3, :3]) > 0:
        vox[0] *= -1
    shape = data.shape
    for k in flips:
        data = np.flip(data, axis=k)
        flip = np.eye(4)
        flip[k, k] = -1
        flip[k, 3] = shape[k] - 1
        affine = affine @ flip
        vox[k] *= -1
    data = np.transpose(data, perm + (3,))
    swap = np.eye(4)[list(perm) + [3]].T
    affine = affine @ swap
    vox = vox[list(perm)]
    new_fsl = vox.copy()
    if np.linalg.det(affine[:3, :3]) > 0:
        new_fsl[0] *= -1
    out.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(out / "dwi.nii.gz"))
    np.savetxt(out / "dwi.bvec", new_fsl, fmt="%.8f")
    (out / "dwi.bval").write_text(Path(bval).read_text())
    return out / "dwi.nii.gz"


def _canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj), img.affine


VARIANTS = {
    "RAS (x flipped)": ((0,), (0, 1, 2)),
    "LPS (y flipped)": ((1,), (0, 1, 2)),
    "LAI (z flipped)": ((2,), (0, 1, 2)),
    "transposed x<->y": ((), (1, 0, 2)),
    "RPI transposed z<->x": ((0, 1, 2), (2, 1, 0)),
}


@pytest.fixture(scope="module")
def reference(real_dwi_paths, tmp_path_factory) -> dict[str, object]:
    # The shipped model: the instant decoder labels the real DWI's whole bright field of view,
    # which is (rightly) refused as no spinal cord; every variant's canonical array is the same.
    segmenter = Segmenter(SHIPPED_MODEL_DIR)
    out = tmp_path_factory.mktemp("ref") / "out"
    pipeline.analyze([real_dwi_paths["image"]], out_dir=out, segmenter=segmenter, bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"])
    return {"segmenter": segmenter, "out": out}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_maps_and_labels_are_the_same_in_world_space(variant, reference, real_dwi_paths, tmp_path) -> None:
    flips, perm = VARIANTS[variant]
    image = _restore(real_dwi_paths["image"], real_dwi_paths["bval"], real_dwi_paths["bvec"], tmp_path / "in", flips=flips, perm=perm)
    assert nib.aff2axcodes(nib.load(str(image)).affine) != ("L", "A", "S")
    out = tmp_path / "out"
    pipeline.analyze([image], out_dir=out, segmenter=reference["segmenter"])
    ref_out = reference["out"]
    for name in ("labels", "fa", "md"):
        ref, ref_aff = _canonical(ref_out / f"{name}.nii.gz")
        got, got_aff = _canonical(out / f"{name}.nii.gz")
        np.testing.assert_allclose(got_aff, ref_aff, atol=1e-4)
        if name == "labels":
            assert np.array_equal(got, ref)
            assert (ref > 0).sum() > 0
        else:
            np.testing.assert_allclose(got, ref, atol=1e-5 if name == "fa" else 1e-9)
    # outputs sit on the input's own grid
    assert nib.load(str(out / "labels.nii.gz")).shape == nib.load(str(image)).shape[:3]
    np.testing.assert_allclose(nib.load(str(out / "labels.nii.gz")).affine, nib.load(str(image)).affine, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_principal_direction_is_the_same_in_world_space(variant, real_dwi_paths, tmp_path) -> None:
    flips, perm = VARIANTS[variant]
    ref = load_nifti_dwi(real_dwi_paths["image"], bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"])
    image = _restore(real_dwi_paths["image"], real_dwi_paths["bval"], real_dwi_paths["bvec"], tmp_path, flips=flips, perm=perm)
    other = load_nifti_dwi(image)
    ref_c, _ = ref.to_canonical()
    other_c, _ = other.to_canonical()
    np.testing.assert_allclose(other_c.affine, ref_c.affine, atol=1e-4)
    # A block around the cord (canonical indices), where the tensor is well defined.
    block = (slice(40, 56), slice(8, 24), slice(None))
    m_ref = TensorFitter(ref_c).fit(ref_c.data[block])
    m_other = TensorFitter(other_c).fit(other_c.data[block])
    cos = np.abs(np.sum(m_ref.v1 * m_other.v1, axis=-1))
    assert np.median(cos) > 0.9999
    np.testing.assert_allclose(m_other.fa, m_ref.fa, atol=1e-5)


def test_real_cord_direction_is_along_the_cord(real_dwi_paths) -> None:
    """Plausibility: in the cord the principal direction is along world z (superior-inferior)."""
    dwi, _ = load_nifti_dwi(real_dwi_paths["image"], bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"]).to_canonical()
    block = (slice(44, 52), slice(12, 20), slice(None))
    maps = TensorFitter(dwi).fit(dwi.data[block])
    high = maps.fa > 0.5
    assert high.sum() > 50
    assert np.median(np.abs(maps.v1[high][:, 2])) > 0.9
    assert 0.5e-3 < np.median(maps.md[high]) < 1.2e-3


def test_oblique_storage_keeps_fa_and_rotates_direction(real_dwi_paths, tmp_path) -> None:
    """The same voxels with an oblique affine (10 degrees about z) and the same voxel-frame
    b-vectors: FA is unchanged and the world principal direction turns with the affine."""
    img = nib.load(str(real_dwi_paths["image"]))
    angle = np.deg2rad(10)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0, 0], [np.sin(angle), np.cos(angle), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), rot @ img.affine), str(tmp_path / "obl.nii.gz"))
    oblique = load_nifti_dwi(tmp_path / "obl.nii.gz", bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"])
    ref = load_nifti_dwi(real_dwi_paths["image"], bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"])
    block = (slice(40, 56), slice(8, 24), slice(None))
    m_ref = TensorFitter(ref).fit(ref.data[block])
    m_obl = TensorFitter(oblique).fit(oblique.data[block])
    np.testing.assert_allclose(m_obl.fa, m_ref.fa, atol=1e-5)
    turned = m_ref.v1 @ rot[:3, :3].T
    cos = np.abs(np.sum(turned * m_obl.v1, axis=-1))
    assert np.median(cos) > 0.9999
