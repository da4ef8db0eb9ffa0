"""Anatomically whole masks (core/segment/whole.py): holes in the cord filled, a stray piece
of a region given to its neighbour, and a region that cannot be made one piece reported."""

from __future__ import annotations

import numpy as np
import phantoms

from core.labels import N_CLASSES
from core.segment.whole import anatomy_section, fragment_warnings, make_whole


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(N_CLASSES, dtype=np.float32)[labels].transpose(3, 0, 1, 2).copy()


def test_a_whole_cord_is_left_as_it_is() -> None:
    labels = phantoms.region_labels((30, 28, 3))
    whole = make_whole(labels, _one_hot(labels))
    assert np.array_equal(whole.labels, labels)
    assert whole.filled.sum() == 0 and whole.reassigned.sum() == 0
    assert whole.fragmented == {} and whole.absent == {}


def test_a_hole_is_filled_by_the_nearest_label_or_the_most_probable_region() -> None:
    truth = phantoms.region_labels((30, 28, 1))
    holed = truth.copy()
    holed[10, 14, 0] = 0  # inside the left lateral funiculus, all four neighbours lateral
    assert truth[10, 14, 0] == 1
    whole = make_whole(holed)
    assert whole.filled.tolist() == [1] and np.array_equal(whole.labels, truth)

    holed = truth.copy()
    holed[11, 14, 0] = 0  # lateral funiculus, beside the left gray matter
    assert truth[11, 14, 0] == 1 and truth[12, 14, 0] == 4
    probs = _one_hot(truth)
    probs[:, 11, 14, 0] = 0.0
    probs[4, 11, 14, 0] = 0.6  # the network thinks it is gray matter, though not sure
    probs[0, 11, 14, 0] = 0.4
    whole = make_whole(holed, probs)
    assert whole.labels[11, 14, 0] == 4 and whole.filled.sum() == 1 and whole.reassigned.sum() == 0


def test_a_stray_piece_of_a_region_is_given_to_its_neighbour() -> None:
    truth = phantoms.region_labels((30, 28, 2))
    stray = truth.copy()
    stray[9, 14, 1] = 4  # a gray-matter voxel alone in the left lateral funiculus
    stray[10, 14, 1] = 4
    whole = make_whole(stray, _one_hot(truth), reassign=True)
    assert np.array_equal(whole.labels, truth)
    assert whole.reassigned.tolist() == [0, 2] and whole.fragmented == {}
    section = anatomy_section(whole)
    assert section["reassigned_voxels"] == 2 and section["filled_voxels"] == 0 and section["slices"] == []


def test_a_stray_piece_goes_to_the_most_probable_neighbour() -> None:
    lab = np.zeros((9, 9, 1), np.uint8)
    lab[1:8, 1:8] = 1
    lab[1:8, 5:8] = 2
    lab[4, 4] = 3  # stray: touches region 1 on three sides and region 2 on one
    lab[1:3, 1:3] = 3  # the region's largest piece
    probs = _one_hot(lab)
    probs[:, 4, 4, 0] = 0.0
    probs[2, 4, 4, 0], probs[1, 4, 4, 0] = 0.7, 0.3
    assert make_whole(lab, probs, reassign=True).labels[4, 4, 0] == 2
    assert make_whole(lab, reassign=True).labels[4, 4, 0] == 1  # without probabilities: the longest border


def test_a_region_that_cannot_be_made_one_piece_is_reported() -> None:
    lab = np.zeros((20, 12, 2), np.uint8)
    lab[2:8, 2:8, 0] = 1  # one cord of the left lateral funiculus ...
    lab[2:8, 5:8, 0] = 2
    lab[12:16, 2:6, 0] = 1  # ... and a second, detached piece with no other region beside it
    lab[2:8, 2:8, 1] = 1
    whole = make_whole(lab)
    assert whole.fragmented == {0: (1,)}
    assert whole.absent[0] == (3, 4, 5, 6, 7, 8) and whole.absent[1] == (2, 3, 4, 5, 6, 7, 8)
    assert np.array_equal(whole.labels, lab)  # nothing could be moved
    section = anatomy_section(whole)
    assert section["slices"][0] == {
        "index": 0,
        "fragmented": ["left_lateral"],
        "absent": ["left_ventral", "left_gray", "right_lateral", "right_dorsal", "right_ventral", "right_gray"],
    }
    assert section["slices"][1]["fragmented"] == []
    (warning,) = fragment_warnings(whole)
    assert "left lateral funiculus" in warning and "slice(s) 0" in warning


def test_switched_off_the_section_says_so() -> None:
    assert anatomy_section(None) == {"applied": False, "filled_voxels": 0, "reassigned_voxels": 0, "slices": []}
