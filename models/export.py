"""Export a trained SCS-Net to ONNX (opset 17) with its manifest.

Input ``b0`` ``[N, 1, H, W]`` (dynamic N, H, W), output ``logits`` ``[N, 9, H, W]``. The manifest
(``manifest.json``) sits beside the .onnx file and carries its sha256, the model grid, the
normalisation and the label table (see ``models/README.md``).

    python -m models.export --checkpoint models/scsnet/scsnet.pt --out models/scsnet
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.digest import sha256_of
from core.labels import label_table
from core.segment.gray_contrast import GAIN as GRAY_CONTRAST_GAIN
from models.generator import CROP_SIZE_PX, MODEL_SPACING_MM
from models.net import SCSNet, count_parameters

log = logging.getLogger(__name__)

OPSET = 17
VERSION = "0.6.0"  # the shipped weights; bump when they change


def export_onnx(model: SCSNet, path: Path) -> None:
    """Write ``model`` (put in eval mode) as ONNX with dynamic batch and spatial size."""
    import onnx

    model = model.eval().cpu()
    dummy = torch.randn(1, 1, 80, 72)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic (intended)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["b0"],
            output_names=["logits"],
            opset_version=OPSET,
            dynamic_axes={"b0": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N", 2: "H", 3: "W"}},
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))


def write_manifest(
    out_dir: Path, *, model: SCSNet, training: dict[str, Any], crop_px: int = CROP_SIZE_PX, version: str = VERSION
) -> dict[str, Any]:
    """``manifest.json`` for ``out_dir/scsnet.onnx``; ``crop_px``: the training crop, which the
    run-time's pass 2 must use too."""
    onnx_path = out_dir / "scsnet.onnx"
    manifest = {
        "name": "scsnet",
        "version": version,
        "file": onnx_path.name,
        "sha256": sha256_of(onnx_path),
        "opset": OPSET,
        "input": {
            "name": "b0",
            "spacing_mm": [MODEL_SPACING_MM, MODEL_SPACING_MM],
            "normalisation": "core.segment.preprocess.normalise",
            "crop_size_px": [crop_px, crop_px],
            "pad_multiple": model.pad_multiple,
            "mirror_average": True,  # trained on mirrored slices with the side labels swapped
            "gray_contrast_gain": GRAY_CONTRAST_GAIN,  # it reads gray matter as the brighter butterfly
        },
        "output": {"name": "logits", "kind": "logits"},
        "labels": label_table(),
        "training": training,
        "parameters": count_parameters(model),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def export(model: SCSNet, out_dir: Path, *, training: dict[str, Any], crop_px: int = CROP_SIZE_PX) -> dict[str, Any]:
    """ONNX + manifest into ``out_dir``; checks ONNX Runtime against PyTorch on one input."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "scsnet.onnx"
    export_onnx(model, path)
    max_diff = parity(model, path, np.random.default_rng(0).standard_normal((2, 1, 75, 61)).astype(np.float32))
    log.info("ONNX Runtime vs PyTorch: max |softmax difference| %.2e", max_diff)
    return write_manifest(out_dir, model=model, training=training, crop_px=crop_px)


def parity(model: SCSNet, path: Path, x: np.ndarray) -> float:
    """Max absolute difference of softmax probabilities between PyTorch and ONNX Runtime."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ort_logits,) = sess.run(["logits"], {"b0": x})
    with torch.no_grad():
        pt = torch.softmax(model.eval()(torch.from_numpy(x)), dim=1).numpy()
    e = np.exp(ort_logits - ort_logits.max(axis=1, keepdims=True))
    ort_p = e / e.sum(axis=1, keepdims=True)
    return float(np.abs(ort_p - pt).max())


def load_checkpoint(path: Path) -> tuple[SCSNet, dict[str, Any], int]:
    """(network, its training record, its training crop in px) from a ``models.train`` checkpoint."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = SCSNet(widths=tuple(ck["widths"]))
    model.load_state_dict(ck["state_dict"])
    return model.eval(), ck.get("training", {}), int(ck.get("patch", CROP_SIZE_PX))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("models/scsnet/scsnet.pt"))
    parser.add_argument("--out", type=Path, default=Path("models/scsnet"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model, training, crop_px = load_checkpoint(args.checkpoint)
    manifest = export(model, args.out, training=training, crop_px=crop_px)
    log.info("wrote %s (sha256 %s)", args.out / manifest["file"], manifest["sha256"])


if __name__ == "__main__":
    main()
