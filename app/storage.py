"""Per-job folders under the data dir, shared by the gateway and the worker.

Layout::

    <data dir>/jobs/<job id>/input/   what was uploaded (renamed by kind: dwi.nii.gz, dicom/...)
    <data dir>/jobs/<job id>/out/     what the analysis wrote (replaced atomically by the pipeline)

Paths are built only from job ids the service made itself (hex), never from client input.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class Storage:
    """The job folders under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.jobs = self.root / "jobs"
        self.jobs.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        """The folder of job ``job_id``."""
        if not _JOB_ID.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.jobs / job_id

    def input_dir(self, job_id: str) -> Path:
        """Where the job's upload lives."""
        return self.job_dir(job_id) / "input"

    def out_dir(self, job_id: str) -> Path:
        """Where the job's outputs live once it succeeded."""
        return self.job_dir(job_id) / "out"

    def input_paths(self, job_id: str, inputs: dict[str, Any]) -> tuple[list[Path], Path | None, Path | None]:
        """The pipeline's ``inputs``, ``bval`` and ``bvec`` from a job's input manifest."""
        base = self.input_dir(job_id)
        paths = [base / p for p in inputs["paths"]]
        bval = base / inputs["bval"] if inputs.get("bval") else None
        bvec = base / inputs["bvec"] if inputs.get("bvec") else None
        return paths, bval, bvec

    def artifact(self, job_id: str, filename: str) -> Path:
        """An output file of the job (``filename`` comes from the artifact table)."""
        return self.out_dir(job_id) / filename

    def delete(self, job_id: str) -> None:
        """Remove everything stored for the job."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def remove_outputs(self, job_id: str) -> None:
        """Remove the job's outputs (a cancelled job keeps none)."""
        shutil.rmtree(self.out_dir(job_id), ignore_errors=True)

    def untouched(self, *, older_than_s: float, now: float | None = None) -> list[str]:
        """Ids of job folders in which nothing has changed for ``older_than_s`` seconds (the
        newest modification time of the folder and everything in it)."""
        cutoff = (time.time() if now is None else now) - older_than_s
        found = []
        for folder in self.jobs.iterdir():
            if _JOB_ID.match(folder.name) and folder.is_dir() and _newest_mtime(folder) < cutoff:
                found.append(folder.name)
        return found

    def check_writable(self) -> None:
        """Raise OSError unless a file can be created and written in the job area (an empty
        file can still be created on a full disk, so the probe writes a block)."""
        with tempfile.NamedTemporaryFile(dir=self.jobs, prefix=".probe-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()


def _newest_mtime(folder: Path) -> float:
    """The latest modification time (s since the epoch) of ``folder`` or anything below it; a
    folder that vanishes meanwhile counts as just touched."""
    try:
        newest = folder.stat().st_mtime
        for path in folder.rglob("*"):
            newest = max(newest, path.lstat().st_mtime)
    except OSError:
        return time.time()
    return newest
