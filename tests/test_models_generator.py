"""Synthetic-data generator: labels, sides, orientation and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from core.labels import BY_CODE, MIRROR_LUT
from models.atlas import load_atlas
from models.generator import (
    CROP_SIZE_PX,
    PATIENT_KEYS,
    SyntheticSlice,
    _root_sleeves,
    _tensor,
    draw_acquisition,
    generate,
    mirror,
    simulate_dwi,
    to_model_grid,
    training_sample,
)

LEFT = [c for c, r in BY_CODE.items() if r.side == "left"]
RIGHT = [c for c, r in BY_CODE.items() if r.side == "right"]
DORSAL = [c for c, r in BY_CODE.items() if r.tissue == "dorsal"]
VENTRAL = [c for c, r in BY_CODE.items() if r.tissue == "ventral"]


@pytest.fixture(scope="module")
def drawn() -> list[SyntheticSlice]:
    """``generate(seed)`` for seeds 0-119, made once for the tests that count over many slices."""
    return [generate(seed) for seed in range(120)]


def _centroid(labels: np.ndarray, codes: list[int]) -> np.ndarray:
    return np.argwhere(np.isin(labels, codes)).mean(axis=0)


def test_atlas_sides_in_world_frame() -> None:
    """In the committed atlas, i is world +x: left regions at smaller i; j is +y: dorsal
    columns posterior (smaller j) to the ventral funiculi."""
    atlas = load_atlas()
    w = atlas.regions.sum(axis=0)
    ii, jj = np.indices(w.shape[1:])
    cx = [(w[k] * ii).sum() / w[k].sum() for k in range(8)]
    cy = [(w[k] * jj).sum() / w[k].sum() for k in range(8)]
    for k in range(4):
        assert cx[k] < cx[k + 4]
    assert cy[1] < cy[2] and cy[5] < cy[6]
    assert atlas.regions.shape[1] == 8


@pytest.mark.parametrize("seed", range(12))
def test_left_regions_at_smaller_world_x_and_dorsal_posterior(seed: int) -> None:
    s = generate(seed)
    lab = s.labels
    assert set(np.unique(lab)) <= set(range(9))
    assert (lab > 0).sum() > 5
    left, right = _centroid(lab, LEFT), _centroid(lab, RIGHT)
    assert left[0] < right[0]
    if np.isin(lab, DORSAL).any() and np.isin(lab, VENTRAL).any():
        assert _centroid(lab, DORSAL)[1] < _centroid(lab, VENTRAL)[1]


def test_mirror_swaps_codes() -> None:
    img, lab = to_model_grid(generate(5))
    m_img, m_lab = mirror(img, lab)
    assert np.array_equal(m_img, img[::-1])
    assert np.array_equal(m_lab, np.asarray(MIRROR_LUT)[lab[::-1]])
    assert _centroid(m_lab, LEFT)[0] < _centroid(m_lab, RIGHT)[0]


def test_seeded_and_model_grid() -> None:
    a, b = generate(42), generate(42)
    assert np.array_equal(a.b0, b.b0) and np.array_equal(a.labels, b.labels)
    x, y = training_sample(42)
    assert x.shape == y.shape == (CROP_SIZE_PX, CROP_SIZE_PX) and x.dtype == np.float32 and y.dtype == np.uint8
    assert np.isfinite(x).all() and np.abs(x).max() <= 3.0


def test_soft_training_target_is_the_class_fractions_behind_the_labels() -> None:
    x_hard, labels = training_sample(42)
    x, fractions = training_sample(42, soft=True)
    assert np.array_equal(x, x_hard)
    assert fractions.shape == (9, CROP_SIZE_PX, CROP_SIZE_PX) and fractions.dtype == np.float32
    assert fractions.min() >= 0.0 and np.allclose(fractions.sum(axis=0), 1.0, atol=1e-5)
    assert np.array_equal(np.argmax(fractions, axis=0), labels)
    cord = fractions[1:].sum(axis=0)
    assert ((cord > 0.05) & (cord < 0.95)).any()  # partial-volume pixels at the cord's edge


def test_acquisition_ranges() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        acq = draw_acquisition(rng)
        assert 0.6 * 0.9 <= min(acq.spacing_mm) and max(acq.spacing_mm) <= 1.8 * 1.1
        assert 3.0 <= acq.thickness_mm <= 7.0
        assert 8.0 <= acq.snr <= 40.0


def test_root_sleeves_are_csf_wedges_leaving_the_sac_antero_laterally() -> None:
    """Both sleeves reach out of the sac (half-width 6 mm here), anterior (v > 0) rather than
    posterior, and wider where they leave the sac than further out."""
    v_mm, u_mm = np.meshgrid(np.arange(-20, 20, 0.25), np.arange(-30, 30, 0.25))
    u, v = u_mm.astype(np.float32), v_mm.astype(np.float32)
    for seed in range(10):
        w = _root_sleeves(np.random.default_rng(seed), u, v, 0.0, 0.0, 6.0)
        assert 0.0 <= w.min() and w.max() <= 1.0
        assert w[np.abs(u) > 8.0].max() > 0.45
        left, right = w[u < 0].sum(), w[u > 0].sum()
        assert min(left, right) > 0.3 * max(left, right) > 0
        assert w[v > 0].sum() > 3 * w[v < 0].sum()
        side = w * (u > 0)
        near, far = (side * (np.abs(u - 7) < 1)).sum(), (side * (np.abs(u - 12) < 1)).sum()
        assert near > far


def test_some_slices_have_csf_as_bright_as_the_cord(drawn: list[SyntheticSlice]) -> None:
    """The real b0 often shows CSF no brighter than the cord; about 28 % of slices do here."""
    low = np.mean([s.params["csf_int"] < 1.3 for s in drawn[:120]])
    assert 0.15 < low < 0.45


def test_some_fields_of_view_hold_little_more_than_the_cord(drawn: list[SyntheticSlice]) -> None:
    """About 10 % of slices have a tight 20-40 mm field of view, and still a cord in it."""
    tight = []
    for s in drawn[:100]:
        extent = [n * d for n, d in zip(s.acquisition.shape, s.acquisition.spacing_mm)]
        if max(extent) <= 40.0:
            tight.append(s)
    assert 3 <= len(tight) <= 25
    assert all(min(n * d for n, d in zip(s.acquisition.shape, s.acquisition.spacing_mm)) >= 10.0 for s in tight)
    assert all((s.labels > 0).sum() >= 5 for s in tight)


def test_a_patient_carries_over_to_other_slices_without_changing_their_other_draws() -> None:
    """``patient=`` (slices of one simulated study) replaces only the patient's values: given a
    slice's own, the slice is unchanged; given another's, it takes them."""
    a, b = generate(7), generate(8)
    again = generate(7, patient=a.params)
    assert np.array_equal(again.b0, a.b0) and np.array_equal(again.labels, a.labels)
    other = generate(7, patient=b.params)
    assert all(other.params[k] == b.params[k] for k in PATIENT_KEYS)
    assert other.params["theta_deg"] == a.params["theta_deg"] and other.params["level"] == a.params["level"]
    assert not np.array_equal(other.b0, a.b0)


def test_slices_of_one_patient_share_tensors_and_gradients_but_not_noise() -> None:
    acq = draw_acquisition(np.random.default_rng(3))
    s = generate(11, acquisition=acq)
    d1, bvals, g1 = simulate_dwi(s, 11, patient_seed=99)
    d2, _, g2 = simulate_dwi(s, 12, patient_seed=99)
    d3, _, g3 = simulate_dwi(s, 11, patient_seed=98)
    assert np.array_equal(g1, g2) and not np.array_equal(g1, g3)
    # outside the cord the signal is isotropic: the same slice seed gives the very same noise
    # whatever the patient, another slice seed other noise
    outside = s.fractions[1:].sum(axis=0) == 0
    assert np.array_equal(d1[outside], d3[outside]) and not np.array_equal(d1[outside], d2[outside])
    assert not np.array_equal(d1[~outside], d3[~outside])


@pytest.mark.parametrize("fa", [0.2, 0.4, 0.72, 0.9])
def test_simulated_tensors_have_the_fa_and_md_asked_for(fa: float) -> None:
    """Checked with DIPY's own FA and MD of the eigenvalues."""
    from dipy.reconst.dti import fractional_anisotropy, mean_diffusivity

    d = _tensor(fa, 0.8e-3, np.array([0.1, -0.2, 1.0]))
    ev = np.linalg.eigvalsh(d)
    assert fractional_anisotropy(ev) == pytest.approx(fa, abs=1e-9)
    assert mean_diffusivity(ev) == pytest.approx(0.8e-3, rel=1e-9)
    assert ev.min() > 0


