"""Retention: deleting the files of jobs that ended long enough ago, and retiring webhook
secrets past their grace period. Run by the gateway's housekeeping loop (``app.main``).

A job's files are its folder (``jobs/<id>``: inputs and outputs); they go ``retention_days``
after the job ended, whatever its end (succeeded, failed, cancelled). The job record stays, with
``files_deleted_at`` set: its state, problem, input digests and artifact digests remain
readable, and downloads answer 410 Gone. Afterwards the SQLite write-ahead log is checkpointed,
so nothing retired lingers in it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from service.storage import Storage
from service.store import Job, Store, aware, utcnow

BATCH = 100
"""Jobs handled per store round trip: a backlog (retention switched on over years of jobs) is
worked through in steps, each recorded before the next."""


def files_expire_at(job: Job, retention_days: float | None) -> datetime | None:
    """When the job's files are due for deletion; None if they are kept (no retention, the job
    has not ended) or are already gone."""
    finished = aware(job.finished_at)
    if retention_days is None or finished is None or job.files_deleted_at is not None:
        return None
    return finished + timedelta(days=retention_days)


def purge_expired(
    store: Store, storage: Storage, retention_days: float | None, *, now: datetime | None = None, batch: int = BATCH
) -> list[str]:
    """Delete the folders of jobs that ended more than ``retention_days`` before ``now``, record
    it in their records, retire expired webhook secrets; returns the ids of the jobs purged."""
    now = now or utcnow()
    purged: list[str] = []
    if retention_days is not None:
        cutoff = now - timedelta(days=retention_days)
        while True:
            due = store.files_due(ended_before=cutoff, limit=batch)
            for job_id in due:
                storage.delete(job_id)
            # a folder that could not be deleted (permissions) is not recorded as gone: the
            # next pass tries again
            gone = [job_id for job_id in due if not storage.job_dir(job_id).exists()]
            if gone:
                store.mark_files_deleted(gone)
                purged.extend(gone)
            if len(due) < batch or not gone:
                break
    retired = store.retire_expired_secrets(now=now)
    if purged or retired:
        store.checkpoint()
    return purged
