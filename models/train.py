"""Train SCS-Net on on-the-fly synthetic slices (and optionally a site's own labelled data),
then export ONNX + manifest.

    python -m models.train --out models/scsnet [--steps N] [--data DIR] [--max-minutes M]
                           [--real-shapes P] [--kspace P] [--compressed P] [--gamma P] [--warp P]
                           [--void P] [--dice-per-sample] [--site-partial] [--init CKPT]

Batches: fresh samples (``--fresh`` per step, generated in the main process or ``--workers``
DataLoader processes) go into a replay buffer; each step draws ``--batch`` samples from it (with a
left-right mirror that also swaps the left and right classes). Targets are soft: each pixel's
class fractions (partial volume, see :func:`models.generator.training_sample`); site labels are
one-hot. Crops are ``--patch`` (default ``CROP_SIZE_PX``, 96 px = 48 mm: cord and sac with a
margin), the pass-2 crop size the manifest then gives the run-time. Everything is seeded: the generator seeds are
``seed * 100_000_000 + n``; evaluation uses seeds >= ``EVAL_SEED_BASE`` (never trained on).

``--data DIR`` adds (or, with ``--synthetic-fraction 0``, uses only) a folder of
``<case>_b0.nii.gz`` + ``<case>_labels.nii.gz`` pairs: volumes are brought to closest-canonical
RAS, every axial slice that holds cord is resampled to the model grid (b0 linear, labels
nearest) and served in both inference modes (whole slice and cord crop); with ``--site-partial``
only their outline and gray matter are scored (:func:`merged_loss`), for labels whose
white-matter funiculi are not traced (the real T2* pairs of ``python -m models.real_shapes
--write-training-data DIR``). ``--init CKPT`` starts from an existing checkpoint (fine-tuning).

Loss: cross-entropy against the class fractions + soft Dice against their argmax labels (mean
over the nine classes, pooled over the batch; ``--dice-per-sample``: per sample and class), see
:func:`dice_ce_loss`.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from core.labels import MIRROR_LUT, N_CLASSES
from core.segment.preprocess import normalise, resample_slice
from models.export import export
from models.generator import COMPRESSED_SHARE, CROP_SIZE_PX, MODEL_SPACING_MM, Variation, _crop, training_sample
from models.net import DEFAULT_WIDTHS, SCSNet, count_parameters

log = logging.getLogger(__name__)

SEED_STRIDE = 100_000_000
VALIDATION_SEED_BASE = 1_500_000_000
EVAL_SEED_BASE = 2_000_000_000


class SyntheticStream(IterableDataset):
    """Endless stream of (image, labels) training pairs from consecutive generator seeds."""

    def __init__(self, seed: int, patch: int, variation: Variation = Variation()) -> None:
        self.seed = seed
        self.patch = patch
        self.variation = variation

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        n = worker
        while True:
            x, fr = training_sample(self.seed * SEED_STRIDE + n, patch=self.patch, soft=True, variation=self.variation)
            yield x, quantise(fr)
            n += n_workers


def quantise(fractions: np.ndarray) -> np.ndarray:
    """(9, H, W) class fractions in [0, 1] -> uint8 (1/255 steps): a quarter of the memory of
    float32 in the replay buffer."""
    return np.rint(np.clip(fractions, 0.0, 1.0) * 255).astype(np.uint8)


def one_hot(labels: np.ndarray) -> np.ndarray:
    """(H, W) label codes -> (9, H, W) uint8 fractions (255 for the pixel's class)."""
    return (np.arange(N_CLASSES, dtype=np.uint8)[:, None, None] == labels[None]).astype(np.uint8) * 255


class SiteDataError(ValueError):
    """A site-data folder that cannot be used as it is (the message says why, naming the case)."""


def _load_nifti(path: Path) -> tuple[Any, np.ndarray]:
    """(closest-canonical image, its float32 voxel values); read whole now, so that a truncated
    file fails here and not mid-training."""
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(path))
        return img, img.get_fdata(dtype=np.float32)
    except Exception as exc:  # nibabel raises several unrelated types for unreadable files
        raise SiteDataError(f"{path.name} is not a readable NIfTI image: {exc}") from exc


