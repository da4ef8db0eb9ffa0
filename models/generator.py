"""Synthetic axial b=0 slices of the cervical cord with exact eight-region labels.

Every sample is drawn from a seed (``numpy.random.default_rng(seed)``), so a seed fully defines
the slice, its labels and its simulated DWI.

How a slice is made
-------------------
1. **Acquisition** draw: in-plane voxel 0.6-1.8 mm (slightly anisotropic at times), slice
   thickness 3-7 mm, a reduced (25-100 mm; 10 %: 20-40 mm per side) or full (100-170 mm)
   field of view, cord centre anywhere at least ~7 mm inside the field, phase-encode axis,
   SNR 8-40.
2. **Scene** on a fine grid (acquisition voxel / k, about 0.2-0.3 mm), coordinates in mm in an
   anatomical frame (u to the patient's right, v anterior) rotated by up to +-20 degrees about the
   cord centre. The cord comes from the compact PAM50 atlas (``models/atlas``): the sub-slices
   (1 mm apart) inside the slab are sampled with a cord tilt and averaged, which gives partial
   volume through the slice; size is scaled 0.8-1.2 and CSM-like compression flattens the cord
   front-to-back down to ~half its depth (widening it slightly). A left-right mirror is applied
   to the geometry *and* swaps the left/right region channels (the MIRROR_LUT rule).
   With ``real_shapes`` (``python -m models.train --real-shapes P``) a share P of the cords is
   instead a real slice of the training subjects (manual cord and gray matter of 5 real T2*
   scans, the atlas funiculi fitted to them: :func:`models.real_shapes.shape_bank`), then tilted,
   scaled, compressed, rotated and mirrored as above.
   Around it: a thecal sac of variable width (sometimes almost no CSF), in 45 % of slices with
   CSF-filled root sleeves that widen it into the "V" of the real b0, epidural fat/veins, the
   vertebral body or a disc (with a bright nucleus), a dark posterior ligament layer, pedicles and
   lamina, nerve-root sleeves running antero-laterally, vertebral arteries, muscles with fat
   planes, the neck outline and air.
3. **Contrast** (b0, long-TE EPI): CSF bright (1.1-2.8 x cord; about 28 %: 0.85-1.3,
   as bright as the cord), gray matter 1.0-1.15 x white matter (25 %: 1.15-1.35, a clear
   contrast), bone/ligament dark, muscle intermediate-dark, texture fields.
4. **Acquisition grid**: block-average the fine grid (voxel partial volume; with ``kspace``, a
   share of the b0s is instead sampled by k-space truncation, :func:`kspace_sample`), EPI blur and a
   smooth geometric distortion along the phase-encode axis (applied to labels too, since a rater
   labels the distorted image), multiplicative bias field, Rician noise.
5. **Labels**: per-class fractions (background = 1 - cord) follow the same path; the label
   map on the acquisition grid is their argmax. On the model grid the class fractions are
   resampled linearly with :func:`core.segment.preprocess.resample_slice` and the argmax is
   taken (documented choice: smoother and less biased than nearest-neighbour).

The module also renders the matching DWI (per-region tensors, see :func:`simulate_dwi`) so
that FA per region can be measured on simulated data.

All arrays are ``[i, j]``: ``i`` along world +x (patient's right larger), ``j`` along world +y
(anterior larger).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel
from numpy.typing import NDArray
from scipy import ndimage

from core.labels import MIRROR_LUT
from core.segment.preprocess import normalise, resample_slice, resample_to_shape
from models.atlas import Atlas, load_atlas
from models.real_shapes import RealShape, shape_bank

F32 = NDArray[np.float32]
MODEL_SPACING_MM = 0.5
CROP_SIZE_PX = 96
"""Training crop and run-time pass-2 crop (px at 0.5 mm = 48 mm: the cord, its CSF ring and a
margin of surrounding tissue). The two must match: the squeeze-and-excitation gates pool over
the whole input, so a network trained on 64 px crops scored lower on 96 px ones (mean region
Dice on 100 held-out slices 0.786 at 96 px against 0.796 at 64 px, same checkpoint). A run
trained on 64 px crops (four times cheaper per step) was still far behind the 96 px model after
65 of its 100 minutes (validation Dice 0.754 against 0.821) and was stopped."""


@dataclass(frozen=True)
class Acquisition:
    spacing_mm: tuple[float, float]
    thickness_mm: float
    shape: tuple[int, int]
    snr: float
    pe_axis: int


@dataclass
class SyntheticSlice:
    """One synthetic slice on the acquisition grid.

    b0 : (H, W) float32, arbitrary scanner-like units
    labels : (H, W) uint8 codes 0-8
    fractions : (9, H, W) float32 class fractions (index = label code; 0 = not cord)
    csf : (H, W) float32 CSF fraction
    clean : (H, W) noiseless b0 (before bias and noise), used to render the DWI
    """

    b0: F32
    labels: NDArray[np.uint8]
    fractions: F32
    csf: F32
    clean: F32
    bias: F32
    acquisition: Acquisition
    params: dict[str, float] = field(default_factory=dict)


@lru_cache(maxsize=1)
def _atlas() -> tuple[Atlas, F32, F32]:
    """The atlas with region fractions renormalised inside the cord (nearest-region fill where
    the tracts leave a gap), returned as (atlas, fractions (Z, 8, H, W), centre (2,))."""
    atlas = load_atlas()
    regions = atlas.regions
    total = regions.sum(axis=1)
    frac = np.zeros_like(regions)
    for z in range(regions.shape[0]):
        has = total[z] > 0.05
        _, (ii, jj) = ndimage.distance_transform_edt(~has, return_indices=True)
        r = regions[z][:, ii, jj]
        frac[z] = r / np.maximum(r.sum(axis=0), 1e-6)
    cord = atlas.cord
    ii = np.arange(cord.shape[1])[:, None]
    jj = np.arange(cord.shape[2])[None, :]
    centre = np.array([(cord * ii).sum() / cord.sum(), (cord * jj).sum() / cord.sum()], np.float32)
    return atlas, frac.astype(np.float32), centre


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> F32:
    """Smooth random field in about [-1, 1] with ``cells`` features across the image."""
    coarse = rng.standard_normal((cells + 2, cells + 2)).astype(np.float32)
    out = ndimage.zoom(coarse, (shape[0] / coarse.shape[0], shape[1] / coarse.shape[1]), order=1)
    out = out[: shape[0], : shape[1]]
    if out.shape != shape:
        out = np.pad(out, [(0, shape[0] - out.shape[0]), (0, shape[1] - out.shape[1])], mode="edge")
    return (out / (np.abs(out).max() + 1e-6)).astype(np.float32)


def _soft(d: F32, width: float) -> F32:
    """Soft indicator of ``d < 0`` (signed distance-like) with edge width in mm."""
    return (1.0 / (1.0 + np.exp(np.clip(d / max(width, 1e-3), -30, 30)))).astype(np.float32)


def _ellipse(u: F32, v: F32, cu: float, cv: float, au: float, av: float) -> F32:
    """Approximate signed distance (mm) to an axis-aligned ellipse."""
    r = np.sqrt(((u - cu) / au) ** 2 + ((v - cv) / av) ** 2)
    return ((r - 1.0) * min(au, av)).astype(np.float32)


def draw_acquisition(rng: np.random.Generator) -> Acquisition:
    s = float(rng.uniform(0.6, 1.8))
    s2 = s * float(rng.uniform(0.9, 1.1)) if rng.random() < 0.3 else s
    if rng.random() < 0.55:
        fov = (rng.uniform(40, 100), rng.uniform(25, 70))
    else:
        f = rng.uniform(100, 170)
        fov = (f, f * rng.uniform(0.7, 1.0))
    if rng.random() < 0.5:
        fov = (fov[0], fov[1]) if rng.random() < 0.8 else (fov[1], fov[0])
    shape = (max(16, int(fov[0] / s)), max(16, int(fov[1] / s2)))
    return Acquisition(
        spacing_mm=(s, s2),
        thickness_mm=float(rng.uniform(3.0, 7.0)),
        shape=shape,
        snr=float(np.exp(rng.uniform(np.log(8), np.log(40)))),
        pe_axis=int(rng.random() < 0.7),  # AP phase encoding is the most common for the cord
    )


def _tight_field(rng: np.random.Generator, acq: Acquisition) -> Acquisition:
    """The same acquisition with a field of view of 20-40 mm per side (at most the drawn one):
    little more than the cord and its CSF, as in a tightly cropped reduced-FOV series."""
    (sx, sy), (h, w) = acq.spacing_mm, acq.shape
    shape = (min(h, max(10, int(rng.uniform(20, 40) / sx))), min(w, max(10, int(rng.uniform(20, 40) / sy))))
    return replace(acq, shape=shape)


def _sample_cord(
    rng: np.random.Generator, u: F32, v: F32, thickness: float, p: dict[str, float],
    shape: RealShape | None = None,
) -> tuple[F32, F32]:
    """Cord fraction (Hf, Wf) and region fractions (8, Hf, Wf) on the fine grid (u, v in mm).

    With ``shape`` the cord and its regions come from that real slice (the same cross-section at
    every sub-slice, shifted by the tilt) instead of the atlas; the random draws are the same."""
    atlas, frac, centre = _atlas()
    nz = frac.shape[0]
    n_sub = max(1, round(thickness / 1.0))
    z0 = int(rng.integers(0, nz - n_sub + 1))
    p["level"] = float(atlas.level[z0 + n_sub // 2])
    cord = np.zeros(u.shape, np.float32)
    regions = np.zeros((8,) + u.shape, np.float32)
    sp = atlas.spacing_mm
    for k in range(n_sub):
        dz = (k - (n_sub - 1) / 2.0) * 1.0
        uu = (u - dz * p["tilt_u"]) / p["scale_u"]
        vv = (v - dz * p["tilt_v"]) / p["scale_v"]
        if p["mirror"]:
            uu = -uu
        if shape is not None:
            coords = np.stack([uu / shape.spacing_mm[0] + shape.centre[0], vv / shape.spacing_mm[1] + shape.centre[1]])
            cord += ndimage.map_coordinates(shape.cord, coords, order=1, mode="constant")
            for r in range(8):
                regions[r] += ndimage.map_coordinates(shape.regions[r], coords, order=1, mode="constant")
            continue
        coords = np.stack([uu / sp + centre[0], vv / sp + centre[1]])
        c = ndimage.map_coordinates(atlas.cord[z0 + k], coords, order=1, mode="constant")
        cord += c
        for r in range(8):
            regions[r] += c * ndimage.map_coordinates(frac[z0 + k, r], coords, order=1, mode="nearest")
    cord /= n_sub
    regions /= n_sub
    if p["mirror"]:
        regions = regions[[4, 5, 6, 7, 0, 1, 2, 3]]
    return cord, regions


def _surroundings(rng: np.random.Generator, u: F32, v: F32, p: dict[str, float], sac_ap: tuple[float, float],
                  sac_lr: float) -> F32:
    """Intensity (Hf, Wf) of non-neural tissue on the fine grid, relative to cord WM = 1."""
    shape = u.shape
    tex = _smooth_noise(rng, shape, int(rng.integers(6, 16)))
    tex2 = _smooth_noise(rng, shape, int(rng.integers(20, 40)))
    img = np.zeros(shape, np.float32)
    post, ant = sac_ap
    # Neck outline: soft tissue inside, air outside.
    neck_c = float(rng.uniform(8, 22))
    neck = _soft(_ellipse(u, v, 0.0, neck_c, rng.uniform(45, 65), rng.uniform(40, 55)), 2.0)
    muscle = rng.uniform(0.12, 0.6)
    img += neck * muscle * (1 + 0.4 * tex + 0.25 * tex2)
    # Fat planes between muscles (streaks).
    for _ in range(int(rng.integers(2, 6))):
        ang = rng.uniform(0, np.pi)
        off = rng.uniform(-30, 30)
        d = np.abs(np.cos(ang) * u + np.sin(ang) * (v + 20) - off) - rng.uniform(0.4, 1.5)
        fat = _soft(d, 0.5) * (v < post + rng.uniform(-5, 15))
        img = img * (1 - fat * neck) + fat * neck * rng.uniform(0.1, 0.9)
    # Clutter: vessels, fat lobules, lymph nodes, glands as random blobs anywhere in the neck.
    for _ in range(int(rng.integers(5, 25))):
        bu, bv = rng.uniform(-45, 45), rng.uniform(-35, 55)
        if abs(bu) < 12 and -12 < bv < 18:
            continue
        blob = _soft(_ellipse(u, v, bu, bv, rng.uniform(1, 8), rng.uniform(1, 8)), rng.uniform(0.3, 1.5))
        img = img * (1 - blob * neck) + blob * neck * rng.uniform(0.05, 1.3) * (1 + 0.2 * tex2)
    # Vertebral body or disc anterior to the sac.
    gap = rng.uniform(0.5, 3.0)
    au, av = rng.uniform(7, 11), rng.uniform(6, 9)
    body_c = ant + gap + av
    body = _soft(_ellipse(u, v, 0.0, body_c, au, av), 0.6)
    is_disc = rng.random() < 0.4
    if is_disc:
        nucleus = _soft(_ellipse(u, v, 0.0, body_c, au * 0.6, av * 0.6), 1.5)
        body_int = rng.uniform(0.2, 0.5) * (1 - nucleus) + nucleus * rng.uniform(0.4, 1.2)
    else:
        cortex = body - _soft(_ellipse(u, v, 0.0, body_c, au - 1.0, av - 1.0), 0.5)
        body_int = rng.uniform(0.15, 0.5) * (1 + 0.3 * tex2) * (1 - cortex) + cortex * 0.05
    img = img * (1 - body) + body * body_int
    # Posterior longitudinal ligament / epidural layer (dark) in front of the sac.
    pll = _soft(_ellipse(u, v, 0.0, ant + gap * 0.5, au * 0.9, max(gap * 0.5, 0.3)), 0.3)
    img = img * (1 - pll) + pll * rng.uniform(0.05, 0.3)
    # Uncovertebral / pedicles and lateral masses (dark bone) on both sides.
    side_bone = np.zeros(shape, np.float32)
    lat = sac_lr + rng.uniform(1.5, 4.0)
    for sgn in (-1.0, 1.0):
        side_bone = np.maximum(side_bone, _soft(_ellipse(u, v, sgn * (lat + 4), rng.uniform(-2, 4), rng.uniform(3, 6),
                                                         rng.uniform(3, 7)), 0.7))
    bone_int = rng.uniform(0.08, 0.35)
    img = img * (1 - side_bone) + side_bone * bone_int * (1 + 0.3 * tex2)
    # Lamina: a V behind the sac, spinous process in the midline.
    apex = post - rng.uniform(2, 6)
    slope = rng.uniform(0.4, 1.0)
    lam_d = np.abs(v - apex - slope * np.abs(u)) / np.sqrt(1 + slope**2)
    lam = _soft(lam_d - rng.uniform(0.8, 2.0), 0.5)
    lam *= (np.abs(u) < lat + 6) & (v > apex - 1)
    spin = _soft(_ellipse(u, v, 0.0, apex - 8, rng.uniform(1.5, 3), 8), 0.5)
    post_bone = np.maximum(lam, spin)
    img = img * (1 - post_bone) + post_bone * rng.uniform(0.05, 0.35)
    # Nerve-root sleeves: bright lines running antero-laterally from the sac (the "V" of the
    # real example), at disc/foraminal levels.
    if rng.random() < 0.7:
        ang = np.deg2rad(rng.uniform(15, 50))
        bright = rng.uniform(0.5, 2.0)
        width = rng.uniform(0.5, 1.5)
        length = rng.uniform(8, 25)
        for sgn in (-1.0, 1.0):
            du = sgn * u - sac_lr * 0.8
            dv = v - rng.uniform(-2, 2)
            along = du * np.cos(ang) + dv * np.sin(ang)
            across = -du * np.sin(ang) + dv * np.cos(ang)
            root = _soft(np.abs(across) - width, 0.4) * (along > 0) * (along < length)
            img = img * (1 - root) + root * bright
    # Vertebral arteries.
    for sgn in (-1.0, 1.0):
        va = _soft(_ellipse(u, v, sgn * rng.uniform(11, 16), rng.uniform(1, 7), 2.0, 2.0) + rng.uniform(-0.7, 0.5), 0.3)
        img = img * (1 - va) + va * (rng.uniform(0.0, 0.2) if rng.random() < 0.6 else rng.uniform(0.8, 1.5))
    p["disc"] = float(is_disc)
    return img.astype(np.float32)


def _root_sleeves(rng: np.random.Generator, u: F32, v: F32, cu: float, cv: float, sac_lr: float) -> F32:
    """CSF fraction (Hf, Wf) of the two dural root sleeves: CSF-filled wedges leaving the sac
    antero-laterally towards the foramina, wide at the sac (1.2-3.5 mm half-width) and tapering
    over 6-20 mm. On the real b0 they turn the sac into the bright "V" around the cord; the CSF
    in them can be as bright as the cord. A partial fill (0.5-1) gives fainter sleeves."""
    out = np.zeros(u.shape, np.float32)
    ang0, w0, length = rng.uniform(20, 60), rng.uniform(1.2, 3.5), rng.uniform(6, 20)
    w1 = rng.uniform(0.3, 1.0)
    fill = rng.uniform(0.5, 1.0)
    for sgn in (-1.0, 1.0):
        ang = np.deg2rad(ang0 + rng.uniform(-8, 8))
        du = sgn * (u - cu) - sac_lr * rng.uniform(0.5, 0.9)
        dv = v - cv - rng.uniform(-1.5, 1.5)
        along = du * np.cos(ang) + dv * np.sin(ang)
        across = -du * np.sin(ang) + dv * np.cos(ang)
        half = w0 + (w1 - w0) * np.clip(along / length, 0, 1)
        wedge = _soft(np.abs(across) - half, 0.3) * _soft(-along, 0.5) * _soft(along - length, 1.0)
        out = np.maximum(out, wedge)
    return (out * fill).astype(np.float32)


def block_average(x: NDArray, k: int) -> F32:
    """``k`` x ``k`` block average over the last two axes of ``(..., H, W)`` (ragged edges
    dropped): voxel partial volume on a grid ``k`` times coarser."""
    h, w = x.shape[-2] // k, x.shape[-1] // k
    x = x[..., : h * k, : w * k]
    return x.reshape(x.shape[:-2] + (h, k, w, k)).mean(axis=(-3, -1)).astype(np.float32)


def kspace_sample(x: NDArray, k: int, *, window: float = 0.0, partial: float = 0.0, pe_axis: int = 0) -> F32:
    """Sample an (H*k, W*k) fine image on the grid ``k`` times coarser as an MR scanner does:
    keep the central (H, W) spatial frequencies (k-space truncation: a sinc point-spread function,
    Gibbs ringing at sharp edges) instead of averaging each block, then take the magnitude.

    The samples sit at the block centres (as :func:`block_average`'s), by a Fourier phase ramp.
    ``window``: the share of the outer frequencies tapered by a cosine (a Tukey filter, 0 = none,
    as scanners' optional k-space filters); ``partial``: the share of the acquired lines missing
    on one side along ``pe_axis`` (partial Fourier, zero-filled, 0-0.25)."""
    n0, n1 = x.shape[-2], x.shape[-1]
    h, w = n0 // k, n1 // k
    spec = np.fft.fft2(np.asarray(x, np.float64))
    m0, m1 = np.fft.fftfreq(n0) * n0, np.fft.fftfreq(n1) * n1  # integer frequency indices
    shift = (k - 1) / 2.0  # output sample n is the fine image at n * k + shift
    spec *= np.exp(2j * np.pi * shift * (m0[:, None] / n0 + m1[None, :] / n1))
    keep0 = np.r_[0 : (h + 1) // 2, n0 - h // 2 : n0]
    keep1 = np.r_[0 : (w + 1) // 2, n1 - w // 2 : n1]
    sub = spec[np.ix_(keep0, keep1)] / (k * k)
    for axis, m in ((0, np.fft.fftfreq(h)), (1, np.fft.fftfreq(w))):
        r = np.abs(m) / 0.5  # 0 at the centre, 1 at the edge of k-space
        taper = np.ones_like(r)
        if window > 0:
            edge = r > 1.0 - window
            taper[edge] = 0.5 * (1.0 + np.cos(np.pi * (r[edge] - (1.0 - window)) / window))
        if partial > 0 and axis == pe_axis:
            taper[m > 0.5 - partial] = 0.0
        sub *= taper[:, None] if axis == 0 else taper[None, :]
    return np.abs(np.fft.ifft2(sub)).astype(np.float32)


PATIENT_KEYS = ("size", "thin_csf", "csf_int", "gm_int")
"""The ``params`` of a slice that describe the patient rather than the slice: cord size, a thin
CSF ring, CSF and gray-matter signal relative to white matter."""


COMPRESSED_SHARE = 0.4
"""Default share of compressed cords (``generate(compressed=...)``, ``models.train --compressed``)."""


@dataclass(frozen=True)
class Variation:
    """The generator's optional widenings, each a probability per slice (see :func:`generate`);
    the defaults leave every slice as it always was. Training passes one of these down
    (``python -m models.train --real-shapes P --kspace P --compressed P --gamma P``).

    ``gamma``: the probability that a training sample's intensities are bent by a random gamma
    (:func:`gamma_bend`), so that the network reads the cord by its outline and layout rather than
    by one fixed ratio of cord, CSF and surrounding intensities.

    ``warp``: the probability that the cord's anatomy is bent by a smooth random displacement
    (:func:`anatomy_warp`), so that the partition is read from the image and not only from the
    atlas's one layout.

    ``csf_void``: the probability that part of the CSF ring loses its signal (:func:`csf_void`),
    so that the network finds the cord's edge where no bright CSF lies against it.
    """

    real_shapes: float = 0.0
    kspace: float = 0.0
    compressed: float = COMPRESSED_SHARE
    gamma: float = 0.0
    warp: float = 0.0
    csf_void: float = 0.0


WARP_MM = (0.2, 0.8)
"""Largest displacement (mm) of a warped cord, drawn uniformly (:func:`anatomy_warp`)."""

WARP_FEATURES = (2, 5)
"""Features of the displacement field across the cord's 28 mm window (so 5-14 mm apart)."""


def anatomy_warp(rng: np.random.Generator, u: F32, v: F32) -> tuple[F32, F32]:
    """(u, v) fine-grid coordinates (mm, anatomical frame) moved by a smooth random displacement
    of at most ``WARP_MM`` (one independent field per axis, :func:`_smooth_noise`). Sampling the
    atlas at the moved coordinates bends the cord outline and its eight regions together, the
    way one patient's tracts differ from the atlas's average; the labels are the same bent
    fractions, so they stay exact."""
    amplitude = float(rng.uniform(*WARP_MM))
    cells = int(rng.integers(WARP_FEATURES[0], WARP_FEATURES[1] + 1))
    du = _smooth_noise(rng, u.shape, cells) * amplitude
    dv = _smooth_noise(rng, u.shape, cells) * amplitude
    return (u + du).astype(np.float32), (v + dv).astype(np.float32)


VOID_SIGNAL = (0.3, 1.0)
"""CSF signal (relative to cord white matter = 1) at the centre of a void (:func:`csf_void`)."""

VOID_HALF_WIDTH_DEG = (40.0, 110.0)
"""Half-width (degrees around the cord centre) of a void's sector."""


def csf_void(rng: np.random.Generator, u: F32, v: F32, cu: float, cv: float, csf_int: float) -> F32:
    """(Hf, Wf) CSF signal (relative to cord white matter) with a sector of the ring gone dark.

    CSF that moves with the heartbeat, or dephases at air and bone, loses its signal: on a real
    b0 or EPI of the neck the ring around the cord is often bright in front and dark behind it,
    and the cord then meets dark CSF, ligament or fat there. The sector is centred behind the
    cord (v < 0, the posterior direction of the anatomical frame) on 60 % of draws and anywhere
    otherwise; the signal falls smoothly (a raised cosine of the angle around ``(cu, cv)``) from
    ``csf_int`` at the sector's edges to ``VOID_SIGNAL`` at its centre. The cord and its labels are
    untouched."""
    centre = -np.pi / 2 if rng.random() < 0.6 else float(rng.uniform(-np.pi, np.pi))
    centre += float(rng.normal(0.0, 0.3))
    half = np.deg2rad(rng.uniform(*VOID_HALF_WIDTH_DEG))
    dark = float(rng.uniform(*VOID_SIGNAL))
    angle = np.arctan2(v - cv, u - cu) - centre
    angle = np.abs((angle + np.pi) % (2 * np.pi) - np.pi)
    depth = np.where(angle < half, 0.5 * (1.0 + np.cos(np.pi * angle / half)), 0.0)
    return (csf_int + (min(dark, csf_int) - csf_int) * depth).astype(np.float32)


GAMMA_RANGE = (0.6, 1.6)
"""Exponents drawn (log-uniformly) by :func:`training_sample` for ``Variation.gamma``."""


def gamma_bend(image: F32, gamma: float) -> F32:
    """``image`` with its intensities between the 1st and 99.5th percentile mapped through
    ``x -> x ** gamma`` (x scaled to [0, 1] there, values above kept above), back on its own
    scale: gamma < 1 brightens the mid-tones (a dark cord looks more like bright CSF), > 1
    darkens them."""
    lo, hi = np.percentile(image, [1.0, 99.5])
    span = float(hi - lo) or 1.0
    x = np.clip((image - lo) / span, 0.0, None)
    return (lo + span * x ** gamma).astype(np.float32)


def generate(seed: int, *, acquisition: Acquisition | None = None,
             patient: Mapping[str, float] | None = None, real_shapes: float = 0.0,
             kspace: float = 0.0, compressed: float = COMPRESSED_SHARE, warp: float = 0.0,
             void: float = 0.0) -> SyntheticSlice:
    """Render one synthetic slice (see module docstring) on its acquisition grid.

    ``patient``: values for :data:`PATIENT_KEYS` (another slice's ``params``) that replace this
    slice's own draws, for slices of one simulated study; every random draw is still made, so
    the rest of the slice is the same as without it.

    ``real_shapes``: the probability that the cord's shape and partition come from a real slice
    (:func:`models.real_shapes.shape_bank`: manual cord and gray matter of the training subjects
    with the atlas funiculi fitted to them) instead of the atlas; drawn from a stream of its
    own, so with 0 (the default) every slice is as before.

    ``kspace``: the probability that the b0 is sampled by k-space truncation
    (:func:`kspace_sample`, with a random filter and partial Fourier) instead of block averaging;
    the labels and fractions stay the exact area fractions. Also its own stream.

    ``compressed``: the probability that the cord is flattened front-to-back (CSM-like, to
    50-95 % of its depth); with the default share (:data:`COMPRESSED_SHARE`) every slice is as
    before, and a cord the default flattens is flattened alike under a larger share.

    ``warp``: the probability that the cord's anatomy (outline and regions together) is bent by
    a smooth displacement (:func:`anatomy_warp`); its own stream, so 0 leaves every slice as before.

    ``void``: the probability that a sector of the CSF ring is dark (:func:`csf_void`); its own
    stream, so 0 leaves every slice as before."""
    pat = {k: patient[k] for k in PATIENT_KEYS} if patient is not None else {}
    rng = np.random.default_rng(seed)
    # Later additions draw from their own stream, so every earlier draw (and every slice that
    # gets none of them) is unchanged: a tight field of view, CSF-filled root sleeves, more
    # cord-bright CSF and clearer gray/white contrast.
    extra = np.random.default_rng([seed, 2])
    shape = None
    if real_shapes > 0:
        shapes = np.random.default_rng([seed, 3])
        if shapes.random() < real_shapes:
            bank = shape_bank()
            shape = bank[int(shapes.integers(len(bank)))]
    acq = acquisition or draw_acquisition(rng)
    if extra.random() < 0.1 and acquisition is None:
        acq = _tight_field(extra, acq)
    sx, sy = acq.spacing_mm
    k = max(2, math.ceil(max(sx, sy) / 0.3))
    H, W = acq.shape
    fx, fy = sx / k, sy / k
    # Cord centre somewhere inside the field of view (mm, image frame).
    margin = 7.0
    cx = rng.uniform(min(margin, H * sx / 2), max(H * sx - margin, H * sx / 2))
    cy = rng.uniform(min(margin, W * sy / 2), max(W * sy - margin, W * sy / 2))
    xi = (np.arange(H * k, dtype=np.float32) + 0.5) * fx - cx
    yj = (np.arange(W * k, dtype=np.float32) + 0.5) * fy - cy
    X, Y = np.meshgrid(xi, yj, indexing="ij")
    theta = np.deg2rad(rng.uniform(-20, 20) if rng.random() < 0.8 else rng.uniform(-5, 5))
    u = (np.cos(theta) * X + np.sin(theta) * Y).astype(np.float32)
    v = (-np.sin(theta) * X + np.cos(theta) * Y).astype(np.float32)

    size = pat.get("size", rng.uniform(0.8, 1.2))
    compress = 1.0 if rng.random() < 1.0 - compressed else rng.uniform(0.5, 0.95)
    p: dict[str, float] = {
        "theta_deg": float(np.rad2deg(theta)),
        "scale_u": float(size * rng.uniform(0.92, 1.08) / np.sqrt(compress) ** 0.5),
        "scale_v": float(size * rng.uniform(0.92, 1.08) * compress),
        "tilt_u": float(np.tan(np.deg2rad(rng.uniform(-12, 12)))),
        "tilt_v": float(np.tan(np.deg2rad(rng.uniform(-15, 15)))),
        "mirror": float(rng.random() < 0.5),
        "compression": float(compress),
        "size": float(size),
    }
    # Cord on a window around its centre only (the atlas covers 24 mm).
    win = (np.abs(u) < 14) & (np.abs(v) < 14)
    rows = np.where(win.any(axis=1))[0]
    cols = np.where(win.any(axis=0))[0]
    cord = np.zeros(u.shape, np.float32)
    regions = np.zeros((8,) + u.shape, np.float32)
    if rows.size and cols.size:
        rs = slice(rows.min(), rows.max() + 1)
        cs = slice(cols.min(), cols.max() + 1)
        uw, vw = u[rs, cs], v[rs, cs]
        bend = np.random.default_rng([seed, 5])
        if warp > 0 and bend.random() < warp:
            uw, vw = anatomy_warp(bend, uw, vw)
        c_w, r_w = _sample_cord(rng, uw, vw, acq.thickness_mm, p, shape)
        cord[rs, cs] = c_w
        regions[:, rs, cs] = r_w
    # Thecal sac: the cord's extent plus a margin that varies around the circumference.
    cu = float((cord * u).sum() / max(cord.sum(), 1e-6))
    cv = float((cord * v).sum() / max(cord.sum(), 1e-6))
    half_lr = 5.5 * p["scale_u"]
    half_ap = 4.0 * p["scale_v"]
    thin = bool(pat.get("thin_csf", rng.random() < 0.2))
    m_ant = rng.uniform(0.1, 0.8) if (thin or compress < 0.8) else rng.uniform(0.4, 3.0)
    m_post = rng.uniform(0.2, 1.0) if thin else rng.uniform(0.8, 4.5)
    m_lat = rng.uniform(0.3, 1.0) if thin else rng.uniform(0.8, 4.0)
    sac_lr = half_lr + m_lat
    sac_post = cv - half_ap - m_post
    sac_ant = cv + half_ap + m_ant
    sac_cv = (sac_post + sac_ant) / 2
    sac = _soft(_ellipse(u, v, cu, sac_cv, sac_lr, (sac_ant - sac_post) / 2)
                + 0.6 * _smooth_noise(rng, u.shape, 4) * (not thin), 0.25)
    sac = np.maximum(sac, cord)

    other = _surroundings(rng, u, v, p, (sac_post, sac_ant), sac_lr)
    wm_int = 1.0
    gm_int = float(rng.uniform(1.0, 1.15))
    csf_int = float(rng.uniform(1.1, 2.8)) if rng.random() < 0.85 else float(rng.uniform(0.9, 1.3))
    fluid = np.maximum(sac, _root_sleeves(extra, u, v, cu, sac_cv, sac_lr)) if extra.random() < 0.45 else sac
    if extra.random() < 0.15:
        csf_int = float(extra.uniform(0.85, 1.25))
    if extra.random() < 0.25:  # clear gray/white contrast (manual GM on the real T2*: 1.12-1.26)
        gm_int = float(extra.uniform(1.15, 1.35))
    csf_int, gm_int = pat.get("csf_int", csf_int), pat.get("gm_int", gm_int)
    csf = np.clip(fluid - cord, 0.0, 1.0)
    gm = regions[3] + regions[7]
    wm = cord - gm
    cord_tex = 1.0 + 0.04 * _smooth_noise(rng, u.shape, 6)
    voids = np.random.default_rng([seed, 6])
    csf_signal: F32 | float = csf_int
    voided = void > 0 and voids.random() < void
    if voided:
        csf_signal = csf_void(voids, u, v, cu, cv, csf_int)
    fine = other * (1.0 - fluid) + csf * csf_signal + (wm * wm_int + gm * gm_int) * cord_tex
    # Epidural ring (fat / veins) directly around the sac.
    ring = np.clip(_soft(_ellipse(u, v, cu, sac_cv, sac_lr + 1.2, (sac_ant - sac_post) / 2 + 1.2), 0.4) - fluid, 0, 1)
    fine = fine * (1 - ring) + ring * rng.uniform(0.1, 0.9) * (1 + 0.3 * _smooth_noise(rng, u.shape, 20))

    # Acquisition grid: voxel partial volume.
    sampling = np.random.default_rng([seed, 4])
    img_kspace = kspace > 0 and sampling.random() < kspace
    if img_kspace:
        img = kspace_sample(fine[: H * k, : W * k], k, window=float(sampling.choice([0.0, sampling.uniform(0.1, 0.5)])),
                            partial=float(sampling.choice([0.0, sampling.uniform(0.1, 0.25)])), pe_axis=acq.pe_axis)
    else:
        img = block_average(fine, k)
    fr = np.concatenate([(1.0 - cord)[None], regions], axis=0)
    fr = block_average(fr, k)
    csf_a = block_average(csf, k)
    img = img[:H, :W]
    # EPI: blur and smooth displacement along the phase-encode axis (labels follow the image).
    sig = float(rng.uniform(0.2, 0.9))
    img = ndimage.gaussian_filter1d(img, sig, axis=acq.pe_axis)
    fr = ndimage.gaussian_filter1d(fr, sig, axis=acq.pe_axis + 1)
    csf_a = ndimage.gaussian_filter1d(csf_a, sig, axis=acq.pe_axis)
    amp = float(rng.uniform(0.0, 1.5))
    disp = amp * _smooth_noise(rng, img.shape, 3)
    grid = list(np.meshgrid(np.arange(img.shape[0], dtype=np.float32), np.arange(img.shape[1], dtype=np.float32),
                       indexing="ij"))
    grid[acq.pe_axis] = grid[acq.pe_axis] + disp
    img = ndimage.map_coordinates(img, grid, order=1, mode="nearest")
    fr = np.stack([ndimage.map_coordinates(c, grid, order=1, mode="nearest") for c in fr])
    csf_a = ndimage.map_coordinates(csf_a, grid, order=1, mode="nearest")
    clean = img.astype(np.float32)
    # Bias field (receive coil), Rician noise relative to the cord signal.
    bias = np.exp(0.5 * _smooth_noise(rng, img.shape, 2) * rng.uniform(0.2, 1.0)
                  + rng.uniform(-0.02, 0.02) * (np.arange(img.shape[1])[None, :] - cy / sy) * sy)
    bias = (bias / bias.flat[int(np.clip(cx / sx, 0, H - 1)) * W + int(np.clip(cy / sy, 0, W - 1))]).astype(np.float32)
    sigma = 1.0 / acq.snr
    n1 = rng.normal(0, sigma, img.shape)
    n2 = rng.normal(0, sigma, img.shape)
    scale = float(np.exp(rng.uniform(np.log(50), np.log(3000))))
    b0 = (np.sqrt((clean * bias + n1) ** 2 + n2**2) * scale).astype(np.float32)
    labels = np.argmax(fr, axis=0).astype(np.uint8)
    p.update(csf_int=csf_int, gm_int=gm_int, thin_csf=float(thin), scale=scale, k=float(k),
             real_shape=float(shape is not None), kspace=float(img_kspace), csf_void=float(voided))
    return SyntheticSlice(b0=b0, labels=labels, fractions=fr.astype(np.float32), csf=csf_a.astype(np.float32),
                          clean=clean, bias=bias, acquisition=acq, params=p)


def model_grid_fractions(s: SyntheticSlice, *, spacing_mm: float = MODEL_SPACING_MM) -> tuple[F32, F32]:
    """Resample a slice to the model grid, b0 and class fractions both linearly.

    Returns (b0 (H, W) not yet normalised, fractions (9, H, W) summing to 1 per pixel)."""
    tgt = (spacing_mm, spacing_mm)
    img = resample_slice(s.b0, spacing_mm=s.acquisition.spacing_mm, target_mm=tgt)
    fr = np.clip(resample_to_shape(s.fractions, img.shape), 0.0, None)
    return img, (fr / np.maximum(fr.sum(axis=0, keepdims=True), 1e-6)).astype(np.float32)


def to_model_grid(s: SyntheticSlice, *, spacing_mm: float = MODEL_SPACING_MM) -> tuple[F32, NDArray[np.uint8]]:
    """Resample a slice to the model grid: b0 linearly; labels as the argmax of the linearly
    resampled class fractions. Returns (b0 not yet normalised, labels)."""
    img, fr = model_grid_fractions(s, spacing_mm=spacing_mm)
    return img, np.argmax(fr, axis=0).astype(np.uint8)


def mirror(image: F32, labels: NDArray[np.uint8]) -> tuple[F32, NDArray[np.uint8]]:
    """Left-right flip (along i = world x) with the label codes swapped through MIRROR_LUT."""
    lut = np.asarray(MIRROR_LUT, np.uint8)
    return image[::-1].copy(), lut[labels[::-1]]


def _crop(x: NDArray, centre: tuple[int, int], size: int, fill: float | None) -> NDArray:
    """``size``-square crop around ``centre``; outside the image: ``fill`` or edge values."""
    i0, j0 = centre[0] - size // 2, centre[1] - size // 2
    pad = [(max(0, -i0), max(0, i0 + size - x.shape[0])), (max(0, -j0), max(0, j0 + size - x.shape[1]))]
    if fill is None:
        xp = np.pad(x, pad, mode="edge")
    else:
        xp = np.pad(x, pad, mode="constant", constant_values=fill)
    i0 += pad[0][0]
    j0 += pad[1][0]
    return xp[i0 : i0 + size, j0 : j0 + size]


def training_sample(
    seed: int, *, patch: int = CROP_SIZE_PX, spacing_mm: float = MODEL_SPACING_MM, soft: bool = False,
    variation: Variation = Variation(),
) -> tuple[F32, NDArray]:
    """One training pair on the model grid: a (patch, patch) float32 image and its target.

    The target is the (patch, patch) uint8 label map or, with ``soft``, the (9, patch, patch)
    float32 class fractions (each pixel's share of background and of every region; 1 for
    background outside the image). Soft targets teach the network each pixel's partial volume,
    which survives the run-time mapping back to a coarse acquisition grid: labels taken from
    exact model-grid fractions mapped back score a mean Dice of 0.97 on the acquisition grid,
    from exact hard labels 0.94 (150 held-out slices).

    Half the samples imitate inference pass 1 (the whole slice normalised, then a random window
    that usually contains the cord), half imitate pass 2 (a ``patch`` crop around the cord
    centroid with a few mm of error, normalised on its own; outside the image zero- or
    edge-padded).
    """
    s = generate(seed, real_shapes=variation.real_shapes, kspace=variation.kspace, compressed=variation.compressed,
                 warp=variation.warp, void=variation.csf_void)
    rng = np.random.default_rng(seed + 7_919_000_003)
    img, fr = model_grid_fractions(s, spacing_mm=spacing_mm)
    if variation.gamma and np.random.default_rng([seed, 11]).random() < variation.gamma:
        img = gamma_bend(img, float(np.exp(np.random.default_rng([seed, 12]).uniform(*np.log(GAMMA_RANGE)))))
    lab = np.argmax(fr, axis=0).astype(np.uint8)
    cord = lab > 0
    if cord.any():
        ci, cj = np.argwhere(cord).mean(axis=0)
    else:
        ci, cj = img.shape[0] / 2, img.shape[1] / 2
    if rng.random() < 0.5:
        norm = normalise(img)
        if rng.random() < 0.85:
            c = (int(ci + rng.uniform(-0.4, 0.4) * patch), int(cj + rng.uniform(-0.4, 0.4) * patch))
        else:
            c = (int(rng.uniform(0, img.shape[0])), int(rng.uniform(0, img.shape[1])))
        x = _crop(norm, c, patch, 0.0)
    else:
        jitter = rng.normal(0, 1.5 / spacing_mm, 2)
        c = (round(ci + jitter[0]), round(cj + jitter[1]))
        fill = 0.0 if rng.random() < 0.5 else None
        x = normalise(_crop(img, c, patch, fill))
    if soft:
        y: NDArray = np.stack([_crop(f, c, patch, 1.0 if k == 0 else 0.0) for k, f in enumerate(fr)]).astype(np.float32)
    else:
        y = _crop(lab, c, patch, 0).astype(np.uint8)
    return x.astype(np.float32), y


# --- simulated DWI --------------------------------------------------------------------------

def _tensor(fa: float, md: float, direction: NDArray[np.float64]) -> NDArray[np.float64]:
    """Cylindrically symmetric tensor with given FA and MD, principal axis ``direction``."""
    # l1 = md (1 + 2a), l2 = l3 = md (1 - a); FA = 3a / sqrt(3 + 6a^2), so a = FA / sqrt(3 - 2 FA^2)
    # (a < 1, all eigenvalues positive, for FA < 1).
    a = fa / np.sqrt(max(3 - 2 * fa**2, 1e-9))
    l1, l2 = md * (1 + 2 * a), md * (1 - a)
    d = direction / np.linalg.norm(direction)
    return l2 * np.eye(3) + (l1 - l2) * np.outer(d, d)


def region_tensors(rng: np.random.Generator, compression: float) -> tuple[dict[int, NDArray[np.float64]], dict[int, float]]:
    """Per-region tensors (codes 1-8) with typical healthy values; lower FA when compressed."""
    tilt = rng.normal(0, 0.1, 3)
    tilt[2] = 1.0
    drop = 1.0 - (1.0 - compression) * rng.uniform(0.2, 0.5)
    out, fas = {}, {}
    base = {"lateral": 0.72, "dorsal": 0.76, "ventral": 0.68, "gray": 0.4}
    tissues = ["lateral", "dorsal", "ventral", "gray"]
    for code in range(1, 9):
        t = tissues[(code - 1) % 4]
        fa = float(np.clip(base[t] + rng.normal(0, 0.04), 0.2, 0.9) * drop)
        md = float(rng.uniform(0.6e-3, 1.0e-3) if t != "gray" else rng.uniform(0.7e-3, 1.1e-3))
        out[code] = _tensor(fa, md, tilt)
        fas[code] = fa
    return out, fas


BVAL_S_MM2 = 800.0
"""The simulated DWI's b-value (s/mm^2, :func:`simulate_dwi`)."""


def simulate_dwi(s: SyntheticSlice, seed: int, *, bval: float = BVAL_S_MM2, n_dirs: int = 30,
                 patient_seed: int | None = None) -> tuple[F32, NDArray, NDArray]:
    """Simulated DWI on the acquisition grid: (H, W, 1 + n_dirs) signal, bvals, bvecs (n, 3).

    Compartments mix linearly within a voxel: each cord region (its fraction from
    ``s.fractions``) with its tensor and S0 = its share of the clean b0; CSF isotropic with
    MD 3e-3 mm^2/s; all other tissue isotropic 1.5e-3 mm^2/s. Same bias and Rician noise level
    as the b0.

    ``patient_seed``: slices of one simulated study pass the same value, so that they share
    the gradient directions and the healthy region tensors (each slice's own compression
    still lowers its FA) while their noise stays independent. Without it all of them come
    from ``seed``.
    """
    if s.params.get("csf_void"):
        raise ValueError("a slice with a dark CSF sector (generate(void=...)) is for training the b0 network; "
                         "simulate_dwi takes the CSF's b0 as uniform")
    rng = np.random.default_rng((seed if patient_seed is None else patient_seed) + 104_729)
    tensors, _ = region_tensors(rng, s.params.get("compression", 1.0))
    g = rng.standard_normal((n_dirs, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    if patient_seed is not None:
        rng = np.random.default_rng([seed, 104_729])
    bvecs = np.vstack([[0, 0, 0], g])
    bvals = np.r_[0.0, np.full(n_dirs, bval)]
    gm_int = s.params["gm_int"]
    csf_int = s.params["csf_int"]
    s0_cord = {c: s.fractions[c] * (gm_int if c in (4, 8) else 1.0) for c in range(1, 9)}
    s0_csf = s.csf * csf_int
    s0_other = np.clip(s.clean - sum(s0_cord.values()) - s0_csf, 0.0, None)
    out = np.zeros(s.clean.shape + (len(bvals),), np.float32)
    for n, (b, gv) in enumerate(zip(bvals, bvecs)):
        sig = s0_other * np.exp(-b * 1.5e-3) + s0_csf * np.exp(-b * 3.0e-3)
        for c in range(1, 9):
            sig = sig + s0_cord[c] * np.exp(-b * gv @ tensors[c] @ gv)
        out[..., n] = sig
    sigma = 1.0 / s.acquisition.snr
    noisy = np.sqrt((out * s.bias[..., None] + rng.normal(0, sigma, out.shape)) ** 2
                    + rng.normal(0, sigma, out.shape) ** 2)
    return (noisy * s.params["scale"]).astype(np.float32), bvals, bvecs


def fit_fa_md(dwi: F32, bvals: NDArray, bvecs: NDArray) -> tuple[F32, F32]:
    """FA and MD (mm^2/s) maps (H, W) of a (H, W, N) DWI: DIPY's weighted least-squares tensor
    fit, the service's own (:mod:`core.tensor.fit`)."""
    fit = TensorModel(gradient_table(bvals, bvecs=bvecs), fit_method="WLS").fit(np.asarray(dwi, np.float64))
    fa = np.clip(np.nan_to_num(fit.fa), 0, 1).astype(np.float32)
    return fa, np.nan_to_num(fit.md).astype(np.float32)
