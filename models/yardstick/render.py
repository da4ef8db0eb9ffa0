"""An independent renderer of cervical-cord DWI studies, for evaluation only.

Written apart from the training generator (:mod:`models.generator`, which it does not import)
so that a model is measured on images whose uncertain physics was chosen differently from the
images it learnt from. Only the anatomy is shared: the PAM50 tract atlas via
:func:`models.atlas.load_atlas` (C2-C7; the compact atlas holds no C1).

What is chosen differently, and how a study is made
---------------------------------------------------
1. **Geometry.** A stack of contiguous axial slices (4-6 mm, 6-10 slices) placed anywhere in
   C2-C7, in-plane voxel 0.8-1.25 mm, reduced field of view 48-72 mm. The slices are tilted
   2-8 degrees to the cord: each 0.25 mm sample of a slice reads the atlas at its own height
   along the cord (a per-point oblique section, not a shifted stack of cord sections).
2. **Anatomy** (0.25 mm): the atlas cross-section at that height, rotated (+-25 degrees), scaled
   0.85-1.15, optionally compressed front-to-back (none / mild 0.78-0.9 / severe 0.55-0.7 of the
   depth, widened by depth^-0.3), and warped by a smooth displacement (a few random plane waves,
   0.2-0.6 mm). Around it an elliptical thecal sac (its own CSF width per side; thin in front
   when compressed), an epidural layer, a bony ring and textured muscle.
3. **Tissue.** White-matter regions FA 0.6-0.8, gray matter 0.3-0.5, MD 0.8-1.1e-3 mm^2/s each
   region on its own (severe compression lowers white-matter FA by 5-15 %), fibres along the
   cord axis (so tilted with it), CSF isotropic 3e-3, epidural 1.0-1.6e-3, bone 0.4e-3,
   muscle FA 0.25. b0: gray matter 1.0-1.25 x white, CSF 1.0-2.6 x cord.
4. **Acquisition.** Gaussian slice profile (FWHM = thickness); EPI distortion as a smooth
   displacement along the phase-encode axis (A-P), 0.3-1.5 mm, with its intensity Jacobian;
   **k-space truncation** (FFT of the 0.25 mm image, the central matrix kept: a sinc point
   spread and Gibbs ringing) instead of block averaging; an N/2 ghost (2-6 %, half the field of
   view along PE); 4-8 receive coils with smooth complex sensitivities (their root-sum-of-squares
   is the shading) and complex Gaussian noise per coil, combined by root-sum-of-squares (a
   non-central chi magnitude), b0 SNR 14-30 in the cord; sub-voxel in-plane motion between
   the b=0 volumes; 15-32 directions (a Fibonacci hemisphere, randomly turned) at b 700-1000,
   1-3 b=0 volumes at the start, end or between; stored RAS or LAS.
5. **Truth.** The label of an acquired voxel is the **majority** of the hard 0.25 mm labels
   (each the most probable of background and the eight atlas regions) in its in-plane
   footprint, weighted by the slice profile (ties go to the lower code, so background); the
   labels follow the EPI distortion (a rater labels the distorted image). The nominal FA/MD of
   each region is kept; the evaluation's reference FA is the fitted FA on the true mask.

Arrays are ``[i, j, k]`` in the stored order; built in RAS (``i`` world +x = patient's right,
``j`` +y anterior, ``k`` +z superior) and flipped along ``i`` for LAS storage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from models.atlas import load_atlas

F64 = NDArray[np.float64]
Storage = Literal["RAS", "LAS"]
Compression = Literal["none", "mild", "severe"]
HIRES_MM = 0.25
CLASSES = ("r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "csf", "epidural", "bone", "muscle")
"""Tissue classes of the signal model; the first eight are region codes 1-8."""


@dataclass(frozen=True)
class Params:
    """Every random choice of one study (mm, degrees, s/mm^2, mm^2/s)."""

    voxel_mm: float
    thickness_mm: float
    matrix: int
    n_slices: int
    centre_z_mm: float  # atlas height (PAM50 z) of the stack's centre
    cord_xy_mm: tuple[float, float]  # cord centre in the field of view
    tilt_deg: float
    tilt_azimuth_deg: float
    rotation_deg: float
    scale: float
    compression: Compression
    depth_factor: float
    csf_margin_mm: tuple[float, float, float, float]  # right, left, anterior, posterior
    fa: tuple[float, ...]  # regions 1-8
    md: tuple[float, ...]  # regions 1-8
    gm_contrast: float
    csf_ratio: float
    bval: float
    n_dirs: int
    b0_positions: tuple[int, ...]
    snr: float
    n_coils: int
    ghost: float
    distortion_mm: float
    warp_mm: float
    storage: Storage
    motion: bool = True


@dataclass(frozen=True)
class Study:
    """A rendered study in its stored orientation.

    data : (X, Y, Z, N) float32 magnitude; affine : (4, 4) voxel -> world RAS+ (mm);
    bvals : (N,) s/mm^2; bvecs_world : (N, 3) unit, world RAS+ (zero for b=0);
    bvecs_fsl : (N, 3) the FSL convention of this image; labels : (X, Y, Z) uint8 codes 0-8;
    shares : (9, X, Y, Z) float32, each class's share of a voxel's profile-weighted votes
    (``labels`` is their argmax; ``1 - shares[0]`` is how much of the voxel is cord);
    fa, md : nominal tissue FA and MD (mm^2/s) per region code; sigma : noise SD per coil
    channel (real and imaginary part), in the units of ``data``.
    """

    data: NDArray[np.float32]
    affine: F64
    bvals: F64
    bvecs_world: F64
    bvecs_fsl: F64
    labels: NDArray[np.uint8]
    fa: dict[int, float]
    md: dict[int, float]
    sigma: float
    params: Params
    shares: NDArray[np.float32]

    def save(self, folder: Path, *, name: str = "dwi") -> tuple[Path, Path, Path]:
        """Write ``name.nii.gz``, ``.bval``, ``.bvec`` (FSL, 3 rows) and ``name_labels.nii.gz``."""
        import nibabel as nib

        folder.mkdir(parents=True, exist_ok=True)
        img = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(self.data, self.affine), img)
        nib.save(nib.Nifti1Image(self.labels, self.affine), folder / f"{name}_labels.nii.gz")
        bval, bvec = folder / f"{name}.bval", folder / f"{name}.bvec"
        bval.write_text(" ".join(f"{b:g}" for b in self.bvals) + "\n")
        bvec.write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in self.bvecs_fsl.T) + "\n")
        return img, bval, bvec


def draw_params(rng: np.random.Generator) -> Params:
    """Draw a study's choices (see the module docstring for the ranges)."""
    atlas_lo, atlas_hi = _atlas_z_range()
    voxel = float(rng.uniform(0.8, 1.25))
    thickness = float(rng.uniform(4.0, 6.0))
    n_slices = int(rng.integers(6, 11))
    half = n_slices * thickness / 2 + thickness
    compression: Compression = ("none", "none", "mild", "severe")[int(rng.integers(4))]  # type: ignore[assignment]
    depth = {"none": 1.0, "mild": rng.uniform(0.78, 0.9), "severe": rng.uniform(0.55, 0.7)}[compression]
    wm_fa = rng.uniform(0.6, 0.8)
    fa = [float(np.clip(wm_fa + rng.normal(0, 0.03), 0.6, 0.8)) for _ in range(3)]
    gm = float(rng.uniform(0.3, 0.5))
    fa_right = [float(np.clip(f + rng.normal(0, 0.015), 0.6, 0.8)) for f in fa]
    if compression == "severe":
        drop = rng.uniform(0.85, 0.95)
        fa, fa_right = [f * drop for f in fa], [f * drop for f in fa_right]
    fas = (*fa, gm, *fa_right, float(np.clip(gm + rng.normal(0, 0.02), 0.3, 0.5)))
    n_dirs = int(rng.integers(15, 33))
    n_b0 = int(rng.integers(1, 4))
    total = n_dirs + n_b0
    others = sorted(rng.choice(np.arange(1, total), size=n_b0 - 1, replace=False).tolist()) if n_b0 > 1 else []
    if n_b0 > 1 and rng.random() < 0.5:
        others[-1] = total - 1
    ap_front = rng.uniform(0.2, 0.8) if compression == "severe" else rng.uniform(0.6, 2.5)
    return Params(
        voxel_mm=voxel,
        thickness_mm=thickness,
        matrix=round(rng.uniform(48.0, 72.0) / voxel),
        n_slices=n_slices,
        centre_z_mm=float(rng.uniform(atlas_lo + half, atlas_hi - half)),
        cord_xy_mm=(float(rng.uniform(-6, 6)), float(rng.uniform(-6, 6))),
        tilt_deg=float(rng.uniform(2.0, 8.0)),
        tilt_azimuth_deg=float(rng.uniform(0, 360)),
        rotation_deg=float(rng.uniform(-25, 25)),
        scale=float(rng.uniform(0.85, 1.15)),
        compression=compression,
        depth_factor=float(depth),
        csf_margin_mm=(float(rng.uniform(1.0, 3.5)), float(rng.uniform(1.0, 3.5)), float(ap_front), float(rng.uniform(1.0, 3.5))),
        fa=tuple(fas),
        md=tuple(float(rng.uniform(0.8e-3, 1.1e-3)) for _ in range(8)),
        gm_contrast=float(rng.uniform(1.0, 1.25)),
        csf_ratio=float(rng.uniform(1.0, 2.6)),
        bval=float(rng.uniform(700, 1000)),
        n_dirs=n_dirs,
        b0_positions=tuple([0] + others),
        snr=float(rng.uniform(14, 30)),
        n_coils=int(rng.integers(4, 9)),
        ghost=float(rng.uniform(0.02, 0.06)),
        distortion_mm=float(rng.uniform(0.3, 1.5)),
        warp_mm=float(rng.uniform(0.2, 0.6)),
        storage=("RAS", "LAS")[int(rng.integers(2))],  # type: ignore[arg-type]
    )


