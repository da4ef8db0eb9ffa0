"""Confidence per region and per slice (core/measures/confidence.py) and the test-time
augmentation behind it (core/segment/runtime.py, core/segment/tta.py): the mirrored run is
mirrored back with its sides swapped, and a disagreeing region is warned of."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import phantoms
import pytest

from core.labels import BACKGROUND, N_CLASSES
from core.measures.confidence import (
    WARN_BELOW,
    combine,
    confidence_measures,
    confidence_warnings,
)
from core.segment.runtime import Segmenter
from core.segment.tta import agreement


class HalvesSegmenter(Segmenter):
    """A network that knows anatomy's left and right: the bright cord's pixels at smaller
    row (world x, the patient's left in canonical RAS) than the cord's centre of mass are the
    left lateral funiculus (1), the rest the right (5). A real lightweight stand-in for the
    ONNX network (the model folder still loads; only the forward pass is replaced)."""

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        out = np.zeros((len(batch), N_CLASSES) + batch.shape[1:], np.float32)
        for n, image in enumerate(batch):
            cord = image > 0.5 * image.max()
            out[n, BACKGROUND] = ~cord
            if cord.any():
                ci = np.argwhere(cord)[:, 0].mean()
                rows = np.arange(image.shape[0])[:, None]
                out[n, 1] = cord & (rows < ci)
                out[n, 5] = cord & (rows >= ci)
        return out


def _asymmetric_b0() -> np.ndarray:
    """(40, 40, 3) a disc with a bump on the patient's left (smaller x): not mirror-symmetric."""
    ii, jj = np.mgrid[0:40, 0:40]
    disc = np.hypot(ii - 20, jj - 20) <= 6
    bump = (ii >= 11) & (ii <= 14) & (abs(jj - 20) <= 1)
    b0 = np.where(disc | bump, 500.0, 50.0).astype(np.float32)
    return np.repeat(b0[:, :, None], 3, axis=2)


def test_flip_augmentation_swaps_the_sides_back(decoder_dir: Path) -> None:
    segmenter = HalvesSegmenter(decoder_dir)
    seg = segmenter.segment(_asymmetric_b0(), zooms_mm=(1.0, 1.0, 4.0), augment=True)
    left, right = np.argwhere(seg.labels == 1), np.argwhere(seg.labels == 5)
    assert len(left) and len(right) and left[:, 0].mean() < right[:, 0].mean()
    assert seg.agreement is not None and seg.agreement.names == ("shift", "flip")
    flip = seg.agreement.volume[1]
    shift = seg.agreement.volume[0]
    # codes 1 and 5 are regions 0 and 4 in code order; the others are in neither labelling
    assert flip[0] == pytest.approx(1.0) and flip[4] == pytest.approx(1.0)
    assert shift[0] == pytest.approx(1.0) and shift[4] == pytest.approx(1.0)
    assert np.isnan(flip[[1, 2, 3, 5, 6, 7]]).all()
    assert seg.probabilities is not None and seg.probabilities.shape == (N_CLASSES,) + seg.labels.shape


def test_a_model_that_reads_sides_off_the_image_disagrees_under_the_flip(tmp_path: Path, decoder_dir: Path) -> None:
    """The decoder fixture maps intensity to code, so mirrored it puts 'left' codes on the
    patient's right: the flip's Dice for the sided regions is 0, and the shift's is 1."""
    info = phantoms.region_phantom(tmp_path / "p")
    b0 = 100.0 * info["labels"].astype(np.float32)
    seg = Segmenter(decoder_dir).segment(b0, zooms_mm=(1.0, 1.0, 4.0), augment=True)
    assert np.array_equal(seg.labels, info["labels"])
    shift, flip = seg.agreement.volume  # type: ignore[union-attr]
    assert np.all(shift > 0.9)
    assert np.all(flip == 0.0)


def test_confidence_combines_top_probability_and_agreement() -> None:
    assert combine(1.0, 0.81) == pytest.approx(0.9)
    assert combine(0.64, 1.0) == pytest.approx(0.8)
    assert combine(0.7, None) == pytest.approx(0.7)
    assert combine(None, 0.5) is None

    labels = phantoms.region_labels((30, 28, 2))
    probs = np.eye(N_CLASSES, dtype=np.float32)[labels].transpose(3, 0, 1, 2).copy()
    same = agreement(labels, {"shift": labels, "flip": labels})
    volume, slices = confidence_measures(labels, probs, same)
    assert all(volume[c]["confidence"] == pytest.approx(1.0) for c in range(1, 9))
    assert volume[4]["augmentation_dice"] == {"shift": 1.0, "flip": 1.0, "mean": 1.0}
    assert confidence_warnings(volume, slices) == []

    # the right gray matter (8) vanishes from both augmented labellings on slice 1 and the
    # network is unsure of it there: Dice 0 on that slice, confidence below the threshold
    other = labels.copy()
    other[:, :, 1][other[:, :, 1] == 8] = 5
    probs[:, :, :, 1][:, labels[:, :, 1] == 8] = 0.0
    probs[8, :, :, 1][labels[:, :, 1] == 8] = 0.5
    probs[5, :, :, 1][labels[:, :, 1] == 8] = 0.5
    volume, slices = confidence_measures(labels, probs, agreement(labels, {"shift": other, "flip": other}))
    assert slices[1][8]["augmentation_dice"] == 0.0 and slices[1][8]["top_probability"] == pytest.approx(0.5)
    assert slices[1][8]["confidence"] == 0.0 and slices[0][8]["confidence"] == pytest.approx(1.0)
    assert volume[8]["top_probability"] == pytest.approx(0.75)
    assert volume[8]["augmentation_dice"]["mean"] == pytest.approx(2 / 3)  # half the voxels agree
    assert volume[8]["confidence"] == pytest.approx(np.sqrt(0.75 * 2 / 3))
    warnings = confidence_warnings(volume, slices)
    assert len(warnings) == 1 and "right gray matter" in warnings[0]
    assert volume[8]["confidence"] < WARN_BELOW or "slice(s) 1" in warnings[0]
