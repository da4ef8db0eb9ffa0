"""Training smoke test (a few steps) and the shipped model's manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.digest import sha256_of as sha256
from core.labels import label_table
from models.net import SCSNet
from models.train import main as train_main

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "scsnet"
MANIFEST_KEYS = {"name", "version", "file", "sha256", "opset", "input", "output", "labels", "training", "parameters"}


def _fractions(labels):
    """(N, H, W) integer codes -> (N, 9, H, W) class fractions (one-hot) as a float tensor."""
    import torch

    return torch.nn.functional.one_hot(labels, 9).permute(0, 3, 1, 2).float()


def _confident_logits(labels):
    """Logits that put all probability on ``labels`` (N, H, W)."""
    return _fractions(labels) * 20.0


def _check_manifest(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest) == MANIFEST_KEYS
    assert manifest["name"] == "scsnet" and manifest["file"] == "scsnet.onnx" and manifest["opset"] == 17
    assert manifest["input"]["name"] == "b0" and manifest["output"] == {"name": "logits", "kind": "logits"}
    assert manifest["input"]["normalisation"] == "core.segment.preprocess.normalise"
    assert manifest["input"]["pad_multiple"] == SCSNet().pad_multiple
    assert manifest["labels"] == label_table()
    assert manifest["parameters"] <= 2_000_000
    assert set(manifest["training"]) == {"data", "steps", "seed"}
    assert manifest["sha256"] == sha256(folder / manifest["file"])
    return manifest


def test_training_smoke_exports_onnx(tmp_path: Path) -> None:
    train_main([
        "--out", str(tmp_path), "--steps", "3", "--batch", "2", "--patch", "48", "--warmup-samples", "2",
        "--val-samples", "2", "--fresh", "1", "--workers", "0", "--log-every", "1",
    ])
    manifest = _check_manifest(tmp_path)
    assert manifest["training"]["steps"] == 3
    assert (tmp_path / "train_log.csv").read_text().count("\n") == 4


def test_training_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    import torch

    def run(out: Path, seed: int) -> dict:
        train_main(["--out", str(out), "--steps", "3", "--batch", "2", "--patch", "48", "--warmup-samples", "4",
                    "--val-samples", "2", "--fresh", "1", "--log-every", "3", "--seed", str(seed)])
        return torch.load(out / "scsnet.pt", weights_only=False)["state_dict"]

    a, b, c = run(tmp_path / "a", 0), run(tmp_path / "b", 0), run(tmp_path / "c", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_mirrored_soft_targets_match_the_mirrored_labels() -> None:
    import numpy as np
    import torch

    from models.generator import mirror, training_sample
    from models.train import mirror_batch, one_hot

    x, labels = training_sample(7, patch=48)
    m_x, m_labels = mirror(x, labels)
    xs = torch.from_numpy(np.stack([x, x])[:, None])
    ys = torch.from_numpy(np.stack([one_hot(labels), one_hot(labels)]).astype(np.float32) / 255)
    fx, fy = mirror_batch(xs, ys, torch.tensor([True, False]))
    assert np.array_equal(fx[0, 0].numpy(), m_x) and np.array_equal(fx[1, 0].numpy(), x)
    assert np.array_equal(fy[0].argmax(0).numpy(), m_labels)
    assert np.array_equal(fy[1].argmax(0).numpy(), labels)
    assert not np.array_equal(m_labels, labels)


def test_loss_takes_labels_or_class_fractions_alike() -> None:
    import numpy as np
    import torch

    from models.train import dice_ce_loss, one_hot, quantise

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 9, (2, 16, 16))
    logits = torch.from_numpy(rng.normal(0, 1, (2, 9, 16, 16)).astype(np.float32))
    hard = dice_ce_loss(logits, torch.from_numpy(labels))
    soft = dice_ce_loss(logits, torch.from_numpy(np.stack([one_hot(lab) for lab in labels]).astype(np.float32) / 255))
    for a, b in zip(hard, soft):
        assert abs(a.item() - b.item()) < 1e-5
    half = np.full((9, 4, 4), 0.5)
    assert np.array_equal(quantise(half), np.full((9, 4, 4), 128, np.uint8))


def test_shipped_manifest_matches_onnx() -> None:
    manifest = _check_manifest(SHIPPED)
    assert (SHIPPED / manifest["file"]).stat().st_size < 10_000_000


def test_shipped_model_segments_held_out_synthetic_slices() -> None:
    """The shipped ONNX (two-pass recipe) finds the cord on held-out slices with the patient's
    left at smaller world x."""
    import numpy as np

    from models.evaluate import SliceSegmenter
    from models.generator import generate
    from models.train import EVAL_SEED_BASE

    seg = SliceSegmenter(SHIPPED)
    for seed in range(EVAL_SEED_BASE, EVAL_SEED_BASE + 4):
        s = generate(seed)
        pred = seg.labels(s.b0, s.acquisition.spacing_mm)
        cord_p, cord_t = pred > 0, s.labels > 0
        assert 2 * (cord_p & cord_t).sum() / (cord_p.sum() + cord_t.sum()) > 0.7
        left = np.argwhere(np.isin(pred, [1, 2, 3, 4])).mean(axis=0)
        right = np.argwhere(np.isin(pred, [5, 6, 7, 8])).mean(axis=0)
        assert left[0] < right[0]


class _Oracle:
    """Answers each evaluation slice with its exact labels (the evaluation's seeds, in order)."""

    def __init__(self, spoil: bool = False) -> None:
        from models.train import EVAL_SEED_BASE

        self.seed, self.spoil = EVAL_SEED_BASE, spoil

    def segment(self, image: np.ndarray, spacing_mm: tuple[float, float]):
        from phantoms import exact_segmentation

        from models.generator import generate

        truth = generate(self.seed).labels.copy()
        self.seed += 1
        if self.spoil:  # every left ventral voxel called left lateral
            truth[truth == 3] = 1
        return exact_segmentation(truth)

    def refined(self, seg, b0: np.ndarray, md: np.ndarray, spacing_mm: tuple[float, float], *, fa=None) -> np.ndarray:
        assert md.shape == b0.shape == seg.labels.shape == fa.shape
        return seg.labels  # exact labels need no refinement by MD

    def refined_segmentation(self, seg, b0: np.ndarray, md: np.ndarray, spacing_mm: tuple[float, float], *, fa=None):
        self.refined(seg, b0, md, spacing_mm, fa=fa)
        return seg


def test_evaluation_scores_exact_labels_perfectly_and_notices_a_swapped_region() -> None:
    from models.evaluate import evaluate_synthetic

    perfect = evaluate_synthetic(_Oracle(), 3)["regions"]
    for key, row in perfect.items():
        assert row["dice_pooled"] == 1.0 and row["precision"] == 1.0 and row["recall"] == 1.0, key
        assert row["fa_error_pct"] == 0.0 and row["missed_slices"] == 0, key
        assert row["fa_error_weighted_pct"] == pytest.approx(0.0, abs=1e-4), key  # one-hot weights: the mean itself
    spoiled = evaluate_synthetic(_Oracle(spoil=True), 3)
    assert spoiled["regions"]["left_ventral"]["dice_pooled"] == 0.0
    assert spoiled["regions"]["left_ventral"]["missed_slices"] == spoiled["regions"]["left_ventral"]["slices"]
    assert 0.0 < spoiled["regions"]["left_lateral"]["precision"] < 1.0
    assert spoiled["regions"]["left_lateral"]["fa_error_pct"] > 0.0
    for group in spoiled["strata"].values():
        assert sum(b["slices"] for b in group.values()) == 3


def test_evaluation_strata_bins_include_their_lower_edge() -> None:
    from models.strata import VOXEL_BINS, VOXEL_EDGES_MM, bin_of

    assert [bin_of(v, VOXEL_EDGES_MM, VOXEL_BINS) for v in (0.6, 0.99, 1.0, 1.4, 1.8)] == [
        VOXEL_BINS[0], VOXEL_BINS[0], VOXEL_BINS[1], VOXEL_BINS[2], VOXEL_BINS[2]]


def test_generator_test_ranks_confidence_against_fa_error() -> None:
    """The slice test carries the Spearman correlation of (1 - confidence) with FA error, from the
    shipped model's own confidence (test-time augmentation included)."""
    from models.evaluate import SliceSegmenter, evaluate_synthetic, print_table

    seg = SliceSegmenter(SHIPPED)
    assert seg.augment
    res = evaluate_synthetic(seg, 6)
    rho = res["confidence_spearman"]
    assert -1.0 <= rho <= 1.0  # NaN (no pairs) would fail here
    assert f"{rho:.3f}" in print_table(res)


def test_per_sample_dice_weighs_a_small_region_like_a_large_one() -> None:
    import torch

    from models.train import dice_ce_loss

    # sample 0: a large gray-matter region, found; sample 1: a 2-pixel ventral region, missed
    truth = torch.zeros(2, 16, 16, dtype=torch.long)
    truth[0, 2:12, 2:12] = 4
    truth[1, 5, 5:7] = 3
    pred = truth.clone()
    pred[1][truth[1] == 3] = 0
    _, _, pooled = dice_ce_loss(_confident_logits(pred), truth)
    _, _, per_sample = dice_ce_loss(_confident_logits(pred), truth, per_sample=True)
    assert per_sample.item() > pooled.item() > 0.0
    # everything found: nothing to pay either way
    found = [dice_ce_loss(_confident_logits(truth), truth, per_sample=flag)[2].item() for flag in (False, True)]
    assert max(found) < 1e-3


def test_merged_loss_ignores_how_white_matter_is_split_but_not_its_outline() -> None:
    import torch

    from models.train import merged_loss

    truth = torch.zeros(1, 16, 16, dtype=torch.long)
    truth[0, 3:13, 3:13] = 1  # white matter traced as one funiculus
    truth[0, 6:10, 5:8] = 4
    truth[0, 6:10, 8:11] = 8
    other_split = truth.clone()
    other_split[0, 3:8, 3:13][other_split[0, 3:8, 3:13] == 1] = 3  # the same white matter, other funiculi
    smaller = truth.clone()
    smaller[0, 3, 3:13] = 0  # a row of cord given to the background
    swapped = truth.clone()
    swapped[truth == 4], swapped[truth == 8] = 8, 4  # gray matter sides swapped
    same = merged_loss(_confident_logits(truth), _fractions(truth))[0].item()
    assert merged_loss(_confident_logits(other_split), _fractions(truth))[0].item() == pytest.approx(same, abs=1e-6)
    assert same < 1e-3
    assert merged_loss(_confident_logits(smaller), _fractions(truth))[0].item() > same + 0.01
    assert merged_loss(_confident_logits(swapped), _fractions(truth))[0].item() > same + 0.1


def test_site_partial_training_runs_on_site_data(tmp_path: Path) -> None:
    from models.real_shapes import write_training_pairs

    site = tmp_path / "site"
    write_training_pairs(site, voxels_mm=(1.1,))
    train_main([
        "--out", str(tmp_path / "out"), "--steps", "3", "--batch", "4", "--patch", "48", "--warmup-samples", "8",
        "--val-samples", "2", "--fresh", "2", "--log-every", "1", "--data", str(site), "--synthetic-fraction", "0.5",
        "--site-partial",
    ])
    _check_manifest(tmp_path / "out")


def test_batch_loss_scores_partial_samples_by_outline_and_gray_matter_only() -> None:
    import torch

    from models.train import batch_loss, dice_ce_loss

    truth = torch.zeros(2, 16, 16, dtype=torch.long)
    truth[:, 3:13, 3:13] = 1
    truth[:, 6:10, 5:8] = 4
    target = _fractions(truth)
    pred = truth.clone()
    pred[1, 3:6, 3:13] = 3  # sample 1: another white-matter split, same outline and gray matter
    logits = _confident_logits(pred)
    none = torch.tensor([False, False])
    assert torch.equal(batch_loss(logits, target, partial=none)[0], dice_ce_loss(logits, target)[0])
    full = batch_loss(logits, target)[0].item()
    partial = batch_loss(logits, target, partial=torch.tensor([False, True]))[0].item()
    assert full > 0.05 and partial < 1e-3  # the split only costs where funiculi are traced
