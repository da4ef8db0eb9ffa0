"""The half-cord MD (core.segment.half_cord): the MD a voxel half cord tissue and half CSF
reads, per slice, from the study's own tissue MD and CSF-to-cord b0 ratio, and the trim at it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.segment.csf_rim import CSF_MD_MM2_S, trim_csf_rim
from core.segment.half_cord import CSF_DIFFUSIVITY_MM2_S, half_cord_md, md_half

B = 800.0
TISSUE_MD = 0.8e-3


def _fitted_md(cord_share: np.ndarray, ratio: float, bval: float = B) -> np.ndarray:
    """MD a mono-exponential fit gives voxels mixing cord tissue (volume share ``cord_share``,
    b0 1) and CSF (b0 ``ratio``), from their signal at b = 0 and b = ``bval``."""
    s0 = cord_share + (1 - cord_share) * ratio
    s = cord_share * np.exp(-bval * TISSUE_MD) + (1 - cord_share) * ratio * np.exp(-bval * CSF_DIFFUSIVITY_MM2_S)
    return -np.log(s / s0) / bval


def test_md_half_is_what_a_half_and_half_voxel_fits_to_and_rises_with_bright_csf() -> None:
    assert md_half(0.9e-3, 1.0, 800.0) == pytest.approx(1.55e-3, abs=0.01e-3)  # the figure csf_rim quotes
    assert md_half(0.9e-3, 2.0, 800.0) == pytest.approx(1.87e-3, abs=0.01e-3)
    for ratio in (0.5, 1.0, 1.7, 2.6):
        assert md_half(TISSUE_MD, ratio, B) == pytest.approx(float(_fitted_md(np.array(0.5), ratio)), rel=1e-9)
    ratios = [0.5, 1.0, 1.5, 2.0, 3.0]
    assert all(md_half(TISSUE_MD, a, B) < md_half(TISSUE_MD, b, B) for a, b in zip(ratios, ratios[1:]))
    assert md_half(TISSUE_MD, 0.0, B) == pytest.approx(TISSUE_MD)  # CSF with no signal: the voxel reads as tissue


def _study(ratio_by_slice: list[float | None], *, shape: tuple[int, int] = (40, 40)) -> tuple[np.ndarray, ...]:
    """Labels (a disc of radius 6 on each slice, or none where the ratio is None), MD (tissue
    inside, CSF in a ring 2-4 voxels out) and b0 (tissue 100, CSF ``ratio`` x 100)."""
    i, j = np.indices(shape)
    r = np.hypot(i - 20, j - 20)
    n = len(ratio_by_slice)
    labels = np.zeros(shape + (n,), np.uint8)
    md = np.zeros(shape + (n,), np.float32)
    b0 = np.full(shape + (n,), 30.0, np.float32)
    for z, ratio in enumerate(ratio_by_slice):
        md[..., z] = np.where(r <= 6, TISSUE_MD, 1.2e-3)
        if ratio is None:
            continue
        labels[..., z][r <= 6] = 1
        b0[..., z][r <= 6] = 100.0
        ring = (r > 7) & (r <= 9)
        md[..., z][ring] = CSF_DIFFUSIVITY_MM2_S
        b0[..., z][ring] = 100.0 * ratio
    return labels, md, b0


def test_each_slice_takes_its_own_csf_brightness_and_a_slice_without_csf_the_studys() -> None:
    labels, md, b0 = _study([1.0, 2.0, None, 1.5])
    md[..., 3][md[..., 3] == CSF_DIFFUSIVITY_MM2_S] = 1.2e-3  # no clear CSF near the cord on slice 3
    got = half_cord_md(labels, md, b0, bval_s_mm2=B)
    assert got[0] == pytest.approx(md_half(TISSUE_MD, 1.0, B), rel=1e-6)
    assert got[1] == pytest.approx(md_half(TISSUE_MD, 2.0, B), rel=1e-6)
    assert math.isnan(got[2])  # no cord
    assert got[3] == pytest.approx(md_half(TISSUE_MD, 1.5, B), rel=1e-6)  # median of slices 0 and 1's CSF


def test_the_trim_at_the_half_cord_md_keeps_the_voxels_that_are_mostly_cord() -> None:
    """A square cord with a row of outline voxels of every cord share from 5 to 95 % along its
    bottom edge: at the slice's half-cord MD the trim removes exactly those under half cord,
    whatever the CSF's brightness, and nothing of the cord inside."""
    shares = np.linspace(0.05, 0.95, 10)
    for ratio in (0.8, 1.0, 2.0, 2.8):
        labels = np.zeros((40, 40, 1), np.uint8)
        md = np.full(labels.shape, 1.2e-3, np.float32)
        b0 = np.full(labels.shape, 30.0, np.float32)
        labels[12:26, 10:30] = 1
        md[12:26, 10:30] = TISSUE_MD
        b0[12:26, 10:30] = 100.0
        md[28:31, 10:30] = CSF_DIFFUSIVITY_MM2_S  # clear CSF below the edge row
        b0[28:31, 10:30] = 100.0 * ratio
        cols = np.arange(15, 25)
        labels[26, cols] = 1
        md[26, cols, 0] = _fitted_md(shares, ratio)
        b0[26, cols, 0] = 100.0 * (shares + (1 - shares) * ratio)
        threshold = half_cord_md(labels, md, b0, bval_s_mm2=B)
        assert threshold[0] == pytest.approx(md_half(TISSUE_MD, ratio, B), rel=1e-6)
        trimmed = trim_csf_rim(labels, md, pixel_area_mm2=1.0, threshold_mm2_s=threshold).labels
        assert [bool(v) for v in trimmed[26, cols, 0]] == [bool(c > 0.5) for c in shares], f"CSF {ratio} x cord"
        assert trimmed[12:26, 10:30].all()
    assert _fitted_md(np.array(0.35), 0.8) < CSF_MD_MM2_S, "with dark CSF the fixed threshold keeps a mostly-CSF voxel"


def test_a_nan_threshold_leaves_its_slice_as_it_is() -> None:
    labels, md, b0 = _study([1.0, 1.0])
    labels[..., :][(md == CSF_DIFFUSIVITY_MM2_S)] = 1  # the CSF ring labelled: all outline voxels CSF-like
    out = trim_csf_rim(labels, md, pixel_area_mm2=1.0, threshold_mm2_s=np.array([np.nan, 1.5e-3]))
    assert np.array_equal(out.labels[..., 0], labels[..., 0])
    assert out.removed[1] > 0 and out.removed[0] == 0
    assert out.thresholds_mm2_s[1] == 1.5e-3 and math.isnan(out.thresholds_mm2_s[0])


def test_bad_inputs_are_refused() -> None:
    labels, md, b0 = _study([1.0])
    with pytest.raises(ValueError, match="b-value"):
        half_cord_md(labels, md, b0, bval_s_mm2=0.0)
    with pytest.raises(ValueError, match="one grid"):
        half_cord_md(labels, md[:-1], b0, bval_s_mm2=B)
    with pytest.raises(ValueError):
        trim_csf_rim(labels, md, pixel_area_mm2=1.0, threshold_mm2_s=np.array([1e-3, 2e-3]))
    assert np.isnan(half_cord_md(np.zeros_like(labels), md, b0, bval_s_mm2=B)).all()


def test_the_pipeline_takes_the_mean_b_value_of_the_weighted_volumes() -> None:
    from core.pipeline import diffusion_weighting

    assert diffusion_weighting(np.array([0.0, 5.0, 800.0, 1000.0, 0.0])) == pytest.approx(900.0)
    assert diffusion_weighting(np.array([0.0, 10.0])) is None