def render(seed: int, *, params: Params | None = None) -> Study:
    """Render the study of ``seed``; ``params`` overrides the drawn choices (the noise, coils,
    warps and directions still come from ``seed``)."""
    p = params if params is not None else draw_params(np.random.default_rng([seed, 0]))
    rng = np.random.default_rng([seed, 1])
    bvals, bvecs = _gradients(rng, p)
    axis = _cord_axis(p)
    kf = max(1, round(p.voxel_mm / HIRES_MM))
    fractions, votes = _hires_slices(rng, p, kf, axis)  # (C, M, M, Z), (9, M, M, Z)
    acquired = acquire(rng, fractions, kf, ghost=p.ghost)  # (C, N, N, Z) complex
    labels = majority_labels(votes, kf)
    shares = vote_shares(votes, kf)
    signals = _class_signals(p, axis, bvals, bvecs)  # (C, V)
    data, sigma = receive(rng, p, acquired, signals, labels)
    affine = _affine(p)
    if p.storage == "LAS":
        data, labels, shares = data[::-1].copy(), labels[::-1].copy(), shares[:, ::-1].copy()
    return Study(
        data=data.astype(np.float32),
        affine=affine,
        bvals=bvals,
        bvecs_world=bvecs,
        bvecs_fsl=world_to_fsl_bvecs(bvecs, affine),
        labels=labels.astype(np.uint8),
        fa={c: p.fa[c - 1] for c in range(1, 9)},
        md={c: p.md[c - 1] for c in range(1, 9)},
        sigma=sigma,
        params=p,
        shares=shares,
    )


