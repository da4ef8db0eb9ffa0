"""The out-of-distribution check on real T2* and MT images (models/anatomy_check.py)."""

from __future__ import annotations

import numpy as np
import pytest

from core.labels import MIRROR_LUT
from core.settings import SHIPPED_MODEL_DIR
from models.anatomy_check import Case, check, load_cases, score
from models.evaluate import SliceSegmenter


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    return {c.name: c for c in load_cases()}


def test_references_line_up_with_their_images(cases: dict[str, Case]) -> None:
    assert set(cases) == {"t2s crop 0.5", "t2s crop 1.0", "t2s neck 0.5", "t2s neck 1.0", "mt1 0.84"}
    for c in cases.values():
        assert c.gray.shape == c.image.shape and c.scored.shape == (c.image.shape[2],) and c.scored.sum() >= 4
        if c.cord is not None:
            # the manual gray matter lies inside the cord mask, on the same grid
            assert (c.gray & c.cord).sum() >= 0.9 * c.gray.sum() > 0
    assert cases["t2s crop 1.0"].zooms_mm[:2] == pytest.approx((1.0, 1.0), abs=1e-3)
    regions = cases["mt1 0.84"].regions
    assert regions is not None
    ii = np.indices(regions.shape)[0]
    # the registered atlas keeps the patient's left at smaller world x (closest-canonical RAS)
    assert ii[np.isin(regions, [1, 2, 3, 4])].mean() < ii[np.isin(regions, [5, 6, 7, 8])].mean()


def test_scores_a_perfect_and_a_side_swapped_answer(cases: dict[str, Case]) -> None:
    c = cases["mt1 0.84"]
    assert c.regions is not None
    perfect = score(c, c.regions)
    assert perfect["region_dice"] == {k: pytest.approx(1.0) for k in perfect["region_dice"]}
    assert perfect["cord_found"] == perfect["left_at_smaller_x"] == perfect["dorsal_posterior"] == perfect["region_slices"] >= 2
    swapped = np.asarray(MIRROR_LUT, np.uint8)[c.regions]  # left and right codes exchanged in place
    bad = score(c, swapped)
    assert bad["left_at_smaller_x"] == 0 and bad["region_dice"]["left_gray"] < 0.5
    assert bad["cord_dice"] == pytest.approx(perfect["cord_dice"])


def test_shipped_model_on_real_t2star_and_mt() -> None:
    """The shipped model on images it was never trained on (not b0, not EPI), at DTI-like voxel
    sizes (0.84-1.0 mm; 0.5 mm is below the 0.6-1.8 mm it is trained for): the cord is found
    on every slice of the whole-neck T2* and the MT series and on most of the tightly cropped
    T2*, on the right side and the right way up, and the cord outlines agree with their
    references."""
    seg = SliceSegmenter(SHIPPED_MODEL_DIR)
    rows = {r["case"]: r for r in check(seg.volume_labels)}
    for name in ("t2s neck 1.0", "mt1 0.84"):
        r = rows[name]
        assert r["cord_found"] == r["left_at_smaller_x"] == r["dorsal_posterior"] == r["slices"], r
        assert r["gray_dice"] > 0.6, r
    crop = rows["t2s crop 1.0"]
    assert crop["cord_found"] == crop["left_at_smaller_x"] == crop["dorsal_posterior"] >= 7, crop
    assert crop["cord_dice"] > 0.75 and rows["mt1 0.84"]["cord_dice"] > 0.9