def load_site_data(folder: Path, spacing_mm: float = MODEL_SPACING_MM) -> list[tuple[np.ndarray, np.ndarray]]:
    """Axial slices (model grid, RAS [i, j]) holding cord from ``<case>_b0`` / ``<case>_labels``
    NIfTI pairs. Returns raw (not normalised) b0 slices and uint8 label slices.

    Raises :class:`SiteDataError` for a folder without pairs, a b0 without labels, images that
    cannot be read, grids that differ, or labels that are not whole codes 0-8."""
    if not folder.is_dir():
        raise SiteDataError(f"site data folder {folder} does not exist")
    out = []
    for b0_path in sorted(folder.glob("*_b0.nii*")):
        case = b0_path.name.split("_b0.nii")[0]
        lab_path = next(iter(sorted(folder.glob(f"{case}_labels.nii*"))), None)
        if lab_path is None:
            raise SiteDataError(f"{b0_path.name} has no matching {case}_labels.nii.gz in {folder}")
        (b0, data), (lab, values) = _load_nifti(b0_path), _load_nifti(lab_path)
        if lab.ndim != 3 or b0.ndim not in (3, 4):
            raise SiteDataError(f"{case}: the b0 must be 3D (or 4D, averaged) and the labels 3D")
        if b0.shape[:3] != lab.shape[:3] or not np.allclose(b0.affine, lab.affine, atol=1e-3):
            raise SiteDataError(f"{case}: b0 and labels are not on the same voxel grid")
        if data.ndim == 4:
            data = data.mean(axis=3)
        if not np.isfinite(values).all() or (values != np.round(values)).any() or values.min() < 0 or values.max() >= N_CLASSES:
            raise SiteDataError(f"{case}: labels must be whole codes 0-{N_CLASSES - 1} (core.labels)")
        labels = values.astype(np.int16)
        zx, zy = (float(z) for z in b0.header.get_zooms()[:2])
        zooms = (zx, zy)
        for k in range(data.shape[2]):
            if not (labels[:, :, k] > 0).any():
                continue
            img = resample_slice(data[:, :, k], spacing_mm=zooms, target_mm=(spacing_mm, spacing_mm))
            lab2 = resample_slice(labels[:, :, k].astype(np.float32), spacing_mm=zooms,
                                  target_mm=(spacing_mm, spacing_mm), order=0)
            out.append((img, lab2.astype(np.uint8)))
        log.info("site data %s: %d slices so far", case, len(out))
    if not out:
        raise SiteDataError(f"no labelled cord slices (<case>_b0.nii.gz + <case>_labels.nii.gz) found in {folder}")
    return out