# --- geometry -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _atlas_arrays() -> tuple[NDArray[np.float32], F64, float, float, F64]:
    """Region probabilities (9, Z, H, W) with background first, atlas z (Z,), the cord
    centroid (i, j) in atlas pixels, and the cord half-width/half-depth (Z, 2) in mm."""
    a = load_atlas()
    regions = np.moveaxis(a.regions, 1, 0)  # (8, Z, H, W)
    background = np.clip(1.0 - regions.sum(axis=0), 0.0, 1.0)[None]
    probs = np.concatenate([background, regions]).astype(np.float32)
    cord = regions.sum(axis=0) > 0.5
    ij = np.argwhere(cord)[:, 1:].mean(axis=0)
    extent = np.zeros((cord.shape[0], 2))
    for z in range(cord.shape[0]):
        ii, jj = np.nonzero(cord[z])
        extent[z] = ((ii.max() - ii.min() + 1) / 2 * a.spacing_mm, (jj.max() - jj.min() + 1) / 2 * a.spacing_mm)
    return probs, a.z_mm.astype(np.float64), float(ij[0]), float(ij[1]), extent


def _atlas_z_range() -> tuple[float, float]:
    z = _atlas_arrays()[1]
    return float(z[0]), float(z[-1])


def _cord_axis(p: Params) -> F64:
    t, a = math.radians(p.tilt_deg), math.radians(p.tilt_azimuth_deg)
    return np.array([math.sin(t) * math.cos(a), math.sin(t) * math.sin(a), math.cos(t)])


