"""The model manifest: the facts about a shipped ONNX model, kept beside it and checked at load.

``models/<name>/manifest.json`` names the ONNX file and its SHA-256, the input spacing and
normalisation, the crop the second pass uses, and the label table, which must equal
:func:`core.labels.label_table` exactly (the label codes are a public contract).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.digest import sha256_of
from core.errors import ModelError
from core.labels import label_table

Normalisation = Literal["core.segment.preprocess.normalise", "worker.segment.preprocess.normalise", "identity"]
"""The input normalisation by the function's dotted name; ``worker.segment...`` is its name before
scsnet 0.2 moved the science core to ``core/``, kept so models exported earlier still load."""


class ModelInput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = "b0"
    spacing_mm: tuple[float, float] = Field(description="in-plane voxel size (mm) the model expects")
    normalisation: Normalisation = "core.segment.preprocess.normalise"
    crop_size_px: tuple[int, int] = Field(description="second-pass crop around the cord, model voxels")
    pad_multiple: int = 16
    mirror_average: bool = Field(
        False,
        description="trained with left-right mirroring and swapped side labels: pass 2 averages "
        "the answer with that of the mirrored crop",
    )
    gray_contrast_gain: float = Field(
        0.0,
        ge=0.0,
        description="the second, CSF-contrast pass also brightens the cord's inside by its "
        "FA-estimated gray-matter share, up to 1 + this (core.segment.gray_contrast); 0: not, for "
        "a model that does not read gray matter by its brightness",
    )


class ModelOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = "logits"
    kind: Literal["logits", "probabilities"] = "logits"


class Manifest(BaseModel):
    """Parsed ``manifest.json``; unknown extra keys (training details) are kept."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    version: str
    file: str
    sha256: str
    opset: int
    input: ModelInput
    output: ModelOutput
    labels: list[dict[str, object]]


def load_manifest(model_dir: Path) -> tuple[Manifest, Path]:
    """Read and check ``model_dir/manifest.json``; return it with the verified ONNX path.

    Raises :class:`ModelError` if the manifest is missing or malformed, the ONNX file is missing
    or its SHA-256 differs, or the label table differs from scsnet's.
    """
    path = Path(model_dir) / "manifest.json"
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise ModelError(f"no model manifest at {path}") from exc
    except (ValueError, ValidationError) as exc:
        raise ModelError(f"the model manifest {path} is malformed: {str(exc).splitlines()[0]}") from exc
    onnx_path = Path(model_dir) / manifest.file
    if not onnx_path.is_file():
        raise ModelError(f"the model file {onnx_path} named by the manifest is missing")
    actual = sha256_of(onnx_path)
    if actual != manifest.sha256:
        raise ModelError(
            f"the model file {onnx_path.name} has SHA-256 {actual[:12]}..., but the manifest "
            f"says {manifest.sha256[:12]}...: the file is corrupt or does not belong to it"
        )
    expected = label_table()
    found = [{k: entry.get(k) for k in ("code", "key")} for entry in manifest.labels]
    if found != [{k: entry[k] for k in ("code", "key")} for entry in expected]:
        raise ModelError(f"the model {manifest.name} {manifest.version} uses a different label table")
    return manifest, onnx_path
