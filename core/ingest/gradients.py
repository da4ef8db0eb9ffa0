"""Reading and checking FSL-style gradient tables (``.bval`` / ``.bvec``).

FSL b-vectors are given in the image's *voxel* frame, with the x axis flipped when the
affine's determinant is positive (FSL's radiological convention). :func:`fsl_to_world` and
:func:`world_to_fsl` convert between that frame and world RAS+, so that any later
reorientation of the image can leave world-frame vectors untouched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from core.errors import GradientError
from core.ingest import rules

B0_THRESHOLD = 50.0
"""b-values (s/mm^2) below this count as b=0: scanners write 0.001-5 for their b=0 volumes."""

UNIT_TOLERANCE = 0.10
"""Diffusion-weighted b-vectors whose length is within 10 % of 1 are normalised; others rejected."""


def is_b0(bvals: NDArray[np.floating]) -> NDArray[np.bool_]:
    """Which volumes count as b=0: b-value below ``B0_THRESHOLD`` (s/mm^2)."""
    return np.asarray(bvals) < B0_THRESHOLD


def read_bvals(path: Path) -> NDArray[np.float64]:
    """Read a b-value file: one row or one column of numbers (s/mm^2). Returns shape (N,).

    The rules (layout, comments, limits) are :mod:`core.ingest.rules`', shared with the gateway.
    """
    name = Path(path).name
    return np.array(rules.bvalues_of(rules.read_table(path, what="b-value"), name=name), dtype=np.float64)


def read_bvecs(path: Path) -> NDArray[np.float64]:
    """Read a b-vector file in 3xN (FSL) or Nx3 layout. Returns shape (N, 3), unnormalised."""
    rows = rules.bvectors_of(rules.read_table(path, what="b-vector"), name=Path(path).name)
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def check_gradients(
    bvals: NDArray[np.floating], bvecs: NDArray[np.floating], *, n_volumes: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Validate a gradient table against an image and return it cleaned.

    Checks: counts equal the number of volumes; at least one b=0 (b < 50 s/mm^2); b-vectors of
    diffusion-weighted volumes of unit length within 10 % (normalised); at least six
    non-collinear directions (the tensor design matrix has rank 6).

    Parameters
    ----------
    bvals : (N,) s/mm^2.
    bvecs : (N, 3), any frame.
    n_volumes : number of volumes in the image.

    Returns
    -------
    bvals (N,) float64 with b=0 volumes set to exactly 0, and bvecs (N, 3) unit vectors
    (zero rows for b=0 volumes).
    """
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if bvecs.ndim != 2 or bvecs.shape[1] != 3:
        raise GradientError(f"the b-vectors must form a table of N x 3 numbers; they are {list(bvecs.shape)}")
    rules.check_gradient_counts(n_bvals=bvals.size, n_bvecs=bvecs.shape[0], n_volumes=n_volumes)
    if not (np.all(np.isfinite(bvals)) and np.all(np.isfinite(bvecs))):
        raise GradientError("the gradient table contains NaN or infinite values")
    b0 = is_b0(bvals)
    if not b0.any():
        raise GradientError(
            f"the study has no b=0 volume (no b-value below {B0_THRESHOLD:g} s/mm^2); "
            "the cord is segmented on the b=0 image, so one is required"
        )
    norms = np.linalg.norm(bvecs, axis=1)
    dw = ~b0
    bad = dw & (np.abs(norms - 1.0) > UNIT_TOLERANCE)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise GradientError(
            f"{int(bad.sum())} b-vectors of diffusion-weighted volumes are not of unit length "
            f"(volume {first} has length {norms[first]:.3f})"
        )
    clean = np.zeros_like(bvecs)
    clean[dw] = bvecs[dw] / norms[dw, None]
    n_dirs = count_directions(clean[dw])
    if tensor_rank(clean[dw]) < 6:
        raise GradientError(
            f"the study has {n_dirs} distinct diffusion directions, which do not determine a "
            "tensor: at least 6 non-collinear directions are needed"
        )
    out_bvals = np.where(b0, 0.0, bvals)
    return out_bvals, clean


def count_directions(vectors: NDArray[np.float64], *, tolerance_deg: float = 1.0) -> int:
    """Number of distinct directions among unit ``vectors`` (N, 3), treating +g and -g alike."""
    unique: list[NDArray[np.float64]] = []
    cos_tol = np.cos(np.deg2rad(tolerance_deg))
    for v in vectors:
        if not any(abs(float(v @ u)) >= cos_tol for u in unique):
            unique.append(v)
    return len(unique)


def tensor_rank(vectors: NDArray[np.float64]) -> int:
    """Rank of the tensor design matrix ``[gx^2, gy^2, gz^2, 2gxgy, 2gxgz, 2gygz]``; 6 means the
    directions determine a diffusion tensor."""
    if len(vectors) == 0:
        return 0
    g = vectors
    design = np.stack(
        [g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2, 2 * g[:, 0] * g[:, 1], 2 * g[:, 0] * g[:, 2], 2 * g[:, 1] * g[:, 2]],
        axis=1,
    )
    return int(np.linalg.matrix_rank(design, tol=1e-6))


def rotation_of(affine: NDArray[np.floating]) -> NDArray[np.float64]:
    """The orthonormal part (3, 3) of an affine's linear part (polar decomposition), mapping
    voxel-axis directions to world RAS+ directions. Removes voxel scaling and any shear."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    u, _, vt = np.linalg.svd(m)
    return u @ vt


def fsl_to_world(bvecs: NDArray[np.floating], affine: NDArray[np.floating]) -> NDArray[np.float64]:
    """Convert FSL-convention b-vectors (N, 3) of an image with ``affine`` to world RAS+."""
    g = np.asarray(bvecs, dtype=np.float64).copy()
    if np.linalg.det(np.asarray(affine)[:3, :3]) > 0:
        g[:, 0] = -g[:, 0]
    return g @ rotation_of(affine).T


def world_to_fsl(bvecs: NDArray[np.floating], affine: NDArray[np.floating]) -> NDArray[np.float64]:
    """Convert world RAS+ b-vectors (N, 3) to the FSL convention of an image with ``affine``."""
    g = np.asarray(bvecs, dtype=np.float64) @ rotation_of(affine)
    if np.linalg.det(np.asarray(affine)[:3, :3]) > 0:
        g[:, 0] = -g[:, 0]
    return g


def write_fsl(bvals: NDArray[np.floating], bvecs_fsl: NDArray[np.floating], *, bval_path: Path, bvec_path: Path) -> None:
    """Write FSL-style ``.bval`` (one row) and ``.bvec`` (three rows) files."""
    Path(bval_path).write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    rows = np.asarray(bvecs_fsl, dtype=np.float64).T
    Path(bvec_path).write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in rows) + "\n")