def _to_cord_frame(axis: F64) -> F64:
    """Rotation (3, 3) taking world offsets to cord-frame offsets (cord axis -> +z), the
    smallest turn, so the cord frame's x stays close to the patient's right."""
    z = np.array([0.0, 0.0, 1.0])
    v = np.cross(axis, z)
    s, c = np.linalg.norm(v), float(axis @ z)
    if s < 1e-12:
        return np.eye(3)
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]]) / s
    return np.eye(3) + s * k + (1 - c) * (k @ k)


def _plane_waves(rng: np.random.Generator, n: int, wavelengths: tuple[float, float], dims: int) -> list[tuple[F64, float, float]]:
    waves = []
    for _ in range(n):
        d = rng.normal(size=dims)
        d /= np.linalg.norm(d)
        waves.append((d * 2 * np.pi / rng.uniform(*wavelengths), float(rng.uniform(0, 2 * np.pi)), float(rng.normal())))
    return waves


def _field(waves: list[tuple[F64, float, float]], *coords: F64) -> F64:
    out = np.zeros(np.broadcast(*coords).shape)
    for k, phase, amp in waves:
        out += amp * np.sin(sum(ki * c for ki, c in zip(k, coords)) + phase)
    return out / math.sqrt(max(len(waves), 1) / 2)


def _ellipse(a: F64, b: F64, ca: float, cb: float, ra: F64 | float, rb: F64 | float, edge: float = 0.3) -> F64:
    r = np.sqrt(((a - ca) / ra) ** 2 + ((b - cb) / rb) ** 2)
    mean_r = (np.mean(ra) + np.mean(rb)) / 2
    return 1.0 / (1.0 + np.exp((r - 1.0) * mean_r / edge))


def _hires_slices(rng: np.random.Generator, p: Params, kf: int, axis: F64) -> tuple[F64, F64]:
    """Class weight maps (C, M, M, Z) and profile-weighted label votes (9, M, M, Z) at
    ``voxel / kf`` (about 0.25 mm), already distorted along the phase-encode axis (y)."""
    probs, atlas_z, ci, cj, extent = _atlas_arrays()
    n, m, h = p.matrix, p.matrix * kf, p.voxel_mm / kf
    coord = (np.arange(m) + 0.5) * h - p.voxel_mm / 2 - (n - 1) / 2 * p.voxel_mm  # block n centred at voxel n
    x, y = np.meshgrid(coord, coord, indexing="ij")
    rot = _to_cord_frame(axis)
    warp_u, warp_v = _plane_waves(rng, 4, (6.0, 16.0), 2), _plane_waves(rng, 4, (6.0, 16.0), 2)
    warp_amp = p.warp_mm / 3.0  # the field's SD is 1: peaks near the drawn amplitude
    distortion = _plane_waves(rng, 3, (25.0, 60.0), 3)
    texture = _plane_waves(rng, 12, (2.0, 8.0), 2)
    sigma_s = p.thickness_mm / (2 * math.sqrt(2 * math.log(2)))
    offsets = np.linspace(-p.thickness_mm, p.thickness_mm, 9)
    weights = np.exp(-0.5 * (offsets / sigma_s) ** 2)
    weights /= weights.sum()
    ang = math.radians(p.rotation_deg)
    widen = p.depth_factor ** -0.3
    fractions = np.zeros((len(CLASSES), m, m, p.n_slices))
    votes = np.zeros((9, m, m, p.n_slices))
    for k in range(p.n_slices):
        zk = (k - (p.n_slices - 1) / 2) * p.thickness_mm
        dy = p.distortion_mm * _field(distortion, x, y, np.full_like(x, zk))
        jac = 1.0 - np.gradient(dy, h, axis=1)
        ys = y - dy  # the pixel at y shows the anatomy at y - dy
        for s, w in zip(offsets, weights):
            world = np.stack([x - p.cord_xy_mm[0], ys - p.cord_xy_mm[1], np.full_like(x, zk + s)])
            xc, yc, zc = np.tensordot(rot, world, axes=1)
            a = math.cos(ang) * xc + math.sin(ang) * yc  # rotate back into the anatomical frame
            b = -math.sin(ang) * xc + math.cos(ang) * yc
            au, bv = a / (p.scale * widen), b / (p.scale * p.depth_factor)
            au = au + warp_amp * _field(warp_u, au, bv)
            bv = bv + warp_amp * _field(warp_v, au, bv)
            zi = np.interp(p.centre_z_mm + zc, atlas_z, np.arange(len(atlas_z)))
            cls = _sample_atlas(probs, zi, ci + au / 0.5, cj + bv / 0.5)  # (9, M, M)
            hard = cls.argmax(axis=0)
            votes[:, :, :, k] += w * (hard[None] == np.arange(9)[:, None, None])
            cord = cls[1:].sum(axis=0)
            half = extent[round(float(np.median(zi)))] * p.scale * np.array([widen, p.depth_factor])
            fractions[:8, :, :, k] += w * jac * cls[1:]
            fractions[8:, :, :, k] += w * jac * _surroundings(p, a, b, half, cord, texture)
    return fractions, votes


