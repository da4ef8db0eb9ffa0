"""Run-time segmentation of the mean b0 into the eight regions with the ONNX SCS-Net.

Per axial slice (the third axis of a closest-canonical RAS volume):

1. resample to the model's in-plane spacing;
2. pass 1: the whole normalised slice -> P(cord) = 1 - P(background); the largest connected
   cord component gives the cord's centre (a slice without one gets no labels and a warning).
   It runs on every ``LOCATE_STRIDE``-th slice; the slices in between take interpolated centres
   that pass 2 must confirm, or are located on their own;
3. pass 2: a crop of ``crop_size_px`` around that centre, normalised on its own -> class
   probabilities (averaged with those of the mirrored crop, sides swapped back), pasted into a
   background canvas. Where the cord lies turned in-plane by 10 degrees or more (the long axis
   of pass 2's cord, pooled over the slices: :mod:`core.segment.orientation`), pass 2 also
   sees the crops turned back by that angle, and its answer there, turned forward, is averaged
   with the one as they lie;
4. the nine probability maps are resampled back to the input grid (linear); a voxel is cord
   where the background is below one half (:func:`_cord_first`; where the refinement's trim by
   MD checks the outline afterwards, also a voxel the network hesitates to give to a ventral
   funiculus rather than to the background: :func:`_ventral_lean`), and a cord voxel's label
   is its most probable region; one connected cord is kept per slice. The maps are kept
   in the result (``Segmentation.probabilities``) for probability-weighted measures and
   confidence;
5. with ``augment=True``, test-time augmentation (:mod:`core.segment.tta`): the b0 is segmented
   again shifted by one voxel in-plane and mirrored left-right (its output mirrored back with
   the side channels swapped), reusing pass 1's centres, and each labelling's agreement with
   the main labels is kept (``Segmentation.agreement``).

One ONNX Runtime session per process and model (:func:`load_segmenter` is cached), on the CUDA
provider where present, else the CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from scipy import ndimage

from core.errors import ModelError
from core.ingest.rules import check_resampled_slice
from core.labels import BACKGROUND, MIRROR_LUT, N_CLASSES, REGIONS
from core.segment.cord import keep_largest_cord, min_cord_voxels, missing_cord_warning
from core.segment.manifest import load_manifest
from core.segment.orientation import cord_turn_deg, turn, turn_probabilities
from core.segment.preprocess import (
    linear_matrix,
    normalise,
    resample_slice,
    zoom_factors,
)
from core.segment.tta import Agreement, agreement

BATCH_PIXELS = 1 << 16
"""Most pixels (images x height x width) per network run; see Segmenter.probabilities."""

LOCATE_STRIDE = 4
"""Pass 1 (finding the cord on the whole slice) runs on every 4th slice; see Segmenter._locate."""

_MIRROR = np.asarray(MIRROR_LUT)  # an involution: it maps codes both ways

MAX_CENTRE_SHIFT_MM = 8.0
"""An interpolated crop centre is accepted when pass 2 finds the cord within this distance."""

VENTRAL_LEAN_P_BACKGROUND = 0.8
"""A voxel whose most probable region is a ventral funiculus is labelled so when its background
probability is below this, not only when the background is less probable than that region; see
:func:`_ventral_lean`."""

_VENTRAL_CODES = np.asarray([r.code for r in REGIONS if r.tissue == "ventral"])


@dataclass(frozen=True)
class _Centre:
    """A cord centre on the model grid (row, column), and whether it was interpolated."""

    i: int
    j: int
    interpolated: bool = False


@dataclass(frozen=True)
class Segmentation:
    """Labels on the canonical grid and what was noticed while making them.

    labels : (X, Y, Z) uint8 codes 0-8 (core.labels).
    cord_probability : (X, Y, Z) float32 P(cord) from the second pass, on the input grid.
    slices_without_cord : axial slice indices where no cord was found.
    warnings : sentences for the report's QC section.
    probabilities : (9, X, Y, Z) float32 softmax per class code on the input grid (the maps
        whose argmax gave ``labels``, before the one-cord rule), or None where unknown (a
        segmentation made by hand); the measures then take ``labels`` as one-hot.
        About 9 x 4 bytes per voxel of the b0 (a 128 x 128 x 20 grid: 12 MB).
    agreement : test-time augmentation Dice of the labels made from the same image
        (``Segmenter.segment(augment=True)``), or None.
    turn_deg : the cord's in-plane angle (degrees, on the model grid: from its first axis, the
        patient's left-right, towards the second) by which pass 2's crops were also seen turned
        back; 0.0: seen only as they lie.
    """

    labels: NDArray[np.uint8]
    cord_probability: NDArray[np.float32]
    slices_without_cord: tuple[int, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)
    probabilities: NDArray[np.float32] | None = None
    agreement: Agreement | None = None
    turn_deg: float = 0.0


class Segmenter:
    """An ONNX SCS-Net model ready to segment b0 volumes; build once, apply many times."""

    def __init__(self, model_dir: Path, *, providers: list[str] | None = None, threads: int = 0) -> None:
        """Load and check the model in ``model_dir``; ``threads``: ONNX Runtime intra-op CPU
        threads (0: its default, all cores)."""
        self.manifest, self.onnx_path = load_manifest(Path(model_dir))
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        # Idle pool threads sleep instead of spinning: the numpy resampling between network
        # runs (pass 2's crops back to the b0 grid, the augmentations) otherwise competes with
        # spinning threads for the cores. On the bundled real DWI, 2 cores with another process
        # busy on one, the segment stage with test-time augmentation took 3-4 s spinning and
        # 0.6-1.4 s not; on an idle machine the two are alike.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(self.onnx_path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt models
            raise ModelError(f"the model file {self.onnx_path.name} cannot be loaded: {exc}") from exc
        self.provider: str = self._session.get_providers()[0]
        self._input = self.manifest.input
        self._output_name = self.manifest.output.name

    @property
    def sha256(self) -> str:
        return self.manifest.sha256

    @property
    def gray_contrast_gain(self) -> float:
        """The manifest's gain of the second pass's gray-matter contrast (0: none;
        :mod:`core.segment.gray_contrast`)."""
        return float(self._input.gray_contrast_gain)

    def _normalise(self, image: NDArray[np.float32]) -> NDArray[np.float32]:
        if self._input.normalisation == "identity":
            return image.astype(np.float32)
        return normalise(image)

    def probabilities(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """Run the network on (N, H, W) normalised images -> (N, 9, H, W) probabilities.

        Images go through in groups of at most ``BATCH_PIXELS`` pixels: the network's
        activations (tens of floats per pixel) then stay within a few hundred MB whatever the
        field of view, at no cost in speed (throughput is flat beyond a few crops per run).
        """
        n, h, w = batch.shape
        m = self._input.pad_multiple
        ph, pw = (-h) % m, (-w) % m
        padded = np.pad(batch, ((0, 0), (0, ph), (0, pw)), mode="edge")[:, None]
        group = max(1, BATCH_PIXELS // ((h + ph) * (w + pw)))
        out = np.concatenate([
            self._session.run([self._output_name], {self._input.name: padded[k : k + group]})[0][:, :, :h, :w]
            for k in range(0, n, group)
        ]).astype(np.float32, copy=False)
        if out.shape[1] != N_CLASSES:
            raise ModelError(f"the model returned {out.shape[1]} classes, expected {N_CLASSES}")
        if self.manifest.output.kind == "logits":
            out = out - out.max(axis=1, keepdims=True)
            np.exp(out, out=out)
            out /= out.sum(axis=1, keepdims=True)
        return out

    def _locate(
        self, slices: NDArray[np.float32], *, min_pixels: float, only: list[int] | None = None
    ) -> list[_Centre | None]:
        """Cord centre per slice on the model grid, or None where there is no cord (pass 1).

        Pass 1 sees whole slices and is the costly pass on a full field of view, so it runs on
        every ``LOCATE_STRIDE``-th slice (and the last); a slice in between takes the centre
        interpolated from its two located neighbours when both hold a cord (the cord moves a
        few mm at most over ``LOCATE_STRIDE`` slices, well inside the crop), and is located on
        its own otherwise. ``only``: locate exactly these slices (no interpolation).
        """
        nz = len(slices)
        if only is not None:
            sampled = list(only)
        else:
            sampled = sorted(set(range(0, nz, LOCATE_STRIDE)) | {nz - 1})
        centres: list[_Centre | None] = [None] * nz

        def run(zs: list[int]) -> None:
            probs = self.probabilities(np.stack([self._normalise(slices[z]) for z in zs]))
            for z, p in zip(zs, probs):
                centres[z] = _cord_centre(1.0 - p[BACKGROUND], min_pixels=min_pixels)

        run(sampled)
        if only is not None:
            return centres
        alone = []
        for a, b in zip(sampled[:-1], sampled[1:]):
            ca, cb = centres[a], centres[b]
            for z in range(a + 1, b):
                if ca is None or cb is None:
                    alone.append(z)
                else:
                    t = (z - a) / (b - a)
                    centres[z] = _Centre(round(ca.i + t * (cb.i - ca.i)), round(ca.j + t * (cb.j - ca.j)), interpolated=True)
        if alone:
            run(alone)
        return centres

    def _fine_pass(
        self, slices: NDArray[np.float32], centres: list[_Centre | None], zs: list[int], *, mirror: bool = True,
        turn_deg: float = 0.0,
    ) -> dict[int, tuple[NDArray[np.float32], Box]]:
        """Pass 2 on a crop around each slice's cord centre: ``{z: ((C, h, w) probabilities, box)}``.

        With the manifest's ``mirror_average`` (a model trained on mirrored slices with swapped
        side labels), each crop is also segmented mirrored left-right and the two answers are
        averaged, the mirrored one with its left and right channels swapped back through
        ``MIRROR_LUT``: the answer then has no side preference (exactly mirror-symmetric), and
        held-out Dice of the shipped model rises by about 0.01. ``mirror=False`` skips that
        averaging (the test-time augmentations, whose flipped run would otherwise repeat it).

        ``turn_deg``: the cord's in-plane angle (:func:`core.segment.orientation.cord_turn_deg`);
        each crop is turned back by it before the network and the answer turned forward again,
        so that the network sees the cord lying as it lay on average in training.
        """
        if not zs:
            return {}
        crops, boxes = zip(*(_crop(slices[z], (centres[z].i, centres[z].j), self._input.crop_size_px) for z in zs))  # type: ignore[union-attr]
        images = np.stack([self._normalise(turn(c, -turn_deg)) for c in crops])
        if not (self._input.mirror_average and mirror):
            probs = self.probabilities(images)
        else:
            both = self.probabilities(np.concatenate([images, images[:, ::-1]]))
            n = len(zs)
            mirrored = both[n:][:, _MIRROR, ::-1]  # channel c of a mirrored answer is code MIRROR_LUT[c]
            probs = (both[:n] + mirrored) / 2
        return {z: (turn_probabilities(p, turn_deg), box) for z, p, box in zip(zs, probs, boxes)}

    def _fine_views(
        self, slices: NDArray[np.float32], centres: list[_Centre | None], zs: list[int], *, turn_deg: float,
        mirror: bool = True, as_lying: dict[int, tuple[NDArray[np.float32], Box]] | None = None,
    ) -> dict[int, tuple[NDArray[np.float32], Box]]:
        """Pass 2's answer (:meth:`_fine_pass`) for the crops as they lie and, where ``turn_deg``
        is not 0, the mean of that and the answer for the crops turned back by it (``as_lying``:
        the first, already computed for these ``zs``)."""
        plain = as_lying if as_lying is not None else self._fine_pass(slices, centres, zs, mirror=mirror)
        if not turn_deg:
            return plain
        turned = self._fine_pass(slices, centres, zs, mirror=mirror, turn_deg=turn_deg)
        return {z: ((plain[z][0] + turned[z][0]) / 2, box) for z, (_, box) in turned.items()}

    def segment(
        self, b0: NDArray[np.floating], *, zooms_mm: tuple[float, float, float], augment: bool = False,
        ventral_lean: bool = False, cord: NDArray[np.bool_] | None = None, turn_deg: float | None = None,
    ) -> Segmentation:
        """Segment a mean-b0 volume.

        Parameters
        ----------
        b0 : (X, Y, Z) mean b=0 image in closest-canonical RAS orientation (axial slices along Z).
        zooms_mm : voxel size (mm) along X, Y, Z.
        augment : also segment the shifted and the mirrored b0 and keep their agreement with the
            labels (:meth:`_augmented`, :mod:`core.segment.tta`).
        ventral_lean : also take in the voxels of :func:`_ventral_lean` as cord (the
            augmentations too); for masks whose outline the refinement's trim by MD checks
            afterwards (the pipeline's passes unless ``--no-refine``).
        cord : (X, Y, Z) a cord already found on this grid (another segmentation of the same
            study): pass 2's crops are centred on each slice's cord centroid and pass 1 is
            skipped (a slice without cord gets no labels); for an image that differs from an
            already segmented one only at the cord and its CSF (the refinement's CSF-contrast
            and gray-contrast images).
        turn_deg : the cord's in-plane angle on the model grid (degrees; pass 2 also sees its
            crops turned back by it and averages the two answers, :meth:`_fine_views`), e.g.
            ``Segmentation.turn_deg`` of another segmentation of the study; None: measured here
            from pass 2's own cord (:func:`core.segment.orientation.cord_turn_deg`, one connected
            cord pooled over the slices) and, where it is not 0, pass 2 run again turned.

        Returns
        -------
        :class:`Segmentation` on the same (X, Y, Z) grid.
        """
        b0 = np.asarray(b0, dtype=np.float32)
        target = (float(self._input.spacing_mm[0]), float(self._input.spacing_mm[1]))
        spacing = (float(zooms_mm[0]), float(zooms_mm[1]))
        nz = b0.shape[2]
        fx, fy = zoom_factors(spacing, target)
        check_resampled_slice((round(b0.shape[0] * fx), round(b0.shape[1] * fy)), label="the b0 image")
        slices = np.stack([resample_slice(b0[:, :, z], spacing_mm=spacing, target_mm=target) for z in range(nz)])
        pixel_area = target[0] * target[1]

        centres = self._locate(slices, min_pixels=min_cord_voxels(pixel_area)) if cord is None else _centres_of(cord, (fx, fy))
        found = [z for z in range(nz) if centres[z] is not None]
        given_turn = turn_deg
        turn_deg = turn_deg or 0.0
        fine = self._fine_views(slices, centres, found, turn_deg=turn_deg)
        # A slice whose centre was interpolated, where the crop shows no cord near its middle,
        # is located on its own after all (pass 1), so it ends exactly as a fully located slice.
        recheck = [z for z in found if centres[z].interpolated and not _cord_near_centre(fine[z][0], MAX_CENTRE_SHIFT_MM / target[0])]  # type: ignore[union-attr]
        if recheck:
            exact = self._locate(slices, min_pixels=min_cord_voxels(pixel_area), only=recheck)
            for z in recheck:
                centres[z] = exact[z]
                fine.pop(z)
            fine.update(self._fine_views(slices, centres, [z for z in recheck if centres[z] is not None], turn_deg=turn_deg))
        if given_turn is None:
            turn_deg = cord_turn_deg(_cord_pixels(p) for p, _ in fine.values())
            if turn_deg:
                fine = self._fine_views(slices, centres, sorted(fine), turn_deg=turn_deg, as_lying=fine)
        probabilities = _to_input_grid(fine, slices.shape[1:], b0.shape)
        min_voxels = min_cord_voxels(spacing[0] * spacing[1])
        labels, missing = _labels_of(probabilities, min_voxels=min_voxels, ventral_lean=ventral_lean)
        cord_prob = 1.0 - probabilities[BACKGROUND]
        warnings = []
        swapped = _sides_swapped(labels)
        if swapped:
            warnings.append(
                f"the left regions lie to the patient's right of the right regions on slice(s) "
                f"{', '.join(map(str, swapped))}; check the image orientation"
            )
        if missing:
            warnings.append(missing_cord_warning(missing))
        tta = None
        if augment:
            shift = (max(1, round(fx)), max(1, round(fy)))
            augmented = self._augmented(b0, centres, spacing=spacing, target=target, shift_px=shift, min_voxels=min_voxels,
                                        ventral_lean=ventral_lean, turn_deg=turn_deg)
            tta = agreement(labels, augmented)
        return Segmentation(
            labels=labels, cord_probability=cord_prob, slices_without_cord=tuple(missing), warnings=tuple(warnings),
            probabilities=probabilities, agreement=tta, turn_deg=turn_deg,
        )

    def _augmented(
        self, b0: NDArray[np.float32], centres: list[_Centre | None], *,
        spacing: tuple[float, float], target: tuple[float, float], shift_px: tuple[int, int], min_voxels: float,
        ventral_lean: bool = False, turn_deg: float = 0.0,
    ) -> dict[str, NDArray[np.uint8]]:
        """Labels of the b0 shifted by one voxel along both in-plane axes and of the b0 mirrored
        left-right, each mapped back onto the b0's own voxels (``{"shift": .., "flip": ..}``).

        Pass 1's centres are reused (moved with the image), and each crop is segmented once
        (no mirror averaging), so the two augmentations together cost about one more pass 2.
        The mirrored answer is mirrored back along x (canonical RAS: the patient's left-right)
        and its side channels swapped through ``MIRROR_LUT``: left and right are anatomical.
        The crops are also seen turned back by ``turn_deg`` as in :meth:`_fine_views` (the mirrored
        ones by its opposite: mirroring reverses the cord's angle).
        """
        nz = b0.shape[2]
        zs = [z for z in range(nz) if centres[z] is not None]
        shifted = np.pad(b0, ((1, 0), (1, 0), (0, 0)), mode="edge")[: b0.shape[0], : b0.shape[1]]  # [i, j] <- b0[i-1, j-1]
        flipped = b0[::-1]
        # Both augmentations go through the network together: slices 0..nz-1 shifted, nz.. flipped.
        slices = np.stack(
            [resample_slice(image[:, :, z], spacing_mm=spacing, target_mm=target) for image in (shifted, flipped) for z in range(nz)]
        )
        h = slices.shape[1]
        moved = [None if c is None else _Centre(c.i + shift_px[0], c.j + shift_px[1]) for c in centres]
        mirrored = [None if c is None else _Centre(h - 1 - c.i, c.j) for c in centres]
        fine = self._fine_views(slices, moved, zs, mirror=False, turn_deg=turn_deg)
        fine.update(self._fine_views(slices, moved + mirrored, [nz + z for z in zs], mirror=False, turn_deg=-turn_deg))
        out: dict[str, NDArray[np.uint8]] = {}

        probs = _to_input_grid({z: fine[z] for z in zs}, slices.shape[1:], b0.shape)
        labels, _ = _labels_of(probs, min_voxels=min_voxels, ventral_lean=ventral_lean)
        back = np.zeros_like(labels)
        back[:-1, :-1] = labels[1:, 1:]
        out["shift"] = back

        probs = _to_input_grid({z: fine[nz + z] for z in zs}, slices.shape[1:], b0.shape)
        probs = np.ascontiguousarray(probs[_MIRROR, ::-1])  # channel c of the mirrored answer is code MIRROR_LUT[c]
        out["flip"], _ = _labels_of(probs, min_voxels=min_voxels, ventral_lean=ventral_lean)
        return out


def _to_input_grid(
    fine: dict[int, tuple[NDArray[np.float32], Box]], model_shape: tuple[int, int], shape: tuple[int, int, int]
) -> NDArray[np.float32]:
    """(9, X, Y, Z) probabilities on the input grid from pass 2's crops on the model grid (a
    slice without a crop is background).

    The same as pasting each crop into a background slice of ``model_shape`` and resampling
    the whole slice linearly (:func:`core.segment.preprocess.resample_to_shape`), without
    resampling the background: linear weights sum to one, so the background slice resamples to
    itself and only the crop's difference from it, ``R[:, rows] (P - B) C[:, cols]^T``, moves
    the answer.
    """
    out = np.zeros((N_CLASSES,) + tuple(shape), dtype=np.float32)
    out[BACKGROUND] = 1.0
    rows, cols = linear_matrix(model_shape[0], shape[0]), linear_matrix(model_shape[1], shape[1])
    for z, (probs, box) in fine.items():
        inside = _inside(box, model_shape)
        if inside is None:
            continue
        (r0, r1), (c0, c1), crop = inside
        delta = np.array(probs[:, crop[0], crop[1]], dtype=np.float32)
        delta[BACKGROUND] -= 1.0
        out[:, :, :, z] += np.matmul(np.matmul(rows[:, r0:r1], delta), cols[:, c0:c1].T)
    return out


def _labels_of(
    probabilities: NDArray[np.float32], *, min_voxels: float, ventral_lean: bool = False
) -> tuple[NDArray[np.uint8], list[int]]:
    """(X, Y, Z) labels of (9, X, Y, Z) ``probabilities``: a voxel is cord where
    :func:`_cord_first` (with ``ventral_lean``, also :func:`_ventral_lean`) says so and then takes
    its most probable region; one connected cord per slice; a slice whose cord is under
    ``min_voxels`` is cleared and listed."""
    region = (np.argmax(probabilities[1:], axis=0) + 1).astype(np.uint8)  # most probable region, codes 1-8
    cord = _cord_first(probabilities)
    if ventral_lean:
        cord |= _ventral_lean(probabilities, region)
    labels = np.where(cord, region, np.uint8(BACKGROUND))
    missing: list[int] = []
    for z in range(labels.shape[2]):
        slice_labels = keep_largest_cord(labels[:, :, z])
        if np.count_nonzero(slice_labels) < min_voxels:
            slice_labels = np.zeros_like(slice_labels)
            missing.append(z)
        labels[:, :, z] = slice_labels
    return labels, missing


def _cord_first(probabilities: NDArray[np.float32]) -> NDArray[np.bool_]:
    """The voxels of (9, ...) ``probabilities`` that are more probably cord than not,
    P(background) < 1/2: the cord, decided against the background before the region inside it.

    Where one class holds the majority this is the nine-class argmax. At the cord's edge,
    though, a voxel's cord probability is split among two or three regions, so the background
    can win that argmax while the voxel is more likely cord than not: the outline then falls
    inside the cord (the real GRE-EPI cords, ``python -m models.real_epi``, came out at
    0.82-0.86 of their tracings' volume). Deciding cord against background first, by the cord's
    own probability, keeps the outline where the network puts it.
    """
    return probabilities[BACKGROUND] < 0.5


def _ventral_lean(probabilities: NDArray[np.float32], region: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """The voxels whose most probable region (``region``, codes 1-8) is a ventral funiculus and
    whose background probability is below ``VENTRAL_LEAN_P_BACKGROUND``: cord as well.

    At the front of the cord the network splits an edge voxel's cord probability between the
    ventral funiculus and its neighbours, so the plain argmax leaves out voxels that are mostly
    cord, most of all on compressed cords, where the ventral funiculi are little more than
    their edge. The voxels taken in border the CSF in front of the cord, where the refinement's
    trim by MD gives back those that are mostly CSF; without that trim (``--no-refine``, images
    without diffusion) the cord of :func:`_cord_first` stands. On the independent yardstick the
    ventral funiculi's FA error fell from 5.73 / 5.40 % to 5.22 / 4.67 % (seeds 0-1, where 0.7,
    0.8 and 0.9 were tried) and from 5.91 / 5.76 % to 5.59 / 4.97 % (seeds 2-3); leaning every
    region towards the cord instead raised the lateral funiculi's error on both draws
    (models/scsnet/MODEL_CARD.md).
    """
    return (probabilities[BACKGROUND] < VENTRAL_LEAN_P_BACKGROUND) & np.isin(region, _VENTRAL_CODES)


def _centres_of(cord: NDArray[np.bool_], factors: tuple[float, float]) -> list[_Centre | None]:
    """Per slice of an (X, Y, Z) cord mask, its centroid on the model grid (``factors``: model
    pixels per input voxel along X and Y), or None where the slice has no cord."""
    centres: list[_Centre | None] = []
    for z in range(cord.shape[2]):
        if not cord[:, :, z].any():
            centres.append(None)
            continue
        ci, cj = ndimage.center_of_mass(cord[:, :, z])
        centres.append(_Centre(int(round((ci + 0.5) * factors[0] - 0.5)), int(round((cj + 0.5) * factors[1] - 0.5))))
    return centres


def _cord_pixels(probs: NDArray[np.float32]) -> NDArray[np.bool_]:
    """A crop's cord ((C, h, w) probabilities -> (h, w)): where the background is below one half,
    its largest connected piece."""
    return keep_largest_cord((probs[BACKGROUND] < 0.5).astype(np.uint8)) > 0


def _cord_centre(p_cord: NDArray[np.float32], *, min_pixels: float) -> _Centre | None:
    """Centre (row, col) of the most probable connected cord component, or None."""
    components, n = ndimage.label(p_cord > 0.5)
    if n == 0:
        return None
    mass = ndimage.sum_labels(p_cord, components, index=np.arange(1, n + 1))
    size = ndimage.sum_labels(np.ones_like(p_cord), components, index=np.arange(1, n + 1))
    best = int(np.argmax(mass))
    if size[best] < min_pixels:
        return None
    ci, cj = ndimage.center_of_mass(p_cord, components, best + 1)
    return _Centre(int(round(ci)), int(round(cj)))


def _cord_near_centre(probs: NDArray[np.float32], max_shift_px: float) -> bool:
    """Whether a pass-2 crop (C, h, w) holds a cord whose centre is within ``max_shift_px`` of
    the crop's middle."""
    p_cord = 1.0 - probs[BACKGROUND]
    cord = p_cord > 0.5
    if not cord.any():
        return False
    ci, cj = np.argwhere(cord).mean(axis=0)
    h, w = p_cord.shape
    return bool(np.hypot(ci - (h - 1) / 2, cj - (w - 1) / 2) <= max_shift_px)


Box = tuple[int, int, int, int]  # i0, j0 in the slice (may be negative), height, width


def _crop(image: NDArray[np.float32], centre: tuple[int, int], size: tuple[int, int]) -> tuple[NDArray[np.float32], Box]:
    """A ``size`` crop centred on ``centre``, padded with the image's edge where it overhangs."""
    h, w = size
    i0, j0 = centre[0] - h // 2, centre[1] - w // 2
    pad = max(0, -i0, -j0, i0 + h - image.shape[0], j0 + w - image.shape[1])
    padded = np.pad(image, pad, mode="edge") if pad else image
    crop = padded[i0 + pad : i0 + pad + h, j0 + pad : j0 + pad + w]
    return np.ascontiguousarray(crop), (i0, j0, h, w)


def _inside(box: Box, shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], tuple[slice, slice]] | None:
    """The part of a crop ``box`` that lies inside a slice of ``shape``: its row and column
    ranges in the slice and the matching slices of the crop; None if none of it does."""
    i0, j0, h, w = box
    a0, b0 = max(i0, 0), max(j0, 0)
    a1, b1 = min(i0 + h, shape[0]), min(j0 + w, shape[1])
    if a1 <= a0 or b1 <= b0:
        return None
    return (a0, a1), (b0, b1), (slice(a0 - i0, a1 - i0), slice(b0 - j0, b1 - j0))


def _sides_swapped(labels: NDArray[np.uint8]) -> list[int]:
    """Slices whose left-coded voxels (1-4) lie, on average, at larger canonical x (towards the
    patient's right) than the right-coded ones (5-8)."""
    swapped = []
    for z in range(labels.shape[2]):
        left = np.argwhere((labels[:, :, z] >= 1) & (labels[:, :, z] <= 4))
        right = np.argwhere(labels[:, :, z] >= 5)
        if len(left) and len(right) and left[:, 0].mean() > right[:, 0].mean():
            swapped.append(z)
    return swapped


@functools.lru_cache(maxsize=4)
def load_segmenter(model_dir: str, threads: int = 0) -> Segmenter:
    """The process-wide :class:`Segmenter` for ``model_dir`` (created once, then reused)."""
    return Segmenter(Path(model_dir), threads=threads)
