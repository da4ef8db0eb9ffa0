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

    def remove_inputs(self, job_id: str) -> None:
        """Remove the job's upload (a cancelled job, or a succeeded one with ``keep_inputs`` off)."""
        shutil.rmtree(self.input_dir(job_id), ignore_errors=True)

    def remove_outputs(self, job_id: str) -> None:
        """Remove the job's outputs (a cancelled job keeps none)."""
        shutil.rmtree(self.out_dir(job_id), ignore_errors=True)

    def job_ids(self) -> list[str]:
        """Ids of every job folder present."""
        return [p.name for p in self.jobs.iterdir() if _JOB_ID.match(p.name) and p.is_dir()]

    def idle_s(self, job_id: str) -> float:
        """Seconds since anything in the job's folder last changed (:func:`idle_s`)."""
        return idle_s(self.job_dir(job_id))

    def check_writable(self) -> None:
        """Raise OSError unless a file can be created and written in the job area (an empty
        file can still be created on a full disk, so the probe writes a block)."""
        with tempfile.NamedTemporaryFile(dir=self.jobs, prefix=".probe-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()


def idle_s(folder: Path) -> float:
    """Seconds since anything in ``folder`` last changed (its newest modification time and that
    of everything below it); 0 if the folder vanishes meanwhile."""
    try:
        newest = folder.stat().st_mtime
        for path in folder.rglob("*"):
            newest = max(newest, path.lstat().st_mtime)
    except OSError:
        return 0.0
    return time.time() - newest