def _sample_atlas(probs: NDArray[np.float32], zi: F64, ii: F64, jj: F64) -> F64:
    """Atlas class probabilities (9, ...) at fractional (z, i, j); outside the crop: background."""
    out = np.zeros((9,) + ii.shape)
    out[0] = 1.0
    inside = (ii > -1) & (ii < probs.shape[2]) & (jj > -1) & (jj < probs.shape[3])
    if inside.any():
        coords = np.stack([zi[inside], ii[inside], jj[inside]])
        for c in range(9):
            out[c][inside] = ndimage.map_coordinates(probs[c], coords, order=1, mode="nearest" if c == 0 else "constant",
                                                     cval=0.0)
        out[0][inside] = np.clip(1.0 - out[1:, inside].sum(axis=0), 0.0, 1.0)
    return out


def _surroundings(p: Params, a: F64, b: F64, half: F64, cord: F64, texture: list[tuple[F64, float, float]]) -> F64:
    """CSF, epidural, bone and muscle weights (4, ...) in the anatomical frame (a right, b
    anterior, mm from the cord centre); ``half`` is the cord's half-width and half-depth."""
    right, left, front, back = p.csf_margin_mm
    ra = np.where(a >= 0, half[0] + right, half[0] + left)
    rb = np.where(b >= 0, half[1] + front, half[1] + back)
    sac = _ellipse(a, b, 0.0, 0.0, ra, rb)
    canal = _ellipse(a, b, 0.0, 0.0, ra + 2.0, rb + 1.5, edge=0.5)
    outer = _ellipse(a, b, 0.0, 0.0, ra + 9.0, rb + 8.0, edge=0.8)
    rest = np.clip(1.0 - cord, 0.0, 1.0)
    csf = rest * sac
    epidural = rest * np.clip(canal - sac, 0.0, 1.0)
    bone = rest * np.clip(outer - np.maximum(canal, sac), 0.0, 1.0)
    muscle = rest * np.clip(1.0 - np.maximum(outer, canal), 0.0, 1.0)
    muscle = muscle * (1.0 + 0.15 * _field(texture, a, b))
    return np.stack([csf, epidural, bone, muscle])


# --- acquisition ---------------------------------------------------------------------------


