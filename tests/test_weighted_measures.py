"""Probability-weighted regional means (core/measures/weighted.py) on phantoms with known
answers: equal to the binary mean for one-hot probabilities, steadier than it when one edge
voxel tips over to the wrong region, and following the refinement's trim."""

from __future__ import annotations

import numpy as np
import phantoms
import pytest

from core.labels import N_CLASSES
from core.measures import regions as binary
from core.measures.weighted import (
    DEFAULT_ESTIMATOR,
    MIN_WEIGHT,
    headline,
    weighted_measures,
)
from core.segment.refine import without_removed
from core.tensor.fit import TensorMaps


def _maps(fa: np.ndarray, md: np.ndarray) -> TensorMaps:
    z = np.zeros_like(fa, dtype=np.float32)
    return TensorMaps(
        fa=fa.astype(np.float32), md=md.astype(np.float32), ad=z, rd=z,
        v1=np.zeros(fa.shape + (3,), np.float32), mask=np.ones(fa.shape, bool), method="WLS",
    )


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(N_CLASSES, dtype=np.float32)[labels].transpose(3, 0, 1, 2).copy()


def test_weighted_mean_equals_binary_mean_for_one_hot_probabilities() -> None:
    labels = phantoms.region_labels((30, 28, 3))
    rng = np.random.default_rng(1)
    maps = _maps(rng.uniform(0.2, 0.9, labels.shape), rng.uniform(0.5e-3, 1.5e-3, labels.shape))
    expected = binary.region_measures(labels, maps, voxel_volume_mm3=1.0)
    expected_slices, _ = binary.slice_measures(labels, maps, pixel_area_mm2=1.0)
    for probabilities in (_one_hot(labels), None):  # None: the labels taken as one-hot
        volume, slices = weighted_measures(labels, probabilities, maps)
        for entry in expected:
            assert volume[entry["code"]]["fa_weighted"] == pytest.approx(entry["fa"]["mean"], rel=1e-6)
            assert volume[entry["code"]]["md_weighted"] == pytest.approx(entry["md"]["mean"], rel=1e-6)
        for z, entry in enumerate(expected_slices):
            for code, key in ((1, "left_lateral"), (8, "right_gray")):
                assert slices[z][code]["fa_weighted"] == pytest.approx(entry["regions"][key]["fa_mean"], rel=1e-6)


def _soft_edge_phantom() -> tuple[np.ndarray, np.ndarray, TensorMaps, tuple[int, int, int]]:
    """One slice: a small gray-matter region (code 4, FA 0.40, 9 voxels) inside a lateral
    funiculus (code 1, FA 0.80); the network's P(4) falls off smoothly across the edge
    (0.95 inside, 0.45 on the ring just outside, 0.10 two voxels out). Returns the true labels,
    the probabilities, the maps and an edge voxel outside the truth."""
    shape = (15, 15, 1)
    ii, jj = np.mgrid[0:15, 0:15]
    cheb = np.maximum(abs(ii - 7), abs(jj - 7))[:, :, None]
    cord = cheb <= 6
    truth = np.where(cheb <= 1, 4, np.where(cord, 1, 0)).astype(np.uint8)
    p4 = np.select([cheb <= 1, cheb == 2, cheb == 3], [0.95, 0.45, 0.10], 0.0).astype(np.float32)
    probs = np.zeros((N_CLASSES,) + shape, np.float32)
    probs[4] = np.where(cord, p4, 0.0)
    probs[1] = np.where(cord, 1.0 - p4, 0.0)
    probs[0] = np.where(cord, 0.0, 1.0)
    maps = _maps(np.where(truth == 4, 0.40, np.where(cord, 0.80, 0.0)), np.where(cord, 0.8e-3, 3e-3))
    return truth, probs, maps, (7, 9, 0)


def test_weighted_mean_moves_less_than_the_binary_mean_under_a_one_voxel_mislabel() -> None:
    truth, probs, maps, edge = _soft_edge_phantom()
    assert truth[edge] == 1 and probs[4][edge] == pytest.approx(0.45)
    # One edge voxel tips over: P(4) 0.45 -> 0.55, so the argmax labels it gray matter.
    tipped = probs.copy()
    tipped[4][edge], tipped[1][edge] = 0.55, 0.45
    mislabelled = truth.copy()
    mislabelled[edge] = 4
    assert np.array_equal(np.argmax(tipped, axis=0), mislabelled)

    def both(labels: np.ndarray, p: np.ndarray) -> tuple[float, float]:
        bin_fa = binary.region_measures(labels, maps, voxel_volume_mm3=1.0)[3]["fa"]["mean"]
        return bin_fa, weighted_measures(labels, p, maps)[0][4]["fa_weighted"]

    binary_before, weighted_before = both(truth, probs)
    binary_after, weighted_after = both(mislabelled, tipped)
    assert binary_before == pytest.approx(0.40)
    assert binary_after == pytest.approx((9 * 0.40 + 0.80) / 10)  # one voxel in ten: +10 %
    assert abs(weighted_after - weighted_before) < 0.25 * abs(binary_after - binary_before)


def test_weights_ignore_small_probabilities_and_voxels_off_the_cord() -> None:
    truth, probs, maps, _ = _soft_edge_phantom()
    far = probs.copy()
    far[4][0, 0, 0] = 0.9  # off the cord (and its one-voxel rim): no weight
    far[4][1, 7, 0] = MIN_WEIGHT / 2  # in the cord, too small to count
    assert weighted_measures(truth, far, maps)[0][4] == weighted_measures(truth, probs, maps)[0][4]


def test_a_trimmed_voxel_weighs_nothing() -> None:
    truth, probs, _, edge = _soft_edge_phantom()
    trimmed = truth.copy()
    trimmed[edge] = 0  # the refinement's trim took it as CSF
    after = without_removed(probs, before=truth, after=trimmed)
    assert after is not None and after[4][edge] == 0 and after[1][edge] == 0 and after[0][edge] == 1
    assert probs[4][edge] == pytest.approx(0.45)  # the input is not changed
    assert without_removed(None, before=truth, after=trimmed) is None


def test_the_default_estimator_is_the_binary_mean_and_headline_follows_it() -> None:
    assert DEFAULT_ESTIMATOR == "binary-mean"
    entry = {"fa": {"mean": 0.7}, "fa_weighted": 0.65}
    assert headline(entry, "fa") == 0.7
    assert headline(entry, "fa", estimator="probability-weighted-mean") == 0.65
    assert headline({"fa_mean": 0.5, "fa_weighted": 0.4}, "fa") == 0.5
