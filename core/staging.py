"""Outputs that appear whole or not at all: an analysis writes into a temporary folder beside
its output folder, renamed into place only when everything was written."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core import outputs
from core.errors import InputError

MARKERS = (outputs.REPORT.filename, outputs.DWI_JSON.filename)
"""Files that mark a folder as an earlier scsnet output, which an analysis may replace."""


def discard_staging(out_dir: Path) -> None:
    """Remove the temporary folders :func:`staging_dir` left beside ``out_dir`` when its
    process was killed mid-way (a SIGKILL runs no ``finally``). Call it only when no other
    analysis into ``out_dir`` is running."""
    out_dir = Path(out_dir).absolute()
    for kind in ("partial", "old"):
        for folder in out_dir.parent.glob(f".{out_dir.name}.{kind}-*"):
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` that replaces it only if the block succeeds.

    Refuses to replace an existing non-empty folder that is not an earlier scsnet output.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not any((out_dir / m).exists() for m in MARKERS))):
        raise InputError(f"the output folder {out_dir} exists and holds other files; choose an empty or new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(old / "previous")
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