def acquire(rng: np.random.Generator, hires: F64, kf: int, *, ghost: float) -> NDArray[np.complex128]:
    """k-space truncation of (C, M, M, Z) maps to (C, N, N, Z) and an N/2 ghost along y.

    Each acquired sample n is the band-limited image at the centre of its hi-res block
    (a half-block phase ramp), so the truth's footprints and the image share one grid."""
    m = hires.shape[1]
    n = m // kf
    spec = np.fft.fftshift(np.fft.fft2(hires, axes=(1, 2)), axes=(1, 2))
    lo = m // 2 - n // 2
    crop = np.fft.ifftshift(spec[:, lo:lo + n, lo:lo + n], axes=(1, 2))
    f = np.fft.fftfreq(n)
    delta = (kf - 1) / (2 * kf)  # block centre, in acquired voxels, from hi-res sample n * kf
    ramp = np.exp(2j * np.pi * f * delta)
    crop = crop * ramp[None, :, None, None] * ramp[None, None, :, None]
    image = np.fft.ifft2(crop, axes=(1, 2)) * (n * n) / (m * m)
    phase = np.exp(1j * rng.uniform(0, 2 * np.pi))
    return image + ghost * phase * np.roll(image, n // 2, axis=2)


def _vote_blocks(votes: F64, kf: int) -> F64:
    """(9, N, N, Z) the profile-weighted 0.25 mm votes (9, M, M, Z) summed over each acquired
    voxel's kf x kf footprint."""
    nine, m, _, z = votes.shape
    n = m // kf
    return votes.reshape(nine, n, kf, n, kf, z).sum(axis=(2, 4))


def majority_labels(votes: F64, kf: int) -> NDArray[np.uint8]:
    """Label (N, N, Z) of each acquired voxel: the class with most profile-weighted 0.25 mm
    votes (9, M, M, Z) in its kf x kf footprint; ties go to the lower code."""
    return _vote_blocks(votes, kf).argmax(axis=0).astype(np.uint8)


def vote_shares(votes: F64, kf: int) -> NDArray[np.float32]:
    """(9, N, N, Z) each class's share of those votes in an acquired voxel (they sum to 1;
    :func:`majority_labels` is the largest)."""
    blocks = _vote_blocks(votes, kf)
    return (blocks / np.maximum(blocks.sum(axis=0, keepdims=True), 1e-12)).astype(np.float32)


def tensor(fa: float, md: float, direction: F64) -> F64:
    """Cylindrically symmetric tensor (3, 3), mm^2/s, with the given FA and MD, main axis
    ``direction``: lambda1 = MD + 2d, lambda2 = lambda3 = MD - d, d = MD FA sqrt(3 / (9 - 6 FA^2))."""
    d = md * fa * math.sqrt(3.0 / (9.0 - 6.0 * fa * fa))
    e = direction / np.linalg.norm(direction)
    return (md - d) * np.eye(3) + 3 * d * np.outer(e, e)


def _class_signals(p: Params, axis: F64, bvals: F64, bvecs: F64) -> F64:
    """Noise-free signal (C, V) of each tissue class for every volume, b0 white matter = 1."""
    z = np.array([0.0, 0.0, 1.0])
    tensors = [tensor(p.fa[c], p.md[c], axis) for c in range(8)]
    tensors += [tensor(0.0, 3.0e-3, z), tensor(0.0, 1.3e-3, z), tensor(0.0, 0.4e-3, z), tensor(0.25, 1.5e-3, z)]
    cord_s0 = 1.0
    s0 = [1.0, 1.0, 1.0, p.gm_contrast, 1.0, 1.0, 1.0, p.gm_contrast, p.csf_ratio * cord_s0, 0.7, 0.15, 0.5]
    adc = np.array([[g @ d @ g for g in bvecs] for d in tensors])
    return np.array(s0)[:, None] * np.exp(-bvals[None, :] * adc)


def _coils(rng: np.random.Generator, n_coils: int, n: int, voxel: float) -> NDArray[np.complex128]:
    """Complex sensitivities (K, N, N), normalised so the mean root-sum-of-squares is 1."""
    coord = (np.arange(n) - (n - 1) / 2) * voxel
    x, y = np.meshgrid(coord, coord, indexing="ij")
    radius = n * voxel / 2 + rng.uniform(10, 30)
    angles = rng.uniform(0, 2 * np.pi) + np.arange(n_coils) * 2 * np.pi / n_coils
    reach = rng.uniform(35, 60)
    sens = []
    for t in angles:
        cx, cy = radius * math.cos(t), radius * math.sin(t)
        mag = 1.0 / (1.0 + ((x - cx) ** 2 + (y - cy) ** 2) / reach**2)
        ph = rng.uniform(0, 2 * np.pi) + rng.normal(0, 0.02) * x + rng.normal(0, 0.02) * y
        sens.append(mag * np.exp(1j * ph))
    s = np.array(sens)
    return s / np.sqrt(np.mean(np.sum(np.abs(s) ** 2, axis=0)))


def _shift(image: NDArray[np.complex128], shift: tuple[float, float]) -> NDArray[np.complex128]:
    n = image.shape[0]
    f = np.fft.fftfreq(n)
    ramp = np.exp(-2j * np.pi * (f[:, None] * shift[0] + f[None, :] * shift[1]))
    return np.fft.ifft2(np.fft.fft2(image, axes=(0, 1)) * ramp[:, :, None], axes=(0, 1))


def receive(rng: np.random.Generator, p: Params, acquired: NDArray[np.complex128], signals: F64,
             labels: NDArray[np.uint8]) -> tuple[NDArray[np.float32], float]:
    """Per volume: the object (moved for b=0 volumes after the first), coil images, complex
    Gaussian noise per coil, root-sum-of-squares. Returns (X, Y, Z, V) and the noise SD."""
    coils = _coils(rng, p.n_coils, p.matrix, p.voxel_mm)[..., None]  # (K, N, N, 1)
    rss = np.sqrt(np.sum(np.abs(coils) ** 2, axis=0))
    b0 = np.abs(np.tensordot(signals[:, p.b0_positions[0]], acquired, axes=1)) * rss
    cord = labels > 0
    scale = float(rng.uniform(300, 3000))
    sigma = float(b0[cord].mean() / p.snr) if cord.any() else 1.0 / p.snr
    out = np.zeros(acquired.shape[1:] + (signals.shape[1],), np.float32)
    for v in range(signals.shape[1]):
        image = np.tensordot(signals[:, v], acquired, axes=1)
        if p.motion and v in p.b0_positions[1:]:
            image = _shift(image, (float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5))))
        noise = rng.normal(0, sigma, (2,) + coils.shape[:1] + image.shape)
        channels = coils * image[None] + noise[0] + 1j * noise[1]
        out[..., v] = np.sqrt(np.sum(np.abs(channels) ** 2, axis=0))
    return out * scale, sigma * scale


