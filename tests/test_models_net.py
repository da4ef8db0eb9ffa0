"""SCS-Net architecture: size, shapes and ONNX Runtime parity with PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.labels import N_CLASSES
from core.segment.preprocess import normalise
from models.export import export, parity
from models.generator import generate, to_model_grid
from models.net import SCSNet, count_parameters


def _randomised_model() -> SCSNet:
    torch.manual_seed(0)
    model = SCSNet()
    for m in model.modules():  # non-trivial BatchNorm statistics so export folds real values
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_parameter_count_within_budget() -> None:
    assert count_parameters(SCSNet()) <= 2_000_000


@pytest.mark.parametrize("shape", [(1, 1, 96, 36), (2, 1, 17, 33), (1, 1, 64, 64)])
def test_any_spatial_size_gives_same_size_logits(shape: tuple[int, ...]) -> None:
    with torch.no_grad():
        out = _randomised_model()(torch.zeros(shape))
    assert tuple(out.shape) == (shape[0], N_CLASSES, shape[2], shape[3])


def test_onnx_matches_pytorch(tmp_path: Path) -> None:
    model = _randomised_model()
    export(model, tmp_path, training={"data": "none", "steps": 0, "seed": 0})
    onnx_path = tmp_path / "scsnet.onnx"
    rng = np.random.default_rng(1)
    assert parity(model, onnx_path, rng.standard_normal((2, 1, 75, 61)).astype(np.float32)) < 1e-4
    # A real-looking input: a synthetic slice on the model grid, normalised as at run time.
    img, _ = to_model_grid(generate(123))
    x = normalise(img)[None, None]
    assert parity(model, onnx_path, x) < 1e-4


def test_manifest_pads_to_the_networks_own_multiple(tmp_path: Path) -> None:
    import json

    model = SCSNet(widths=(4, 8, 8, 8, 8, 8)).eval()  # five down-samplings: 32 px
    export(model, tmp_path, training={"data": "none", "steps": 0, "seed": 0})
    assert json.loads((tmp_path / "manifest.json").read_text())["input"]["pad_multiple"] == 32 == model.pad_multiple