def test_kspace_sampling_matches_block_centres_and_rings_at_edges() -> None:
    """k-space truncation samples where block averaging does (a smooth image: the same values)
    and rings at a sharp edge (overshoot, undershoot below zero in magnitude: a dark ripple)."""
    from models.generator import block_average, kspace_sample

    k, n = 4, 32
    ii, jj = np.meshgrid(np.arange(n * k), np.arange(n * k), indexing="ij")
    smooth = np.exp(-((ii - 60.3) ** 2 + (jj - 70.1) ** 2) / (2 * 20.0**2))
    assert np.abs(kspace_sample(smooth, k) - block_average(smooth, k)).max() < 0.01
    disc = (np.hypot(ii - 61.7, jj - 66.2) < 30.0).astype(float)
    sampled, averaged = kspace_sample(disc, k), block_average(disc, k)
    assert sampled.max() > averaged.max() + 0.05  # Gibbs overshoot inside the edge
    assert abs(sampled.mean() - averaged.mean()) < 0.01
    filtered = kspace_sample(disc, k, window=0.5)
    assert filtered.max() < sampled.max()  # a k-space filter damps the ringing
    partial = kspace_sample(disc, k, partial=0.25, pe_axis=0)
    assert not np.allclose(partial, sampled)


def test_kspace_option_changes_the_image_only() -> None:
    from models.generator import generate

    for seed in range(5):
        plain, sampled = generate(seed), generate(seed, kspace=1.0)
        assert sampled.params["kspace"] == 1.0 and plain.params["kspace"] == 0.0
        assert np.array_equal(plain.labels, sampled.labels)
        assert not np.allclose(plain.b0, sampled.b0)
        assert np.array_equal(generate(seed, kspace=0.0).b0, plain.b0)


