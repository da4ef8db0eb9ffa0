"""Gradient-table parsing, validation and frame conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import phantoms
import pytest

from core.errors import GradientError
from core.ingest.gradients import (
    check_gradients,
    fsl_to_world,
    read_bvals,
    read_bvecs,
    tensor_rank,
    world_to_fsl,
)


def _table(n_dirs: int = 12) -> tuple[np.ndarray, np.ndarray]:
    dirs = phantoms.gradient_scheme(n_dirs)
    return np.concatenate([[0.0], np.full(n_dirs, 800.0)]), np.concatenate([[[0, 0, 0]], dirs])


def test_bvecs_in_3xn_and_nx3_layouts_agree(tmp_path: Path) -> None:
    _, bvecs = _table()
    np.savetxt(tmp_path / "rows.bvec", bvecs.T)
    np.savetxt(tmp_path / "cols.bvec", bvecs)
    np.testing.assert_allclose(read_bvecs(tmp_path / "rows.bvec"), bvecs, atol=1e-12)
    np.testing.assert_allclose(read_bvecs(tmp_path / "cols.bvec"), bvecs, atol=1e-12)


def test_bvals_as_row_or_column(tmp_path: Path) -> None:
    (tmp_path / "r.bval").write_text("0 800 800\n")
    (tmp_path / "c.bval").write_text("0\n800\n800\n")
    assert read_bvals(tmp_path / "r.bval").tolist() == [0, 800, 800]
    assert read_bvals(tmp_path / "c.bval").tolist() == [0, 800, 800]


def test_near_zero_bvalues_count_as_b0() -> None:
    bvals, bvecs = _table()
    bvals[0] = 4.9
    out, _ = check_gradients(bvals, bvecs, n_volumes=len(bvals))
    assert out[0] == 0.0


def test_slightly_long_vectors_are_normalised_and_long_ones_rejected() -> None:
    bvals, bvecs = _table()
    bvecs[3] *= 1.05
    _, clean = check_gradients(bvals, bvecs, n_volumes=len(bvals))
    assert np.linalg.norm(clean[3]) == pytest.approx(1.0)
    bvecs[3] *= 1.5
    with pytest.raises(GradientError, match="not of unit length"):
        check_gradients(bvals, bvecs, n_volumes=len(bvals))


def test_count_mismatch_names_both_numbers() -> None:
    bvals, bvecs = _table()
    with pytest.raises(GradientError, match=r"b-vector file has 12 entries but the image has 13 volumes"):
        check_gradients(bvals, bvecs[:-1], n_volumes=13)


def test_collinear_directions_are_rejected() -> None:
    bvals = np.array([0, 800, 800, 800, 800, 800, 800, 800.0])
    axis = np.array([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]])
    assert tensor_rank(axis[1:]) == 3
    with pytest.raises(GradientError, match="3 distinct diffusion directions"):
        check_gradients(bvals, axis, n_volumes=8)


def test_fsl_world_round_trip_for_any_storage() -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(20, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    for affine in (np.diag([-0.9, 0.9, 5, 1]), np.diag([0.9, 0.9, 5, 1]), np.diag([0.9, -0.9, -5, 1])):
        np.testing.assert_allclose(world_to_fsl(fsl_to_world(g, affine), affine), g, atol=1e-12)


def test_fsl_x_flip_for_positive_determinant() -> None:
    """FSL's convention: for a RAS-stored image (det > 0) the file's x is the negated voxel x."""
    g = np.array([[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(fsl_to_world(g, np.diag([1.0, 1, 1, 1])), [[-1.0, 0, 0]])
    np.testing.assert_allclose(fsl_to_world(g, np.diag([-1.0, 1, 1, 1])), [[-1.0, 0, 0]])