def site_sample(slices: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """A training pair from site data, in pass-1 (whole slice) or pass-2 (crop) mode."""
    img, lab = slices[int(rng.integers(len(slices)))]
    ci, cj = np.argwhere(lab > 0).mean(axis=0)
    if rng.random() < 0.5:
        norm = normalise(img)
        c = (int(ci + rng.uniform(-0.4, 0.4) * patch), int(cj + rng.uniform(-0.4, 0.4) * patch))
        return _crop(norm, c, patch, 0.0), _crop(lab, c, patch, 0)
    j = rng.normal(0, 3.0, 2)
    c = (round(ci + j[0]), round(cj + j[1]))
    return normalise(_crop(img, c, patch, 0.0 if rng.random() < 0.5 else None)), _crop(lab, c, patch, 0)


_MIRROR = torch.tensor(MIRROR_LUT, dtype=torch.long)


def mirror_batch(x: torch.Tensor, y: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the samples where ``flip`` (N,) is true left-right (along i, world x): images
    (N, 1, H, W) and class fractions (N, 9, H, W), whose channel c becomes class
    ``MIRROR_LUT[c]`` (left and right regions swap, as in :func:`models.generator.mirror`)."""
    x, y = x.clone(), y.clone()
    x[flip] = x[flip].flip(2)
    y[flip] = y[flip][:, _MIRROR].flip(2)
    return x, y


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, *,
                 per_sample: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy + (1 - soft Dice averaged over the nine classes, smoothed by 1; pooled over the
    batch unless ``per_sample``).

    ``target``: (N, H, W) integer labels or (N, 9, H, W) float class fractions summing to 1.
    Cross-entropy takes the fractions as they are (a proper score: it is lowest when the
    probabilities equal the fractions); the Dice term takes their argmax labels, because soft
    Dice against fractional targets is lowest when every pixel with more than about Dice/2 of a
    class is called that class, which over-segments the small regions (a model fine-tuned that
    way predicted 1.33-1.36 times the true ventral funiculus area on held-out slices).

    ``per_sample``: the Dice of each class in each sample, averaged over the pairs where the class
    is in the target or predicted (about a pixel or more), rather than pooled over the batch: a
    small region of a small cord then weighs as much as a large one, as it does in a per-study
    score."""
    ce = F.cross_entropy(logits, target)
    p = torch.softmax(logits, dim=1)
    labels = target.argmax(dim=1) if target.is_floating_point() else target
    dims = (2, 3) if per_sample else (0, 2, 3)
    dice, share = _soft_dice(p, labels, dims)
    if per_sample:  # over the (sample, class) pairs where the class is present or predicted
        present = (share.sum(dim=dims) > 0) | (p.sum(dim=dims) > 1.0)
        dice_loss = 1.0 - dice[present].sum() / present.sum().clamp_min(1)
    else:
        dice_loss = 1.0 - dice.mean()
    return ce + dice_loss, ce, dice_loss


def _soft_dice(p: torch.Tensor, labels: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Dice (smoothed by 1) of (N, C, H, W) probabilities ``p`` against (N, H, W) integer
    ``labels``, summed over ``dims``; and the labels one-hot (N, C, H, W)."""
    share = F.one_hot(labels, p.shape[1]).permute(0, 3, 1, 2).float()
    dice = (2 * (p * share).sum(dim=dims) + 1.0) / (p.sum(dim=dims) + share.sum(dim=dims) + 1.0)
    return dice, share


SITE_GROUPS = ((0,), (1, 2, 3, 5, 6, 7), (4,), (8,))
"""What ``--site-partial`` supervises on site samples: background, white matter, left and right gray matter."""

_SITE_MERGE = torch.zeros(len(SITE_GROUPS), N_CLASSES)
for _g, _codes in enumerate(SITE_GROUPS):
    _SITE_MERGE[_g, list(_codes)] = 1.0


def merged_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`dice_ce_loss` on the classes merged into ``SITE_GROUPS`` (probabilities and
    targets summed within each group), for labels whose white-matter funiculi are not traced:
    only the cord's outline and its gray matter (left, right) are scored.

    ``logits``: (N, 9, H, W); ``target``: (N, 9, H, W) class fractions. Returns (loss, ce, dice loss)."""
    m = _SITE_MERGE.to(logits.device)
    q = torch.einsum("gc,nchw->nghw", m, torch.softmax(logits, dim=1))
    t = torch.einsum("gc,nchw->nghw", m, target)
    ce = -(t * q.clamp_min(1e-7).log()).sum(dim=1).mean()
    dice_loss = 1.0 - _soft_dice(q, t.argmax(dim=1), (0, 2, 3))[0].mean()
    return ce + dice_loss, ce, dice_loss


def batch_loss(logits: torch.Tensor, target: torch.Tensor, *, partial: torch.Tensor | None = None,
               per_sample: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`dice_ce_loss` over the batch, except for the samples where ``partial`` (N,) bool is
    true, which are scored by :func:`merged_loss`; the two parts weigh by their sample counts."""
    if partial is None or not bool(partial.any()):
        return dice_ce_loss(logits, target, per_sample=per_sample)
    parts = [(int(partial.sum()), merged_loss(logits[partial], target[partial]))]
    if not bool(partial.all()):
        parts.append((int((~partial).sum()), dice_ce_loss(logits[~partial], target[~partial], per_sample=per_sample)))
    total = sum(n for n, _ in parts)
    loss, ce, dice = (sum(n * part[k] for n, part in parts) / total for k in range(3))
    return loss, ce, dice


def hard_dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-class Dice for codes 1..8 over a batch (NaN where the class is absent in both)."""
    out = np.full(N_CLASSES - 1, np.nan)
    for c in range(1, N_CLASSES):
        a, b = pred == c, truth == c
        s = a.sum() + b.sum()
        if s:
            out[c - 1] = 2 * (a & b).sum() / s
    return out


def train(args: argparse.Namespace) -> None:
    site = load_site_data(args.data) if args.data else None  # refuse unusable data before anything else
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ck = torch.load(args.init, map_location=device, weights_only=False) if args.init else None
    if ck is not None:
        args.widths = list(ck.get("widths", args.widths))  # fine-tuning keeps the checkpoint's network
    model = SCSNet(widths=tuple(args.widths)).to(device)
    if ck is not None:
        model.load_state_dict(ck["state_dict"])
        log.info("initialised from %s", args.init)
    log.info("SCS-Net %d parameters on %s", count_parameters(model), device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warm = min(200, args.steps // 10 + 1)

    def lr_at(step: int, elapsed_s: float = 0.0) -> float:
        """Linear warm-up, then cosine decay to 0 over the steps or, with ``--max-minutes``, over
        whichever of the two budgets runs out first (so a time-limited run still anneals)."""
        if step < warm:
            return args.lr * (step + 1) / warm
        progress = (step - warm) / max(1, args.steps - warm)
        if args.max_minutes:
            progress = max(progress, elapsed_s / (60 * args.max_minutes))
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    synth_frac = args.synthetic_fraction if site is not None else 1.0
    patch = args.patch
    variation = Variation(real_shapes=args.real_shapes, kspace=args.kspace, compressed=args.compressed,
                          gamma=args.gamma, warp=args.warp, csf_void=args.void)
    stream = DataLoader(SyntheticStream(args.seed, patch, variation), batch_size=None, num_workers=args.workers,
                        prefetch_factor=8 if args.workers else None, persistent_workers=bool(args.workers))
    it = iter(stream)
    buf_x = np.zeros((args.buffer, patch, patch), np.float32)
    buf_y = np.zeros((args.buffer, N_CLASSES, patch, patch), np.uint8)  # class fractions x 255
    buf_site = np.zeros(args.buffer, bool)
    filled = 0
    pos = 0

    def push(x: np.ndarray, y: np.ndarray, is_site: bool = False) -> None:
        nonlocal filled, pos
        buf_x[pos], buf_y[pos], buf_site[pos] = x, y, is_site
        pos = (pos + 1) % args.buffer
        filled = min(filled + 1, args.buffer)

    def fresh(n: int) -> None:
        for _ in range(n):
            if rng.random() < synth_frac:
                push(*next(it))
            else:
                x, lab = site_sample(site, rng, patch)  # type: ignore[arg-type]
                push(x, one_hot(lab), is_site=True)

    t0 = time.time()
    fresh(args.warmup_samples)
    log.info("buffer warm-up: %d samples in %.0f s", filled, time.time() - t0)
    val = [training_sample(VALIDATION_SEED_BASE + n, patch=patch) for n in range(args.val_samples)]
    val_x = torch.from_numpy(np.stack([v[0] for v in val])[:, None]).to(device)
    val_y = np.stack([v[1] for v in val])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.csv"

    def log_row(row: list[object]) -> None:
        with open(log_path, "a", newline="") as f:
            csv.writer(f).writerow(row)

    log_path.unlink(missing_ok=True)
    log_row(["step", "seconds", "lr", "loss", "ce", "dice_loss", "val_mean_dice"])
    running = np.zeros(3)
    step = 0
    for step in range(args.steps):
        fresh(args.fresh)
        idx = rng.integers(0, filled, args.batch)
        x = torch.from_numpy(buf_x[idx][:, None].copy())
        y = torch.from_numpy(buf_y[idx].astype(np.float32))
        y /= y.sum(dim=1, keepdim=True).clamp_min(1.0)
        x, y = mirror_batch(x, y, torch.from_numpy(rng.random(args.batch) < 0.5))
        gain = torch.from_numpy(rng.uniform(0.85, 1.15, (args.batch, 1, 1, 1)).astype(np.float32))
        x = x * gain + torch.from_numpy(rng.normal(0, 0.05, (args.batch, 1, 1, 1)).astype(np.float32))
        x, y = x.to(device), y.to(device)
        lr = lr_at(step, time.time() - t0)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        partial = torch.from_numpy(buf_site[idx]).to(device) if args.site_partial else None
        loss, ce, dl = batch_loss(model(x), y, partial=partial, per_sample=args.dice_per_sample)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += [loss.item(), ce.item(), dl.item()]
        last = step == args.steps - 1
        over_time = args.max_minutes and (time.time() - t0) > 60 * args.max_minutes
        if (step + 1) % args.log_every == 0 or last or over_time:
            n = (step % args.log_every) + 1
            vd = ""
            if (step + 1) % (args.log_every * 5) == 0 or last or over_time:
                model.eval()
                with torch.no_grad():
                    pred = model(val_x).argmax(1).cpu().numpy()
                vd = f"{np.nanmean(hard_dice(pred, val_y)):.4f}"
            r = running / n
            log_row([step + 1, f"{time.time() - t0:.1f}", f"{lr:.2e}", f"{r[0]:.4f}", f"{r[1]:.4f}",
                     f"{r[2]:.4f}", vd])
            log.info("step %d  %.0fs  loss %.4f ce %.4f dice_loss %.4f  val dice %s", step + 1, time.time() - t0, *r, vd)
            running[:] = 0
            torch.save({"widths": list(args.widths), "patch": patch, "state_dict": model.state_dict()}, out / "scsnet.pt")
        if over_time:
            log.info("time limit reached at step %d", step + 1)
            break
    steps_done = step + 1
    minutes = (time.time() - t0) / 60
    # The manifest's "training" block has exactly data/steps/seed; run details go in the text.
    training = {
        "data": (
            "synthetic axial b0 slices from models/generator.py (PAM50-derived 8-region atlas, "
            "randomised anatomy, contrast, partial volume, EPI distortion, Rician noise)"
            + (f" mixed with site data from {args.data} (synthetic fraction {synth_frac})" if site else "")
            + (f"; {args.real_shapes:.0%} of the cords shaped like real slices (models/real_shapes.py)"
               if args.real_shapes else "")
            + (f"; {args.kspace:.0%} of the b0s sampled by k-space truncation" if args.kspace else "")
            + (f"; {args.compressed:.0%} of the cords compressed" if args.compressed != COMPRESSED_SHARE else "")
            + (f"; {args.gamma:.0%} of the samples gamma-bent" if args.gamma else "")
            + (f"; {args.warp:.0%} of the cords warped (generator.anatomy_warp)" if args.warp else "")
            + (f"; {args.void:.0%} of the CSF rings with a dark sector (generator.csf_void)" if args.void else "")
            + ("; Dice per sample" if args.dice_per_sample else "")
            + (f"; fine-tuned from {args.init}" if args.init else "")
            + f"; soft class-fraction targets, batch {args.batch} x {patch}x{patch} px at {MODEL_SPACING_MM} mm,"
            + f" {minutes:.1f} min on {device}"
        ),
        "steps": steps_done,
        "seed": args.seed,
    }
    model = model.cpu().eval()
    torch.save({"widths": list(args.widths), "patch": patch, "state_dict": model.state_dict(), "training": training},
               out / "scsnet.pt")
    manifest = export(model, out, training=training, crop_px=patch)
    log.info("exported %s (sha256 %s) after %d steps, %.1f min", out / "scsnet.onnx", manifest["sha256"], steps_done, minutes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/scsnet"))
    p.add_argument("--steps", type=int, default=40000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=CROP_SIZE_PX, help="training and run-time pass-2 crop (px at the model spacing)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None, help="folder of <case>_b0.nii.gz + <case>_labels.nii.gz")
    p.add_argument("--synthetic-fraction", type=float, default=0.5, help="share of synthetic samples with --data")
    p.add_argument("--site-partial", action="store_true",
                   help="on --data samples supervise only background / white matter / left and right gray matter")
    p.add_argument("--real-shapes", type=float, default=0.0,
                   help="share of synthetic cords shaped like a real slice of the training subjects (models/real_shapes.py)")
    p.add_argument("--kspace", type=float, default=0.0,
                   help="share of synthetic b0s sampled by k-space truncation instead of block averaging")
    p.add_argument("--compressed", type=float, default=COMPRESSED_SHARE,
                   help="share of synthetic cords flattened front-to-back (CSM-like)")
    p.add_argument("--gamma", type=float, default=0.0,
                   help="share of training samples whose intensities are bent by a random gamma (generator.gamma_bend)")
    p.add_argument("--warp", type=float, default=0.0,
                   help="share of synthetic cords whose anatomy is bent by a smooth displacement "
                        "(generator.anatomy_warp)")
    p.add_argument("--void", type=float, default=0.0,
                   help="share of synthetic slices where a sector of the CSF ring is dark (generator.csf_void)")
    p.add_argument("--dice-per-sample", action="store_true",
                   help="soft Dice per class and sample, averaged (default: pooled over the batch)")
    p.add_argument("--init", type=Path, default=None, help="checkpoint (.pt) to fine-tune from")
    p.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS))
    p.add_argument("--buffer", type=int, default=4000, help="replay buffer size (samples)")
    p.add_argument("--fresh", type=int, default=3, help="fresh samples added to the buffer per step")
    p.add_argument("--warmup-samples", type=int, default=256)
    p.add_argument("--val-samples", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0 = main process: on 2 cores a worker beside 2 torch threads halves the speed)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop early after this long (0 = no limit)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    if args.init and not args.init.is_file():
        print(f"error: checkpoint {args.init} not found", file=sys.stderr)
        raise SystemExit(2)
    try:
        train(args)
    except SiteDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
