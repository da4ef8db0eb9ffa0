"""Layering guards for the service: the gateway imports no ML runtime, no science stack and
not the worker's pipeline; the analysis command imports no web or queue framework."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("onnxruntime", "dipy", "nibabel", "scipy", "torch", "pydicom", "highdicom", "numpy", "matplotlib", "PIL")
HEAVY_WORKER = ("worker.pipeline", "worker.tasks", "worker.celery_app", "worker.segment", "worker.ingest", "worker.tensor")


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_gateway_imports_nothing_heavy() -> None:
    loaded = _modules_after(
        "from app.main import create_app\nfrom app.settings import GatewaySettings\nimport tempfile\n"
        "create_app(GatewaySettings(data_dir=tempfile.mkdtemp(), redis_url='redis://127.0.0.1:1/0')).openapi()"
    )
    assert "fastapi" in loaded and "celery" in loaded  # the probe sees real imports
    tops = {name.split(".")[0] for name in loaded}
    assert not tops & set(HEAVY), sorted(tops & set(HEAVY))
    assert not {m for m in loaded if m.startswith(HEAVY_WORKER)}, sorted(m for m in loaded if m.startswith(HEAVY_WORKER))


def test_the_submit_client_and_cli_parser_stay_light() -> None:
    loaded = _modules_after("import app.client\nfrom worker.cli import _parser\n_parser()")
    tops = {name.split(".")[0] for name in loaded}
    assert not tops & {"onnxruntime", "dipy", "torch", "celery", "fastapi", "sqlalchemy"}, sorted(tops)
