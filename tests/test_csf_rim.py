"""The outline refinement by MD (worker.segment.csf_rim). Trim: outline voxels with CSF-like
MD go back to the background, never the inside of the cord, at most two layers deep, never
below the minimum. Growth: one layer of cord-like background neighbours the network gave some
cord probability joins the cord as the network's best region."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from worker.segment.csf_rim import (
    CORD_MD_MAX_MM2_S,
    CORD_MD_MM2_S,
    CSF_MD_MM2_S,
    GROW_MIN_CORD_PROBABILITY,
    MAX_LAYERS,
    refine_csf_rim,
)

CORD_MD = 0.9e-3
CSF_MD = 3.0e-3


def _disc(radius: float, shape: tuple[int, int] = (40, 40)) -> np.ndarray:
    i, j = np.indices(shape)
    return (i - 20) ** 2 + (j - 20) ** 2 <= radius**2


def _slice(cord_radius: float = 6.0, label_radius: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels over a disc of ``label_radius`` (left half code 1, right half code 5); MD of cord
    tissue inside ``cord_radius`` and of CSF outside it."""
    disc = _disc(label_radius)
    labels = np.zeros(disc.shape, np.uint8)
    labels[disc] = 1
    labels[disc & (np.indices(disc.shape)[0] >= 20)] = 5
    md = np.where(_disc(cord_radius), CORD_MD, CSF_MD)
    return labels, md


def test_an_outline_spilling_one_voxel_into_csf_is_trimmed_back_to_the_cord() -> None:
    labels, md = _slice(cord_radius=6.0, label_radius=7.0)
    trim = refine_csf_rim(labels, md, pixel_area_mm2=1.0)
    cord = _disc(6.0)
    assert np.array_equal(trim.labels > 0, cord)
    assert np.array_equal(trim.labels[cord], labels[cord])  # the codes inside are untouched
    assert trim.voxels_removed == int((labels > 0).sum() - cord.sum()) > 0
    assert trim.kept_slices == ()


def test_a_mask_that_stays_inside_the_cord_is_left_alone() -> None:
    labels, md = _slice(cord_radius=7.0, label_radius=6.0)
    trim = refine_csf_rim(labels, md, pixel_area_mm2=1.0)
    assert np.array_equal(trim.labels, labels) and trim.voxels_removed == 0


def test_the_inside_of_the_cord_is_never_carved_out() -> None:
    labels, md = _slice()
    md[_disc(2.0)] = CSF_MD  # a syrinx: fluid inside the cord
    trim = refine_csf_rim(labels, md, pixel_area_mm2=1.0)
    assert np.array_equal(trim.labels, labels)


def test_at_most_max_layers_are_peeled() -> None:
    labels, md = _slice(cord_radius=9.0, label_radius=12.0)  # a 3-voxel band; the cord the majority
    trim = refine_csf_rim(labels, md, pixel_area_mm2=1.0)
    kept = trim.labels > 0
    assert not trim.skipped and kept.sum() > _disc(9.0).sum()  # a band of CSF deeper than MAX_LAYERS stays
    peeled = labels > 0
    for _ in range(MAX_LAYERS):  # what MAX_LAYERS erosions of the outline leave
        peeled = ndimage.binary_erosion(peeled, ndimage.generate_binary_structure(2, 1))
    assert np.array_equal(kept, peeled)


def test_a_slice_the_trim_would_empty_keeps_its_labels_and_is_listed() -> None:
    labels, md = _slice(cord_radius=1.0, label_radius=2.0)
    md[:] = CSF_MD
    volume = np.stack([labels, _slice(6.0, 7.0)[0]], axis=2)
    md_volume = np.stack([md, _slice(6.0, 7.0)[1]], axis=2)
    trim = refine_csf_rim(volume, md_volume, pixel_area_mm2=1.0)
    assert trim.kept_slices == (0,)
    assert np.array_equal(trim.labels[:, :, 0], labels)
    assert trim.removed[0] == 0 and trim.removed[1] > 0
    assert np.array_equal(trim.labels[:, :, 1] > 0, _disc(6.0))


def test_only_the_largest_piece_survives_a_trim_that_splits_the_cord() -> None:
    labels, md = _slice()
    # a one-voxel-wide bridge of labelled CSF out to a small island of cord-like tissue
    labels[20, 27:33] = 5
    labels[19:22, 33:36] = 5
    md[19:22, 33:36] = CORD_MD
    trim = refine_csf_rim(labels, md, pixel_area_mm2=1.0)
    assert np.array_equal(trim.labels > 0, _disc(6.0))


def test_threshold_nan_and_grids() -> None:
    labels, md = _slice(cord_radius=6.0, label_radius=7.0)
    rim = (labels > 0) & ~_disc(6.0)
    md[rim] = CSF_MD_MM2_S * 0.99  # just below: not CSF-like
    assert refine_csf_rim(labels, md, pixel_area_mm2=1.0).voxels_removed == 0
    md[rim] = np.nan  # a voxel the fit could not resolve is not taken for CSF
    assert refine_csf_rim(labels, md, pixel_area_mm2=1.0).voxels_removed == 0
    with pytest.raises(ValueError, match="not on one grid"):
        refine_csf_rim(labels, md[:-1], pixel_area_mm2=1.0)


