"""The package map's one-way dependencies, enforced by import-linter with the contracts in
``pyproject.toml`` ([tool.importlinter]); and a check that the contracts can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "app", "worker", "service", "core", "models", "benchmarks")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS.is_file(), "import-linter is not installed (pip install -e '.[test]')"
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )


def test_every_import_linter_contract_is_kept() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "6 kept, 0 broken" in result.stdout, result.stdout[-2000:]


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's Python packages and pyproject.toml, copied so that a test may break them."""
    root = tmp_path_factory.mktemp("tree")
    shutil.copy(ROOT / "pyproject.toml", root)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("*.onnx", "*.pt", "*.npz", "*.png", "__pycache__"))
    return root


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("app/main.py", "import worker.tasks", "gateway | worker"),
        ("worker/tasks.py", "import app.main", "gateway | worker"),
        ("service/store.py", "import app.deps", "gateway | worker"),
        ("core/pipeline.py", "import service.store", "gateway | worker"),
        ("core/segment/runtime.py", "import models", "never by importing models"),
        ("models/evaluate.py", "import service.storage", "nothing of the service"),
        ("core/labels.py", "import celery", "no web or queue framework"),
        ("core/ingest/rules.py", "import numpy", "import no scientific stack"),
        ("worker/tasks.py", "import fastapi", "no web framework"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tree_copy: Path, module: str, line: str, contract: str) -> None:
    path = tree_copy / module
    original = path.read_text()
    path.write_text(original + f"\n{line}  # injected by the test\n")
    try:
        result = _lint(tree_copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0, result.stdout[-2000:]
    broken = [block for block in result.stdout.split("\n\n") if "BROKEN" in block]
    assert any(contract in " ".join(block.split()) for block in broken), result.stdout[-3000:]
