"""Tensor fitting on analytic phantoms with known tensors."""

from __future__ import annotations

import numpy as np
import phantoms
import pytest

from core.ingest.dwi import DWI
from core.tensor.fit import TensorFitter, fit_mask

RNG = np.random.default_rng(1234)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _tensor_study(n_voxels: int, *, snr: float | None, rng: np.random.Generator) -> tuple[DWI, np.ndarray, np.ndarray, np.ndarray]:
    """A (n, 1, 1, N) study of random tensors; returns it with true FA, MD, v1 per voxel."""
    dirs = phantoms.gradient_scheme(30)
    bvals = np.concatenate([[0.0] * 3, np.full(30, 1000.0)])
    bvecs = np.concatenate([np.zeros((3, 3)), dirs])
    signal, fa, md, v1 = [], [], [], []
    for _ in range(n_voxels):
        ev = np.sort(rng.uniform(0.2e-3, 2.0e-3, 3))[::-1]
        rot = _random_rotation(rng)
        d = rot @ np.diag(ev) @ rot.T
        s = 1000.0 * np.exp(-bvals * np.einsum("ni,ij,nj->n", bvecs, d, bvecs))
        if snr is not None:
            sigma = 1000.0 / snr
            s = np.abs(s + rng.normal(0, sigma, s.shape) + 1j * rng.normal(0, sigma, s.shape))
        signal.append(s)
        f, m = phantoms.fa_md(tuple(ev))
        fa.append(f)
        md.append(m)
        v1.append(rot[:, 0])
    data = np.asarray(signal, dtype=np.float32).reshape(n_voxels, 1, 1, -1)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return DWI(data=data, affine=affine, bvals=bvals, bvecs=bvecs), np.array(fa), np.array(md), np.array(v1)


def test_noise_free_tensors_are_recovered_within_1e_3() -> None:
    dwi, fa, md, v1 = _tensor_study(200, snr=None, rng=RNG)
    maps = TensorFitter(dwi).fit(dwi.data)
    assert np.max(np.abs(maps.fa[:, 0, 0] - fa)) < 1e-3
    assert np.max(np.abs(maps.md[:, 0, 0] - md)) < 1e-3 * md.max()  # relative 1e-3
    # principal direction in world space, sign-free
    cos = np.abs(np.sum(maps.v1[:, 0, 0] * v1, axis=1))
    anisotropic = fa > 0.2
    assert np.min(cos[anisotropic]) > 0.999


def test_wm_like_tensors_at_snr_30_within_2_percent() -> None:
    """Mean over many voxels of one cord-like tensor: the bias of WLS at SNR 30 stays < 2 %."""
    dirs = phantoms.gradient_scheme(30)
    bvals = np.concatenate([[0.0] * 5, np.full(30, 800.0)])
    bvecs = np.concatenate([np.zeros((5, 3)), dirs])
    for evals in (phantoms.WM_EVALS, phantoms.GM_EVALS):
        true_fa, true_md = phantoms.fa_md(evals)
        s0 = np.full((400,), 1000.0)
        clean = phantoms.tensor_signal(s0, evals, np.array([0.0, 0.3, 1.0]), bvals, bvecs)
        sigma = 1000.0 / 30.0
        noisy = np.abs(clean + RNG.normal(0, sigma, clean.shape) + 1j * RNG.normal(0, sigma, clean.shape))
        dwi = DWI(data=noisy.reshape(20, 20, 1, -1).astype(np.float32), affine=np.eye(4), bvals=bvals, bvecs=bvecs)
        maps = TensorFitter(dwi).fit(dwi.data)
        assert abs(maps.fa.mean() - true_fa) / true_fa < 0.02, (evals, maps.fa.mean(), true_fa)
        assert abs(maps.md.mean() - true_md) / true_md < 0.02, (evals, maps.md.mean(), true_md)


def test_fit_inside_mask_only_and_units_mm2_per_s(tmp_path) -> None:
    info = phantoms.region_phantom(tmp_path)
    from core.ingest.nifti import load_nifti_dwi

    dwi = load_nifti_dwi(info["image"])
    mask = fit_mask(info["labels"], zooms_mm=dwi.zooms, margin_mm=2.0)
    assert mask.sum() > (info["labels"] > 0).sum()
    maps = TensorFitter(dwi).fit(dwi.data, mask=mask)
    assert np.all(maps.fa[~mask] == 0) and np.all(maps.md[~mask] == 0)
    for code in range(1, 9):
        inside = info["labels"] == code
        assert maps.md[inside].mean() == pytest.approx(info["md"][code], rel=1e-3)
        assert maps.fa[inside].mean() == pytest.approx(info["fa"][code], abs=1e-3)
    # principal direction along the cord (world z)
    cord = info["labels"] > 0
    assert np.abs(maps.v1[cord][:, 2]).min() > 0.999