def test_a_cord_whose_median_md_no_cord_has_is_left_untrimmed() -> None:
    labels, md = _slice(cord_radius=6.0, label_radius=7.0)
    md = md * 2.5  # as if the b-values were read 2.5 times too small
    trim = refine_csf_rim(labels, md, pixel_area_mm2=1.0)
    assert trim.skipped and trim.cord_median_md > CORD_MD_MAX_MM2_S
    assert np.array_equal(trim.labels, labels) and trim.voxels_removed == 0
    assert not refine_csf_rim(*_slice(cord_radius=6.0, label_radius=7.0), pixel_area_mm2=1.0).skipped


def _maps(p_cord: float = 0.3, shape: tuple[int, int] = (40, 40)) -> dict[str, np.ndarray]:
    """Network maps for :func:`refine_csf_rim`'s growth: P(cord) ``p_cord`` everywhere, best
    region 3 on the left half (rows < 20) and 7 on the right."""
    best = np.where(np.indices(shape)[0] < 20, 3, 7).astype(np.uint8)
    return {"cord_probability": np.full(shape, p_cord, np.float32), "best_region": best}


def test_a_mask_one_voxel_short_of_the_cord_grows_onto_it_as_the_best_region() -> None:
    labels, md = _slice(cord_radius=7.0, label_radius=6.0)
    grown = refine_csf_rim(labels, md, pixel_area_mm2=1.0, **_maps())
    ring = _disc(7.0) & ~(labels > 0)
    # one 4-connected layer: the ring voxels that touch the labelled disc
    layer = ring & ndimage.binary_dilation(labels > 0, ndimage.generate_binary_structure(2, 1))
    assert layer.sum() > 0
    assert np.array_equal(grown.labels > 0, (labels > 0) | layer)
    assert np.array_equal(grown.labels[labels > 0], labels[labels > 0])
    assert np.array_equal(grown.labels[layer], _maps()["best_region"][layer])
    assert grown.voxels_added == int(layer.sum()) and grown.voxels_removed == 0


def test_the_growth_takes_one_layer_only() -> None:
    labels, md = _slice(cord_radius=9.0, label_radius=6.0)  # three voxels short
    grown = refine_csf_rim(labels, md, pixel_area_mm2=1.0, **_maps())
    one = ndimage.binary_dilation(labels > 0, ndimage.generate_binary_structure(2, 1))
    assert np.array_equal(grown.labels > 0, one)


def test_no_growth_into_csf_unsure_voxels_or_without_the_network_maps() -> None:
    labels, md = _slice(cord_radius=6.0, label_radius=6.0)  # the ring outside is CSF
    assert refine_csf_rim(labels, md, pixel_area_mm2=1.0, **_maps()).voxels_added == 0
    labels, md = _slice(cord_radius=7.0, label_radius=6.0)
    low = _maps(p_cord=GROW_MIN_CORD_PROBABILITY * 0.99)
    assert refine_csf_rim(labels, md, pixel_area_mm2=1.0, **low).voxels_added == 0
    assert refine_csf_rim(labels, md, pixel_area_mm2=1.0).voxels_added == 0  # trim only
    ring = _disc(7.0) & ~(labels > 0)
    md[ring] = CORD_MD_MM2_S  # at the threshold: not cord-like
    assert refine_csf_rim(labels, md, pixel_area_mm2=1.0, **_maps()).voxels_added == 0
    md[ring] = np.nan  # unresolved by the fit
    assert refine_csf_rim(labels, md, pixel_area_mm2=1.0, **_maps()).voxels_added == 0
    with pytest.raises(ValueError, match="not on one grid"):
        refine_csf_rim(labels, md, pixel_area_mm2=1.0, cord_probability=np.zeros((3, 3)), best_region=_maps()["best_region"])


def test_trim_then_grow_and_nothing_on_slices_without_cord_or_when_skipped() -> None:
    labels, md = _slice(cord_radius=6.0, label_radius=7.0)
    # on one side (columns < 16) the tissue is cord-like beyond the labels: kept there and
    # grown by a voxel; elsewhere the labelled ring is CSF: trimmed
    md[:, :16] = CORD_MD
    empty = np.zeros_like(labels)
    volume, md_volume = np.stack([labels, empty], axis=2), np.stack([md, md], axis=2)
    maps = {k: np.stack([v, v], axis=2) for k, v in _maps().items()}
    out = refine_csf_rim(volume, md_volume, pixel_area_mm2=1.0, **maps)
    assert out.removed[0] > 0 and out.added[0] > 0  # grown beyond the kept top of the ring
    assert out.removed[1] == 0 and out.added[1] == 0 and not out.labels[:, :, 1].any()
    skipped = refine_csf_rim(volume, md_volume * 2.5, pixel_area_mm2=1.0, **maps)
    assert skipped.skipped and skipped.voxels_added == 0 and np.array_equal(skipped.labels, volume)
