"""The yardstick's error breakdown and edge-limited ideal (models/yardstick/edges.py)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from models.yardstick.edges import error_sources, fa_error, fitted_fa, ideal_labels
from models.yardstick.render import draw_params, render

SEED = 11


@pytest.fixture(scope="module")
def study():
    """A drawn study made small: 40 x 40 x 3 at 1.1 mm, 15 directions, RAS."""
    p = draw_params(np.random.default_rng([SEED, 0]))
    return render(SEED, params=dataclasses.replace(p, voxel_mm=1.1, matrix=40, n_slices=3, n_dirs=15, b0_positions=(0, 8),
                                                   cord_xy_mm=(0.0, 0.0), storage="RAS", compression="none", depth_factor=1.0))


def test_vote_shares_sum_to_one_and_their_majority_is_the_truth(study) -> None:
    assert study.shares.shape == (9,) + study.labels.shape
    np.testing.assert_allclose(study.shares.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(study.shares.argmax(axis=0), study.labels)
    edge = (study.shares[0] > 0.2) & (study.shares[0] < 0.8)
    assert edge.any(), "a cord outline has partly filled voxels"


def test_the_ideal_is_the_truth_at_delta_zero_and_tosses_only_unsure_edge_voxels(study) -> None:
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(ideal_labels(study, 0.0, rng)[np.abs(study.shares[0] - 0.5) > 0], study.labels[np.abs(study.shares[0] - 0.5) > 0])
    guess = ideal_labels(study, 0.2, rng)
    changed = guess != study.labels
    assert changed.any()
    assert np.all(np.abs(1.0 - study.shares[0][changed] - 0.5) <= 0.2)
    assert set(np.unique(guess[changed])) <= set(range(9))


def test_error_sources_name_the_group_that_explains_the_error() -> None:
    truth = np.zeros((6, 6, 1), np.uint8)
    truth[1:5, 1:5] = 3
    truth[1:5, 4] = 4  # gray matter beside the region
    fa = np.where(truth == 3, 0.7, np.where(truth == 4, 0.4, 0.1)).astype(np.float32)
    labels = truth.copy()
    labels[1:5, 4] = 3  # the region took the gray matter
    labels[1, 1] = 0  # and lost a voxel to the background
    fa[1, 1] = 0.7
    sources = error_sources(truth, labels, fa, 3)
    assert sources["gray matter"].extra == 4 and sources["gray matter"].extra_fa == pytest.approx(0.4)
    assert sources["gray matter"].error_without_extra == pytest.approx(0.0, abs=1e-3)
    assert sources["background"].missed == 1 and sources["background"].extra == 0
    assert sources["background"].error_with_missed > 5.0
    assert fa_error(fa, labels == 3, truth == 3) > 5.0
    assert math.isnan(fa_error(fa, labels == 9, truth == 3))


def test_fa_is_fitted_over_both_cords(study, tmp_path: Path) -> None:
    fa = fitted_fa(study, None, tmp_path)
    assert fa.shape == study.labels.shape
    white = np.isin(study.labels, (1, 2, 3, 5, 6, 7))
    gray = np.isin(study.labels, (4, 8))
    assert fa[white].mean() > fa[gray].mean() > 0.1


def test_the_command_prints_both_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from models.yardstick.__main__ import main as yardstick
    from models.yardstick.edges import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--studies", "1", "--seed", "0", "--kept", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "is missing" in capsys.readouterr().err

    yardstick(["--studies", "1", "--seed", "0", "--keep", "--out", str(tmp_path)])
    capsys.readouterr()
    main(["--studies", "1", "--seed", "0", "--kept", str(tmp_path), "--delta", "0.1"])
    out = capsys.readouterr().out
    assert "delta 0.10 all" in out
    assert "Ventral FA error of the kept analyses" in out
    for group in ("background", "gray matter", "lateral", "dorsal", "ventral"):
        assert group in out