def test_compressed_share_sets_how_many_cords_are_flattened(drawn: list[SyntheticSlice]) -> None:
    from models.generator import COMPRESSED_SHARE, generate

    seeds = range(40)
    default = [drawn[s].params["compression"] for s in seeds]
    assert [generate(s, compressed=COMPRESSED_SHARE).params["compression"] for s in seeds[:8]] == default[:8]
    assert all(c == 1.0 for c in (generate(s, compressed=0.0).params["compression"] for s in seeds[:10]))
    assert all(0.5 <= c <= 0.95 for c in (generate(s, compressed=1.0).params["compression"] for s in seeds[:10]))
    # a larger share flattens every cord the default flattens, by the same amount, and more
    more = [generate(s, compressed=0.6).params["compression"] for s in seeds]
    assert all(m == d for m, d in zip(more, default) if d < 1.0)
    assert sum(m < 1.0 for m in more) > sum(d < 1.0 for d in default)


def test_gamma_bends_midtones_only_where_asked() -> None:
    from models.generator import Variation, gamma_bend, training_sample

    ramp = np.linspace(0.0, 100.0, 201, dtype=np.float32)[None, :].repeat(3, axis=0)
    brighter, darker = gamma_bend(ramp, 0.6), gamma_bend(ramp, 1.6)
    mid = ramp == 50.0
    assert brighter[mid].min() > 55.0 and darker[mid].max() < 45.0
    assert np.all(np.diff(brighter[0]) >= 0) and np.all(np.diff(darker[0]) >= 0), "order kept"
    assert gamma_bend(ramp, 1.0) == pytest.approx(np.maximum(ramp, np.percentile(ramp, 1.0)), abs=1e-4)
    # off by default: the samples are the ones training always saw; on: same labels, other image
    for seed in range(3):
        plain, labels = training_sample(seed)
        same, _ = training_sample(seed, variation=Variation(gamma=0.0))
        bent, bent_labels = training_sample(seed, variation=Variation(gamma=1.0))
        assert np.array_equal(plain, same)
        assert np.array_equal(labels, bent_labels)
        assert not np.allclose(plain, bent)