def _gradients(rng: np.random.Generator, p: Params) -> tuple[F64, F64]:
    """b-values (V,) and unit world directions (V, 3): a Fibonacci half-sphere, randomly turned."""
    i = np.arange(p.n_dirs) + 0.5
    z = 1.0 - i / p.n_dirs
    phi = np.pi * (3.0 - math.sqrt(5.0)) * i
    r = np.sqrt(1 - z * z)
    dirs = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    dirs = dirs @ q.T
    total = p.n_dirs + len(p.b0_positions)
    bvals = np.full(total, p.bval)
    bvecs = np.zeros((total, 3))
    dw = [v for v in range(total) if v not in p.b0_positions]
    bvals[list(p.b0_positions)] = 0.0
    bvecs[dw] = dirs
    return bvals, bvecs


def _affine(p: Params) -> F64:
    n, d, t = p.matrix, p.voxel_mm, p.thickness_mm
    affine = np.diag([d, d, t, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * d, -(n - 1) / 2 * d, -(p.n_slices - 1) / 2 * t]
    if p.storage == "LAS":
        affine[0, 0], affine[0, 3] = -d, (n - 1) / 2 * d
    return affine


def world_to_fsl_bvecs(bvecs: F64, affine: F64) -> F64:
    """World RAS+ directions (V, 3) to FSL's convention for ``affine``: the voxel frame, x
    negated when the affine's determinant is positive (written here without the service's
    helper, so the yardstick checks that convention rather than sharing it)."""
    lin = affine[:3, :3]
    u, _, vt = np.linalg.svd(lin)
    g = bvecs @ (u @ vt)  # voxel-axis components
    if np.linalg.det(lin) > 0:
        g[:, 0] = -g[:, 0]
    return g
