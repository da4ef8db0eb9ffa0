"""The gray-matter contrast of the second pass (core.segment.gray_contrast): the cord's inside
brightened by how far each voxel's FA lies from its slice's white matter towards its gray matter."""

import numpy as np
import pytest

from core.segment.gray_contrast import ERODE_VOXELS, GAIN, MIN_FA_GAP, gray_contrast_b0, gray_share


def _cord(fa_white: float = 0.7, fa_gray: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """(16, 16, 1) labels of a square cord 11 voxels wide: right gray matter (8) in a 3 x 3 middle,
    left lateral funiculus (1) around it; FA ``fa_white`` in white matter, ``fa_gray`` in gray."""
    labels = np.zeros((16, 16, 1), np.uint8)
    labels[2:13, 2:13] = 1
    labels[6:9, 6:9] = 8
    fa = np.where(labels == 8, fa_gray, np.where(labels > 0, fa_white, 0.0))
    return labels, fa


def test_gray_matter_is_brightened_by_its_fa_and_white_matter_is_not() -> None:
    labels, fa = _cord()
    fa[4, 4, 0] = 0.55  # a white-matter voxel halfway to the gray matter's FA
    out = gray_contrast_b0(np.full(labels.shape, 100.0), fa, labels)
    assert out[7, 7, 0] == pytest.approx(100 * (1 + GAIN))
    assert out[4, 4, 0] == pytest.approx(100 * (1 + GAIN / 2))
    assert out[10, 10, 0] == pytest.approx(100.0)
    fa[5, 5, 0] = 0.1  # lower than the gray matter's: no more than gray matter
    assert gray_share(fa, labels)[5, 5, 0] == pytest.approx(1.0)


def test_the_outline_and_the_outside_keep_their_b0() -> None:
    labels, fa = _cord()
    fa[labels == 1] = 0.7
    fa[2:2 + ERODE_VOXELS, :, 0] = 0.1  # low FA on the outline (partial volume with CSF) ...
    fa[0, :, 0] = 0.0  # ... and outside the cord
    share = gray_share(fa, labels)
    assert not share[:2 + ERODE_VOXELS].any()
    assert share[7, 7, 0] == pytest.approx(1.0)


def test_a_slice_without_gray_white_contrast_or_gray_matter_is_left_alone() -> None:
    labels, fa = _cord(fa_white=0.6, fa_gray=0.6 - MIN_FA_GAP / 2)
    assert not gray_share(fa, labels).any()
    no_gray = np.where(labels == 8, 1, labels).astype(np.uint8)
    assert not gray_share(_cord()[1], no_gray).any()
    assert not gray_share(np.zeros((4, 4, 2)), np.zeros((4, 4, 2), np.uint8)).any()


def test_grids_must_match() -> None:
    labels, fa = _cord()
    with pytest.raises(ValueError, match="one grid"):
        gray_share(fa[:-1], labels)
    with pytest.raises(ValueError, match="one grid"):
        gray_contrast_b0(np.ones((3, 3, 1)), fa, labels)


def test_low_fa_from_free_water_is_not_taken_for_gray_matter() -> None:
    """A voxel whose FA is low because its MD says it is part CSF is brightened only by its
    tissue share: none when all free water, half when half."""
    labels, fa = _cord()
    fa[5, 5, 0] = fa[5, 6, 0] = 0.4
    free_water = np.zeros(labels.shape)
    free_water[5, 5, 0], free_water[5, 6, 0] = 1.0, 0.5
    share = gray_share(fa, labels, free_water)
    assert share[5, 5, 0] == 0.0 and share[5, 6, 0] == pytest.approx(0.5)
    assert share[7, 7, 0] == pytest.approx(1.0)
    out = gray_contrast_b0(np.full(labels.shape, 10.0), fa, labels, gain=1.0, free_water=free_water)
    assert out[5, 6, 0] == pytest.approx(15.0)


def test_repartition_keeps_the_outline_and_takes_the_regions() -> None:
    """The cord and background of one segmentation, the regions of the other; the soft
    probabilities share the first's cord probability in the second's region proportions."""
    from core.segment.gray_contrast import repartition
    from core.segment.runtime import Segmentation

    shape = (4, 3, 1)
    outline_labels = np.zeros(shape, np.uint8)
    outline_labels[1:3, :, 0] = 1
    p_outline = np.zeros((9,) + shape, np.float32)
    p_outline[0] = np.where(outline_labels > 0, 0.2, 0.9)
    p_outline[1] = 1 - p_outline[0]
    p_part = np.zeros((9,) + shape, np.float32)
    p_part[0] = 0.5  # the partition's own background is ignored
    p_part[4] = 0.3
    p_part[1] = 0.2
    p_part[4, 2, 0, 0] = 0.1  # one voxel where the lateral funiculus ranks first
    outline = Segmentation(labels=outline_labels, cord_probability=1 - p_outline[0], probabilities=p_outline,
                           warnings=("kept",))
    partition = Segmentation(labels=np.zeros(shape, np.uint8), cord_probability=np.zeros(shape, np.float32),
                             probabilities=p_part)
    out = repartition(outline, partition)
    expected = np.where(outline_labels > 0, 4, 0)
    expected[2, 0, 0] = 1
    assert np.array_equal(out.labels, expected)
    assert out.warnings == ("kept",) and out.cord_probability is outline.cord_probability
    np.testing.assert_allclose(out.probabilities.sum(axis=0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out.probabilities[0], p_outline[0])
    assert out.probabilities[4, 1, 0, 0] == pytest.approx(0.8 * 0.3 / 0.5)
    no_probabilities = Segmentation(labels=outline_labels, cord_probability=np.zeros(shape, np.float32))
    assert repartition(outline, no_probabilities) is outline
