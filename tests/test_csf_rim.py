"""The CSF-rim trim (core.segment.csf_rim): outline voxels with CSF-like MD (or, given the FA,
CSF-like FA for their slice's white matter) go back to the background, never the inside of the
cord, at most two layers deep, never below the minimum."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from core.segment.csf_rim import (
    CORD_MD_MAX_MM2_S,
    CSF_MD_MM2_S,
    FA_FRACTION,
    MAX_LAYERS,
    cord_median_md,
    md_is_cord_like,
    trim_csf_rim,
    white_matter_median_fa,
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
    trim = trim_csf_rim(labels, md, pixel_area_mm2=1.0)
    cord = _disc(6.0)
    assert np.array_equal(trim.labels > 0, cord)
    assert np.array_equal(trim.labels[cord], labels[cord])  # the codes inside are untouched
    assert trim.voxels_removed == int((labels > 0).sum() - cord.sum()) > 0
    assert trim.kept_slices == ()


def test_a_mask_that_stays_inside_the_cord_is_left_alone() -> None:
    labels, md = _slice(cord_radius=7.0, label_radius=6.0)
    trim = trim_csf_rim(labels, md, pixel_area_mm2=1.0)
    assert np.array_equal(trim.labels, labels) and trim.voxels_removed == 0


def test_the_inside_of_the_cord_is_never_carved_out() -> None:
    labels, md = _slice()
    md[_disc(2.0)] = CSF_MD  # a syrinx: fluid inside the cord
    trim = trim_csf_rim(labels, md, pixel_area_mm2=1.0)
    assert np.array_equal(trim.labels, labels)


def test_at_most_max_layers_are_peeled() -> None:
    labels, md = _slice(cord_radius=9.0, label_radius=12.0)  # a 3-voxel band; the cord the majority
    trim = trim_csf_rim(labels, md, pixel_area_mm2=1.0)
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
    trim = trim_csf_rim(volume, md_volume, pixel_area_mm2=1.0)
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
    trim = trim_csf_rim(labels, md, pixel_area_mm2=1.0)
    assert np.array_equal(trim.labels > 0, _disc(6.0))


def test_threshold_nan_and_grids() -> None:
    labels, md = _slice(cord_radius=6.0, label_radius=7.0)
    rim = (labels > 0) & ~_disc(6.0)
    md[rim] = CSF_MD_MM2_S * 0.99  # just below: not CSF-like
    assert trim_csf_rim(labels, md, pixel_area_mm2=1.0).voxels_removed == 0
    md[rim] = np.nan  # a voxel the fit could not resolve is not taken for CSF
    assert trim_csf_rim(labels, md, pixel_area_mm2=1.0).voxels_removed == 0
    with pytest.raises(ValueError, match="not on one grid"):
        trim_csf_rim(labels, md[:-1], pixel_area_mm2=1.0)


def test_a_cord_whose_median_md_no_cord_has_is_left_untrimmed() -> None:
    labels, md = _slice(cord_radius=6.0, label_radius=7.0)
    md = md * 2.5  # as if the b-values were read 2.5 times too small
    trim = trim_csf_rim(labels, md, pixel_area_mm2=1.0)
    assert trim.skipped and trim.cord_median_md > CORD_MD_MAX_MM2_S
    assert np.array_equal(trim.labels, labels) and trim.voxels_removed == 0
    assert not trim_csf_rim(*_slice(cord_radius=6.0, label_radius=7.0), pixel_area_mm2=1.0).skipped


def test_the_cord_median_md_guard() -> None:
    labels, md = _slice(cord_radius=6.0, label_radius=6.0)
    assert cord_median_md(labels, md) == pytest.approx(CORD_MD)
    md[labels > 0] = np.nan
    assert np.isnan(cord_median_md(labels, md)) and md_is_cord_like(float("nan"))
    assert md_is_cord_like(CORD_MD_MAX_MM2_S) and not md_is_cord_like(CORD_MD_MAX_MM2_S * 1.01)


WM_FA = 0.7


def _fa_slice() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A cord (radius 6; codes 1 and 5, white matter) whose one-voxel outline spills into
    voxels with cord-like MD but CSF-like FA (mostly CSF: the tissue share carries the MD);
    returns labels, MD, FA and that rim."""
    labels, _ = _slice(cord_radius=6.0, label_radius=7.0)
    rim = (labels > 0) & ~_disc(6.0)
    md = np.full(labels.shape, CORD_MD)
    fa = np.where(rim, 0.2, WM_FA)
    return labels, md, fa, rim


def test_outline_voxels_with_csf_like_fa_for_their_slice_are_trimmed() -> None:
    labels, md, fa, rim = _fa_slice()
    assert trim_csf_rim(labels, md, pixel_area_mm2=1.0).voxels_removed == 0  # MD alone sees nothing
    trim = trim_csf_rim(labels, md, pixel_area_mm2=1.0, fa=fa)
    assert np.array_equal(trim.labels > 0, _disc(6.0)) and trim.voxels_removed == int(rim.sum())
    assert trim.fa_thresholds == pytest.approx((FA_FRACTION * WM_FA,))


def test_the_fa_line_follows_the_slices_own_white_matter() -> None:
    labels, md, fa, rim = _fa_slice()
    # a cord whose FA is low throughout (as in myelopathy): the same rim is no longer CSF-like
    low = np.where(rim, 0.2, 0.45)
    assert trim_csf_rim(labels, md, pixel_area_mm2=1.0, fa=low).voxels_removed == 0
    # gray matter reaching the outline (FA 0.6 x white matter) stays; gray matter does not set the line
    gray = labels.copy()
    gray[rim & (np.indices(labels.shape)[1] < 20)] = 4
    fa_gray = np.where(gray == 4, 0.6 * WM_FA, WM_FA)
    trim = trim_csf_rim(gray, md, pixel_area_mm2=1.0, fa=fa_gray)
    assert trim.voxels_removed == 0 and trim.fa_thresholds == pytest.approx((FA_FRACTION * WM_FA,))


def test_the_fa_trim_never_carves_the_inside_nor_reads_nan() -> None:
    labels, md, fa, rim = _fa_slice()
    inside = _disc(3.0)
    fa[inside] = 0.05  # an isotropic inside (a syrinx) stays
    fa[rim] = np.nan  # a voxel the fit did not resolve is not taken for CSF
    trim = trim_csf_rim(labels, md, pixel_area_mm2=1.0, fa=fa)
    assert np.array_equal(trim.labels, labels)
    no_white = np.where(labels > 0, 4, 0).astype(np.uint8)  # no white matter: no line on the slice
    assert np.isnan(white_matter_median_fa(no_white[:, :, None], fa[:, :, None])[0])
    assert trim_csf_rim(no_white, md, pixel_area_mm2=1.0, fa=np.where(rim, 0.01, WM_FA)).voxels_removed == 0
    with pytest.raises(ValueError, match="not on one grid"):
        trim_csf_rim(labels, md, pixel_area_mm2=1.0, fa=fa[:-1])
