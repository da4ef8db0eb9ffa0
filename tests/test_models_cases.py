"""Study-level evaluation (models.cases): simulated cases and their scoring."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from phantoms import exact_segmentation

from core.segment.runtime import Segmentation
from models.cases import case_slices, evaluate_cases
from models.generator import PATIENT_KEYS
from models.strata import fa_error_pct


def test_slices_of_a_case_share_the_acquisition_and_the_patient_but_not_the_anatomy() -> None:
    slices = [s for _, s in case_slices(2, 4)]
    assert len({s.acquisition for s in slices}) == 1
    for k in PATIENT_KEYS:
        assert len({s.params[k] for s in slices}) == 1, k
    assert len({s.params["theta_deg"] for s in slices}) == 4
    assert [seed for seed, _ in case_slices(2, 4)] != [seed for seed, _ in case_slices(3, 4)]


class _Oracle:
    """Answers each slice of the evaluation's cases, in order, with its exact labels."""

    def __init__(self, slices: int, spoil: bool = False) -> None:
        self.truth: Iterator = (s.labels.copy() for case in range(2) for _, s in case_slices(case, slices))
        self.spoil = spoil

    def segment(self, image: np.ndarray, spacing_mm: tuple[float, float]) -> Segmentation:
        truth = next(self.truth)
        if self.spoil:  # every left ventral voxel called left lateral
            truth[truth == 3] = 1
        return exact_segmentation(truth)

    def refined(self, seg: Segmentation, b0: np.ndarray, md: np.ndarray, spacing_mm: tuple[float, float], *,
                fa: np.ndarray | None = None) -> np.ndarray:
        assert fa is not None and md.shape == b0.shape == seg.labels.shape == fa.shape
        return seg.labels


def test_case_scores_are_perfect_for_exact_labels_and_notice_a_swapped_region() -> None:
    perfect = evaluate_cases(_Oracle(3), 2, 3)
    assert sum(b["cases"] for b in perfect["by_voxel_size"].values()) == 2
    for key, row in perfect["regions"].items():
        assert row["dice_case_mean"] == 1.0 and row["fa_error_pct"] == 0.0, key
        assert row["slice_fa_error_pct"] == 0.0 and row["missed_cases"] == 0 and row["cases"] >= 1, key
    spoiled = evaluate_cases(_Oracle(3, spoil=True), 2, 3)["regions"]
    ventral = spoiled["left_ventral"]
    assert ventral["dice_case_mean"] == 0.0 and ventral["missed_cases"] == ventral["cases"] >= 1
    lateral = spoiled["left_lateral"]
    assert 0.0 < lateral["dice_case_mean"] < 1.0
    assert lateral["fa_error_pct"] > 0.0 and abs(lateral["fa_bias_pct"]) <= lateral["fa_error_pct"]
    assert spoiled["right_lateral"]["fa_error_pct"] == 0.0


def test_fa_error_is_signed_relative_to_the_true_mean_in_percent() -> None:
    assert fa_error_pct(0.55, 0.5) == pytest.approx(10.0)
    assert fa_error_pct(0.45, 0.5) == pytest.approx(-10.0)
    assert fa_error_pct(0.5, 0.5) == 0.0
