"""Owner-only files for every service process.

The data dir holds what no other local user may read: uploads (DICOM with patient names),
outputs, the SQLite job store and its WAL (every tenant's webhook signing secret), the worker log
and the embedded Redis's append-only file. So every service process (``scsnet serve`` and the
Redis and Celery children it starts, ``scsnet worker``, ``scsnet apikey``, a gateway started by
``uvicorn --factory app.main:app_from_env``, a worker started by ``celery -A worker.celery_app``)
calls :func:`secure_service` first: the umask 077 makes every file and folder it (or a child, or
a program it execs: the umask survives ``exec``) creates owner-only, and the data dir itself is
made ``0700``, which also shuts out files an older version left readable inside it.

``scsnet analyze`` (the core's command line) is not a service process: it writes into the
folder its user chose, with that user's umask.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_ONLY_UMASK = 0o077
"""Clears every group and other permission bit of what the process creates."""

DATA_DIR_MODE = 0o700

_warned: set[Path] = set()


def secure_process() -> None:
    """Set this process's umask to 077 (idempotent; inherited by children and across exec)."""
    os.umask(OWNER_ONLY_UMASK)


def secure_data_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) owner-only; tighten it to 0700 if it grants group or
    other users anything, with a warning logged once per path. Returns ``path``."""
    path = Path(path)
    path.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, DATA_DIR_MODE)
        if path not in _warned:
            _warned.add(path)
            log.warning("data dir %s was readable by other users (mode %03o); made it owner-only (700)", path, mode)
    return path


def secure_service(data_dir: Path) -> Path:
    """:func:`secure_process` then :func:`secure_data_dir`: the first thing a service process does."""
    secure_process()
    return secure_data_dir(data_dir)
