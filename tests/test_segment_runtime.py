"""The ONNX run-time: manifest checks and the geometry between the input grid and the model's
grid, with a decoder 'model' whose answer is known exactly (label = b0 / 100)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import phantoms
import pytest

from core.errors import ModelError
from core.segment.runtime import Segmenter, load_segmenter
from core.settings import SHIPPED_MODEL_DIR


def _dice(a: np.ndarray, b: np.ndarray, code: int) -> float:
    x, y = a == code, b == code
    return 2 * np.logical_and(x, y).sum() / max(1, x.sum() + y.sum())


def test_exact_round_trip_at_the_model_spacing(decoder_dir: Path) -> None:
    labels = phantoms.region_labels((40, 36, 3), centre=(12.0, 20.0))
    b0 = labels.astype(np.float32) * phantoms.SCALE
    seg = Segmenter(decoder_dir).segment(b0, zooms_mm=(1.0, 1.0, 4.0))
    assert np.array_equal(seg.labels, labels)
    assert seg.warnings == ()


def test_resampled_round_trip_keeps_the_geometry(tmp_path: Path) -> None:
    """Input at 0.9 mm, model at 0.5 mm: the cord outline and the two halves come back in place.

    A cord of two codes only (1 on the left half, 5 on the right): with this decoder, the
    intensities interpolated across a border decode to the codes in between, so only two
    well-separated codes make a clean test of the geometry.
    """
    model = phantoms.decoder_model(tmp_path, spacing_mm=0.5, crop_px=48)
    shape = (60, 50, 2)
    ii, jj = np.mgrid[0 : shape[0], 0 : shape[1]]
    disc = np.hypot(ii - 30.3, jj - 20.6) <= 9.0
    half = np.where(ii < 30.3, 1, 5)
    labels = np.repeat(np.where(disc, half, 0)[:, :, None], shape[2], axis=2).astype(np.uint8)
    seg = Segmenter(model).segment(labels.astype(np.float32) * phantoms.SCALE, zooms_mm=(0.9, 0.9, 5.0))
    got, want = seg.labels > 0, labels > 0
    assert 2 * np.logical_and(got, want).sum() / (got.sum() + want.sum()) > 0.95
    for code in (1, 5):
        centre_got = np.argwhere(seg.labels[:, :, 0] == code).mean(axis=0)
        centre_want = np.argwhere(labels[:, :, 0] == code).mean(axis=0)
        # mm, under one 0.9 mm voxel: the decoder's in-between codes at the right half's edge
        # give code 1 about ten voxels right of the midline, which pull its centre by 0.59 mm
        # (0.64 mm once edge voxels more probably cord than not are cord); code 5: 0.36 mm
        assert np.linalg.norm((centre_got - centre_want) * 0.9) < 0.75, code


def test_cord_near_the_edge_of_the_field(decoder_dir: Path) -> None:
    """The crop overhangs the field of view: padding must not shift the labels."""
    labels = phantoms.region_labels((40, 36, 1), centre=(7.0, 28.0), radius_vox=6.0)
    b0 = labels.astype(np.float32) * phantoms.SCALE
    seg = Segmenter(decoder_dir).segment(b0, zooms_mm=(1.0, 1.0, 4.0))
    assert np.array_equal(seg.labels, labels)


def test_slice_without_cord_gets_no_labels_and_a_warning(decoder_dir: Path) -> None:
    labels = phantoms.region_labels((40, 36, 3))
    labels[:, :, 1] = 0
    b0 = labels.astype(np.float32) * phantoms.SCALE
    seg = Segmenter(decoder_dir).segment(b0, zooms_mm=(1.0, 1.0, 4.0))
    assert seg.slices_without_cord == (1,)
    assert not seg.labels[:, :, 1].any()
    assert any("slice(s) 1" in w for w in seg.warnings)


def test_only_the_largest_cord_component_is_kept(decoder_dir: Path) -> None:
    labels = phantoms.region_labels((40, 36, 1))
    b0 = labels.astype(np.float32) * phantoms.SCALE
    b0[1:4, 1:4, 0] = 4 * phantoms.SCALE  # a small bright blob far from the cord
    seg = Segmenter(decoder_dir).segment(b0, zooms_mm=(1.0, 1.0, 4.0))
    assert not seg.labels[1:4, 1:4, 0].any()
    assert np.array_equal(seg.labels, labels)


def test_session_is_made_once_per_process(decoder_dir: Path) -> None:
    assert load_segmenter(str(decoder_dir)) is load_segmenter(str(decoder_dir))
    assert load_segmenter(str(decoder_dir)).provider == "CPUExecutionProvider"


def test_tampered_model_is_refused(decoder_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(decoder_dir, bad)
    with open(bad / "decoder.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match="SHA-256"):
        Segmenter(bad)


def test_model_with_other_label_table_is_refused(decoder_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(decoder_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["labels"][0], manifest["labels"][4] = manifest["labels"][4], manifest["labels"][0]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="different label table"):
        Segmenter(bad)


def test_missing_manifest_and_missing_model_file(tmp_path: Path, decoder_dir: Path) -> None:
    with pytest.raises(ModelError, match="no model manifest"):
        Segmenter(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(decoder_dir, bad)
    (bad / "decoder.onnx").unlink()
    with pytest.raises(ModelError, match="missing"):
        Segmenter(bad)


def test_swapped_sides_are_flagged(decoder_dir: Path) -> None:
    """A b0 whose left half carries the right-side codes (as a mis-oriented image would)."""
    from core.labels import MIRROR_LUT

    labels = phantoms.region_labels((40, 36, 2))
    mirrored = np.asarray(MIRROR_LUT, dtype=np.uint8)[labels]
    seg = Segmenter(decoder_dir).segment(mirrored.astype(np.float32) * phantoms.SCALE, zooms_mm=(1.0, 1.0, 4.0))
    assert any("check the image orientation" in w and "slice(s) 0, 1" in w for w in seg.warnings)
    ok = Segmenter(decoder_dir).segment(labels.astype(np.float32) * phantoms.SCALE, zooms_mm=(1.0, 1.0, 4.0))
    assert not any("orientation" in w for w in ok.warnings)


class _CountingSegmenter(Segmenter):
    """Records the batch shape of every network call (pass 1 sees whole slices, pass 2 crops)."""

    calls: list[tuple[int, ...]]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        self.calls = [*getattr(self, "calls", []), batch.shape]
        return super().probabilities(batch)


def test_pass_one_runs_on_every_fourth_slice_and_a_moving_cord_is_followed(decoder_dir: Path) -> None:
    """The cord drifts 1 voxel per slice over 10 slices; interpolated centres are exact enough."""
    nz = 10
    labels = np.concatenate(
        [phantoms.region_labels((48, 40, 1), centre=(14.0 + z, 18.0 + 0.5 * z)) for z in range(nz)], axis=2
    )
    seg_model = _CountingSegmenter(decoder_dir)
    seg = seg_model.segment(labels.astype(np.float32) * phantoms.SCALE, zooms_mm=(1.0, 1.0, 4.0))
    assert np.array_equal(seg.labels, labels)
    whole, crops = seg_model.calls
    assert whole[0] == len(range(0, nz, 4)) + 1  # slices 0, 4, 8 and the last (9)
    assert whole[1:] == (48, 40)
    assert crops[0] == nz


def test_a_known_cord_centres_the_crops_without_pass_one(decoder_dir: Path) -> None:
    """Given the cord of an earlier segmentation, only pass 2 runs, on crops centred on it, and
    the labels are those of a full segmentation; a slice without that cord gets none."""
    nz = 5
    labels = np.concatenate(
        [phantoms.region_labels((48, 40, 1), centre=(14.0 + 3 * z, 18.0 + z)) for z in range(nz)], axis=2
    )
    b0 = labels.astype(np.float32) * phantoms.SCALE
    seg_model = _CountingSegmenter(decoder_dir)
    cord = labels > 0
    cord[:, :, 2] = False
    seg = seg_model.segment(b0, zooms_mm=(1.0, 1.0, 4.0), cord=cord)
    assert [c[0] for c in seg_model.calls] == [nz - 1]  # one batch of crops, no whole slice
    expected = labels.copy()
    expected[:, :, 2] = 0
    assert np.array_equal(seg.labels, expected)
    assert seg.slices_without_cord == (2,)


def test_a_cord_far_from_its_interpolated_centre_is_located_on_its_own(decoder_dir: Path) -> None:
    """Slices 0 and 4 put the cord on the left of the field, slice 2 on the far right: the crop
    around the interpolated centre misses it, so slice 2 is located by pass 1 after all."""
    centres = {0: (10.0, 12.0), 1: (10.0, 12.0), 2: (50.0, 30.0), 3: (10.0, 12.0), 4: (10.0, 12.0)}
    labels = np.concatenate([phantoms.region_labels((64, 44, 1), centre=centres[z], radius_vox=6.0) for z in range(5)], axis=2)
    seg_model = _CountingSegmenter(decoder_dir)
    seg = seg_model.segment(labels.astype(np.float32) * phantoms.SCALE, zooms_mm=(1.0, 1.0, 4.0))
    assert np.array_equal(seg.labels, labels)
    assert seg.slices_without_cord == ()
    assert [c[0] for c in seg_model.calls] == [2, 5, 1, 1]  # pass 1 on 0 and 4; 5 crops; slice 2 again


def test_mirror_average_makes_pass_two_exactly_mirror_symmetric() -> None:
    """With the shipped model (manifest: mirror_average), segmenting a mirrored crop gives the
    mirrored answer with left and right swapped: the channels are mapped back correctly."""
    from core.labels import MIRROR_LUT
    from core.segment.runtime import _Centre

    seg = Segmenter(SHIPPED_MODEL_DIR)
    assert seg.manifest.input.mirror_average
    rng = np.random.default_rng(3)
    image = rng.gamma(2.0, 50.0, size=(1, 130, 120)).astype(np.float32)
    image[0, 40:80, 50:75] += 300.0  # something cord-like off the middle
    width = image.shape[1]
    (p, box), = seg._fine_pass(image, [_Centre(55, 60)], [0]).values()
    (q, box_m), = seg._fine_pass(np.ascontiguousarray(image[:, ::-1]), [_Centre(width - 55, 60)], [0]).values()
    assert box_m[0] == width - box[0] - box[2]
    np.testing.assert_allclose(p, q[np.asarray(MIRROR_LUT)][:, ::-1], atol=1e-5)
    assert not np.allclose(p[1], p[5], atol=1e-3)  # the sides do differ, so the check has teeth


def test_crops_reach_the_input_grid_as_if_pasted_into_a_background_slice_and_resampled() -> None:
    """Pass 2's crop probabilities come back to the study's grid exactly as the whole model-grid
    slice would (crop pasted into background, then linear resampling), for crops inside the
    slice, overhanging each edge, and wholly outside it (that slice stays background)."""
    from core.labels import BACKGROUND
    from core.segment.preprocess import resample_to_shape
    from core.segment.runtime import _to_input_grid

    rng = np.random.default_rng(5)
    model_shape, shape = (200, 180), (77, 91, 5)
    boxes = [(10, 20, 96, 96), (-30, 100, 96, 96), (150, -50, 96, 96), (120, 110, 96, 96), (300, 300, 96, 96)]
    fine = {}
    expected = np.zeros((9, *shape), np.float32)
    expected[BACKGROUND] = 1.0
    for z, (i0, j0, h, w) in enumerate(boxes):
        p = rng.random((9, h, w)).astype(np.float32)
        p /= p.sum(axis=0)
        fine[z] = (p, (i0, j0, h, w))
        canvas = np.zeros((9, *model_shape), np.float32)
        canvas[BACKGROUND] = 1.0
        a0, b0, a1, b1 = max(i0, 0), max(j0, 0), min(i0 + h, model_shape[0]), min(j0 + w, model_shape[1])
        if a1 > a0 and b1 > b0:
            canvas[:, a0:a1, b0:b1] = p[:, a0 - i0 : a1 - i0, b0 - j0 : b1 - j0]
        expected[:, :, :, z] = resample_to_shape(canvas, shape[:2])
    got = _to_input_grid(fine, model_shape, shape)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.array_equal(got[:, :, :, 4], expected[:, :, :, 4])  # outside: background, untouched
    assert not np.allclose(got[:, :, :, 0], got[:, :, :, 1], atol=1e-3)  # the crops do land


def test_onnx_threads_setting_reaches_the_session(decoder_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import CoreSettings

    monkeypatch.setenv("SCSNET_ONNX_THREADS", "1")
    threads = CoreSettings().onnx_threads
    assert threads == 1
    seg = Segmenter(decoder_dir, threads=threads)
    assert seg._session.get_session_options().intra_op_num_threads == 1
    labels = phantoms.region_labels((40, 36, 2))
    assert np.array_equal(seg.segment(labels.astype(np.float32) * phantoms.SCALE, zooms_mm=(1.0, 1.0, 4.0)).labels, labels)


def test_a_voxel_the_network_hesitates_to_give_to_a_ventral_funiculus_takes_it() -> None:
    """With ``ventral_lean`` (a refined analysis's network passes), background voxels whose most
    probable region is a ventral funiculus join it below VENTRAL_LEAN_P_BACKGROUND; other
    regions keep the plain argmax, and the lean voxels still obey the one-connected-cord rule."""
    from core.segment.runtime import VENTRAL_LEAN_P_BACKGROUND, _labels_of

    shape = (20, 20, 1)
    probs = np.zeros((9, *shape), np.float32)
    probs[0] = 1.0
    probs[:, 6:14, 6:14] = 0.0
    probs[3, 6:10, 6:14] = 0.9  # left ventral (front half, larger j)
    probs[1, 6:10, 6:14] = 0.1
    probs[7, 10:14, 6:14] = 1.0  # right ventral
    below, above = VENTRAL_LEAN_P_BACKGROUND - 0.05, VENTRAL_LEAN_P_BACKGROUND + 0.05

    def edge(i: int, j: int, p_bg: float, code: int, rest: int = 1) -> None:
        probs[:, i, j] = 0.0
        probs[0, i, j] = p_bg
        probs[code, i, j] = (1 - p_bg) * 0.7
        probs[rest, i, j] = (1 - p_bg) * 0.3

    edge(8, 14, below, 3)  # next to the cord, ventral most probable: taken in
    edge(11, 14, below, 7, rest=5)  # the same on the right
    edge(9, 14, above, 3)  # background too probable: left out
    edge(12, 14, below, 5, rest=7)  # lateral most probable: left out (the plain argmax)
    edge(2, 2, 0.3, 3)  # ventral by the plain argmax, but not touching the cord: dropped
    edge(17, 17, below, 7)  # would lean, but not touching the cord: dropped
    labels, missing = _labels_of(probs, min_voxels=4, ventral_lean=True)
    assert missing == []
    assert labels[8, 14, 0] == 3 and labels[11, 14, 0] == 7
    assert labels[9, 14, 0] == 0 and labels[12, 14, 0] == 0
    assert labels[2, 2, 0] == 0 and labels[17, 17, 0] == 0
    assert np.count_nonzero(labels) == 64 + 2
    # without the lean (every pass but the refinement's): the plain argmax, one cord
    plain, _ = _labels_of(probs, min_voxels=4)
    assert plain[8, 14, 0] == 0 and plain[11, 14, 0] == 0 and np.count_nonzero(plain) == 64


def test_a_voxel_more_probably_cord_than_not_is_cord_even_when_no_single_region_beats_the_background() -> None:
    """The cord is decided against the background first (P(background) < 1/2), then the region
    inside it: an edge voxel whose cord probability is split among regions is cord, labelled
    with its most probable region; a voxel more probably background stays background."""
    from core.segment.runtime import _labels_of

    shape = (20, 20, 1)
    probs = np.zeros((9, *shape), np.float32)
    probs[0] = 1.0
    probs[:, 6:14, 6:14] = 0.0
    probs[1, 6:14, 6:14] = 1.0  # a left lateral block

    def edge(i: int, j: int, p_bg: float) -> None:
        probs[:, i, j] = 0.0
        probs[0, i, j] = p_bg
        probs[1, i, j] = (1 - p_bg) * 0.45  # no region alone beats the background...
        probs[4, i, j] = (1 - p_bg) * 0.30
        probs[2, i, j] = (1 - p_bg) * 0.25

    edge(5, 8, 0.45)  # ...but together they do: cord, left lateral
    edge(5, 9, 0.55)  # more probably background: left out
    edge(1, 1, 0.45)  # cord-like but not touching the cord: dropped by the one-cord rule
    assert np.argmax(probs[:, 5, 8, 0]) == 0  # the plain nine-class argmax says background
    labels, missing = _labels_of(probs, min_voxels=4)
    assert missing == []
    assert labels[5, 8, 0] == 1
    assert labels[5, 9, 0] == 0 and labels[1, 1, 0] == 0
    assert np.count_nonzero(labels) == 64 + 1
