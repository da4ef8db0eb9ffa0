"""Benchmark studies: the real cervical DWI, and a synthetic full-field study built from it."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "tests" / "data" / "sct_tutorial_dmri"


def real_study() -> tuple[Path, Path, Path]:
    """(image, bval, bvec) of the bundled real cervical DWI (96x36x15, 35 volumes)."""
    return REAL / "dmri.nii.gz", REAL / "bvals.txt", REAL / "bvecs.txt"


def full_field_study(out_dir: Path, *, shape: tuple[int, int, int] = (128, 128, 20), n_volumes: int = 33, seed: int = 0) -> tuple[Path, Path, Path]:
    """A 128x128x20, 33-volume study: the real DWI's 96x36 field (with its cord) embedded in a
    full field of Rician noise at the real background level, its 15 slices extended to 20, and
    3 b=0 + 30 directions. Written as NIfTI with FSL gradient files beside it."""
    image, bval, bvec = real_study()
    img = nib.load(str(image))
    data = np.asarray(img.dataobj, dtype=np.float32)
    bvals = np.loadtxt(bval)
    bvecs = np.loadtxt(bvec)
    keep = [0, 31, 32] + [v for v in range(len(bvals)) if bvals[v] > 50][: n_volumes - 3]
    data, bvals, bvecs = data[..., keep], bvals[keep], bvecs[:, keep]
    rng = np.random.default_rng(seed)
    sigma = float(np.std(data[:, -3:, :, 3:]))  # the top rows hold only background
    noise = np.abs(rng.normal(0, sigma, shape + (len(keep),)) + 1j * rng.normal(0, sigma, shape + (len(keep),))).astype(np.float32)
    x0, y0 = (shape[0] - data.shape[0]) // 2, (shape[1] - data.shape[1]) // 2
    slices = np.resize(np.arange(data.shape[2]), shape[2])  # 0..14, 0..4
    noise[x0 : x0 + data.shape[0], y0 : y0 + data.shape[1]] = data[:, :, slices]
    affine = img.affine.copy()
    affine[:3, 3] -= affine[:3, :2] @ np.array([x0, y0])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fullfield.nii.gz"
    nib.save(nib.Nifti1Image(noise, affine), str(path))
    np.savetxt(out_dir / "fullfield.bval", bvals[None], fmt="%g")
    np.savetxt(out_dir / "fullfield.bvec", bvecs, fmt="%.6f")
    return path, out_dir / "fullfield.bval", out_dir / "fullfield.bvec"


def padded_study(out_dir: Path, *, target_bytes: int = 50_000_000, seed: int = 0) -> tuple[Path, Path, Path]:
    """The real DWI (int16, 15 slices, 35 volumes, its gradients unchanged) centred in a larger
    in-plane field of Rician noise at its background level, written as an uncompressed NIfTI-1
    of at least ``target_bytes``: a valid study the service accepts and could analyse."""
    image, bval, bvec = real_study()
    img = nib.load(str(image))
    data = np.asarray(img.dataobj)
    nz, nv = data.shape[2:]
    side = int(np.ceil(np.sqrt(target_bytes / (data.dtype.itemsize * nz * nv))))
    shape = (max(side, data.shape[0]), max(side, data.shape[1]), nz, nv)
    rng = np.random.default_rng(seed)
    sigma = float(np.std(data[:, -3:, :, 3:].astype(np.float32)))
    noise = np.hypot(rng.normal(0, sigma, shape).astype(np.float32), rng.normal(0, sigma, shape).astype(np.float32))
    field = np.clip(np.rint(noise), 0, np.iinfo(data.dtype).max).astype(data.dtype)
    x0, y0 = (shape[0] - data.shape[0]) // 2, (shape[1] - data.shape[1]) // 2
    field[x0 : x0 + data.shape[0], y0 : y0 + data.shape[1]] = data
    affine = img.affine.copy()
    affine[:3, 3] -= affine[:3, :2] @ np.array([x0, y0])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "padded.nii"
    out = nib.Nifti1Image(field, affine, img.header.copy())
    out.header.set_data_shape(shape)
    nib.save(out, str(path))
    return path, bval, bvec
