"""Synthetic studies with known answers, shared by the tests.

- :func:`decoder_model`: a tiny ONNX "segmenter" that maps b0 intensity ``100 * code`` to the
  label ``code`` exactly (logits = -k (x/100 - c)^2), used to test the run-time geometry
  (resampling, cropping, mapping back) and the pipeline without the trained network.
- :func:`exact_segmentation`: a run-time segmentation that is certain of given labels.
- :func:`region_phantom`: a cord-like disc split into the eight regions, b0 = 100 * code, with a
  known diffusion tensor per region, written as a 4D NIfTI with FSL gradient files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from scipy import ndimage

from core.labels import label_table
from core.segment.runtime import Segmentation

SCALE = 100.0


def decoder_model(out_dir: Path, *, spacing_mm: float = 1.0, crop_px: int = 32) -> Path:
    """Write ``decoder.onnx`` and its manifest into ``out_dir``; returns ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    centres = numpy_helper.from_array(np.arange(9, dtype=np.float32).reshape(1, 9, 1, 1), "centres")
    scale = numpy_helper.from_array(np.array(1.0 / SCALE, dtype=np.float32), "scale")
    gain = numpy_helper.from_array(np.array(-20.0, dtype=np.float32), "gain")
    nodes = [
        helper.make_node("Mul", ["b0", "scale"], ["x"]),
        helper.make_node("Sub", ["x", "centres"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("Mul", ["d2", "gain"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder",
        [helper.make_tensor_value_info("b0", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 9, "H", "W"])],
        initializer=[centres, scale, gain],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = out_dir / "decoder.onnx"
    onnx.save(model, str(path))
    manifest = {
        "name": "decoder-fixture",
        "version": "0.0.1",
        "file": "decoder.onnx",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "opset": 17,
        "input": {"name": "b0", "spacing_mm": [spacing_mm, spacing_mm], "normalisation": "identity", "crop_size_px": [crop_px, crop_px], "pad_multiple": 8},
        "output": {"name": "logits", "kind": "logits"},
        "labels": label_table(),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


# Known tensors (eigenvalues in mm^2/s, principal axis along the cord = world z).
WM_EVALS = (1.7e-3, 0.3e-3, 0.3e-3)  # FA 0.80, MD 0.767e-3
GM_EVALS = (1.0e-3, 0.5e-3, 0.5e-3)  # FA 0.41, MD 0.667e-3
CSF_MD = 3.0e-3


def exact_segmentation(labels: np.ndarray) -> Segmentation:
    """The (H, W, 1) segmentation of (H, W) ``labels`` a network certain of them would give
    (cord probability 1 on the cord, 0 elsewhere)."""
    lab = np.asarray(labels, np.uint8)[:, :, None]
    return Segmentation(labels=lab, cord_probability=(lab > 0).astype(np.float32))


def fa_md(evals: tuple[float, float, float]) -> tuple[float, float]:
    """Analytic FA and MD of a tensor with eigenvalues ``evals``."""
    ev = np.asarray(evals)
    md = ev.mean()
    fa = np.sqrt(1.5 * ((ev - md) ** 2).sum() / (ev**2).sum())
    return float(fa), float(md)


def region_labels(shape: tuple[int, int, int], *, radius_vox: float = 7.0, centre: tuple[float, float] | None = None) -> np.ndarray:
    """(X, Y, Z) uint8 labels on a canonical RAS grid: a disc of eight regions per slice.

    Left (codes 1-4) at smaller i (world x); dorsal (2, 6) posterior (smaller j); ventral (3, 7)
    anterior; gray matter (4, 8) an inner disc; lateral (1, 5) the rest.
    """
    nx, ny, nz = shape
    ci, cj = centre if centre is not None else ((nx - 1) / 2, (ny - 1) / 2)
    ii, jj = np.mgrid[0:nx, 0:ny]
    di, dj = ii - ci, jj - cj
    r = np.hypot(di, dj)
    angle = np.degrees(np.arctan2(dj, np.abs(di)))  # -90 (posterior) .. 90 (anterior)
    side_offset = np.where(di < 0, 0, 4)
    tissue = np.where(r < 0.45 * radius_vox, 4, np.where(angle < -45, 2, np.where(angle > 45, 3, 1)))
    lab = np.where(r <= radius_vox, tissue + side_offset, 0).astype(np.uint8)
    return np.repeat(lab[:, :, None], nz, axis=2)


def gradient_scheme(n_dirs: int = 30, *, seed: int = 0) -> np.ndarray:
    """(n, 3) unit directions spread over the sphere (electrostatic-like via a Fibonacci lattice)."""
    k = np.arange(n_dirs) + 0.5
    phi = np.arccos(1 - k / n_dirs)  # upper hemisphere
    theta = np.pi * (1 + 5**0.5) * k
    g = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def tensor_signal(s0: np.ndarray, evals: tuple[float, float, float], evec1: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    """Noise-free signal (..., N) = S0 exp(-b g^T D g) for an axially symmetric tensor."""
    e1 = evec1 / np.linalg.norm(evec1)
    d = evals[1] * np.eye(3) + (evals[0] - evals[1]) * np.outer(e1, e1)
    att = np.exp(-bvals * np.einsum("ni,ij,nj->n", bvecs, d, bvecs))
    return s0[..., None] * att


def region_phantom(
    out_dir: Path,
    *,
    shape: tuple[int, int, int] = (40, 36, 4),
    zooms: tuple[float, float, float] = (1.0, 1.0, 4.0),
    n_dirs: int = 30,
    bval: float = 800.0,
    snr: float | None = None,
    seed: int = 0,
    csf_rim: bool = False,
) -> dict[str, object]:
    """Write ``phantom.nii.gz`` (+ .bval/.bvec) in canonical RAS with known tensors.

    ``csf_rim``: the outline voxels of each slice's cord keep their region's b0 (so a decoder
    model still labels them) but diffuse like CSF (isotropic, ``CSF_MD``): a mask spilling
    into the CSF. They are not in the returned ``labels``.

    Returns a dict with paths and the truth: ``labels`` (X, Y, Z), ``fa``/``md`` per code, and
    ``rim`` (X, Y, Z) bool.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = region_labels(shape)
    rim = np.zeros(shape, bool)
    if csf_rim:
        cross = ndimage.generate_binary_structure(2, 1)
        for z in range(shape[2]):
            cord = labels[:, :, z] > 0
            rim[:, :, z] = cord & ~ndimage.binary_erosion(cord, cross)
    dirs = gradient_scheme(n_dirs)
    bvals = np.concatenate([[0.0], np.full(n_dirs, bval), [0.0]])
    bvecs = np.concatenate([[[0, 0, 0]], dirs, [[0, 0, 0]]])
    data = np.zeros(shape + (len(bvals),), dtype=np.float64)
    truth_fa, truth_md = {}, {}
    for code in range(1, 9):
        evals = GM_EVALS if code in (4, 8) else WM_EVALS
        inside = labels == code
        s0 = np.full(int(inside.sum()), SCALE * code)
        data[inside] = tensor_signal(s0, evals, np.array([0.0, 0.0, 1.0]), bvals, bvecs)
        truth_fa[code], truth_md[code] = fa_md(evals)
    data[rim] = tensor_signal(SCALE * labels[rim].astype(np.float64), (CSF_MD,) * 3, np.array([0.0, 0.0, 1.0]), bvals, bvecs)
    labels[rim] = 0
    if snr is not None:
        rng = np.random.default_rng(seed)
        sigma = SCALE * 4 / snr  # SNR defined on a mid-cord b0 intensity (code 4)
        data = np.abs(data + rng.normal(0, sigma, data.shape) + 1j * rng.normal(0, sigma, data.shape))
    affine = np.diag(list(zooms) + [1.0])
    affine[:3, 3] = [-shape[0] * zooms[0] / 2, -shape[1] * zooms[1] / 2, 0]
    image = out_dir / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(image))
    # FSL convention: det > 0 here, so x is flipped in the file.
    fsl = bvecs.copy()
    fsl[:, 0] *= -1
    (out_dir / "phantom.bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    (out_dir / "phantom.bvec").write_text("\n".join(" ".join(f"{v:.8f}" for v in row) for row in fsl.T) + "\n")
    return {"image": image, "labels": labels, "fa": truth_fa, "md": truth_md, "affine": affine, "rim": rim}