def test_anatomy_warp_bends_the_cord_only_where_asked() -> None:
    from models.generator import WARP_MM, Variation, anatomy_warp, generate, training_sample

    axis = np.linspace(-14, 14, 113, dtype=np.float32)
    u, v = np.meshgrid(axis, axis, indexing="ij")
    for seed in range(3):
        wu, wv = anatomy_warp(np.random.default_rng(seed), u, v)
        shift = np.hypot(wu - u, wv - v)
        assert 0.0 < shift.max() <= WARP_MM[1] * np.sqrt(2) + 1e-5
        assert np.abs(np.diff(wu - u, axis=0)).max() < 0.1, "smooth: neighbours 0.25 mm apart move alike"
    # off by default (the slices training always saw); on: another layout, a whole partition
    changed = 0
    for seed in range(4):
        plain = generate(seed)
        assert np.array_equal(plain.labels, generate(seed, warp=0.0).labels)
        bent = generate(seed, warp=1.0)
        assert abs(int((bent.labels > 0).sum()) - int((plain.labels > 0).sum())) <= 0.25 * (plain.labels > 0).sum()
        assert set(np.unique(bent.labels)) == set(np.unique(plain.labels))
        changed += int(not np.array_equal(plain.labels, bent.labels))
        x, labels = training_sample(seed)
        x0, labels0 = training_sample(seed, variation=Variation(warp=0.0))
        assert np.array_equal(x, x0) and np.array_equal(labels, labels0)
    assert changed >= 3


def test_csf_void_darkens_a_sector_of_the_ring_only_where_asked() -> None:
    from models.generator import VOID_SIGNAL, Variation, csf_void, generate, simulate_dwi, training_sample

    axis = np.linspace(-14, 14, 113, dtype=np.float32)
    u, v = np.meshgrid(axis, axis, indexing="ij")
    behind = 0
    for seed in range(10):
        signal = csf_void(np.random.default_rng(seed), u, v, 0.0, 0.0, 2.0)
        assert VOID_SIGNAL[0] - 1e-6 <= signal.min() < 2.0 and signal.max() == np.float32(2.0)
        darkest = np.unravel_index(np.argmin(np.where(np.hypot(u, v) > 5, signal, np.inf)), u.shape)
        behind += int(v[darkest] < 0)
    assert behind >= 5, "most voids lie behind the cord (v < 0 is posterior)"
    assert np.array_equal(csf_void(np.random.default_rng(0), u, v, 0.0, 0.0, 0.5), np.full(u.shape, 0.5, np.float32)), \
        "CSF already darker than the void stays as it is"
    changed = 0
    for seed in range(4):
        plain = generate(seed)
        assert np.array_equal(plain.b0, generate(seed, void=0.0).b0)
        dark = generate(seed, void=1.0)
        assert np.array_equal(plain.labels, dark.labels) and np.array_equal(plain.fractions, dark.fractions)
        cord = plain.labels > 0
        assert np.allclose(plain.clean[cord & (plain.csf == 0)], dark.clean[cord & (plain.csf == 0)]), "cord untouched"
        assert (dark.clean <= plain.clean + 1e-6).all(), "a void only darkens"
        changed += int(not np.allclose(plain.clean, dark.clean))
        with pytest.raises(ValueError, match="uniform"):
            simulate_dwi(dark, seed)
        x, labels = training_sample(seed)
        x0, labels0 = training_sample(seed, variation=Variation(csf_void=0.0))
        assert np.array_equal(x, x0) and np.array_equal(labels, labels0)
    assert changed >= 3
