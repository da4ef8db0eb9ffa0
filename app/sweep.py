"""Removing job folders that no job record owns.

The gateway writes an upload into ``jobs/<id>/input`` before it stores the job, and removes the
folder itself when the request fails; a gateway killed mid-upload (SIGKILL, power loss) cannot,
and leaves a folder no one will ever read. One untouched for ``orphan_grace_s`` (far longer than
any upload in progress, which keeps writing, even on another gateway sharing the data dir) and
with no job in the store is removed.
"""

from __future__ import annotations

import logging

from service.storage import Storage
from service.store import Store

log = logging.getLogger(__name__)


def sweep_orphans(store: Store, storage: Storage, *, grace_s: float) -> list[str]:
    """Remove and return the ids of job folders with no job record, untouched for ``grace_s``.

    The store is asked first, so only folders without a job (a handful) are walked for their
    modification times, never the many that belong to jobs.
    """
    present = storage.job_ids()
    unowned = set(present) - store.existing(present) if present else set()
    orphans = sorted(job_id for job_id in unowned if storage.idle_s(job_id) > grace_s)
    for job_id in orphans:
        storage.delete(job_id)
    if orphans:
        log.warning("removed %d job folder(s) without a job (uploads cut off mid-way): %s", len(orphans), ", ".join(orphans))
    return orphans
