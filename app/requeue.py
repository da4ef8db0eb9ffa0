"""Re-sending jobs the broker has lost (a Redis restart without persistence, a crash between
storing the job and sending its message). The store is the truth: a job it holds as queued must
have a message in the broker, or it gets a new one with a new dispatch token. So must a running
job: its message stays in the broker, unacknowledged, until the run ends (``acks_late``); one
that is gone means the run is gone too (a worker cancels its running job when it loses Redis),
and the job goes back to the queue with a new token, which also fences off the old run."""

from __future__ import annotations

import logging

from service.queue import JobQueue
from service.store import Store

log = logging.getLogger(__name__)


def dispatch(store: Store, queue: JobQueue, job_id: str) -> bool:
    """Give a queued job a fresh token and send it; False if it is no longer queued."""
    token = store.new_dispatch(job_id)
    if token is None:
        return False
    queue.send_analysis(job_id, token)
    return True


def requeue_lost(store: Store, queue: JobQueue, *, grace_s: float) -> list[str]:
    """Re-send every job queued, or running, for longer than ``grace_s`` that has no message
    in the broker."""
    stale = store.stale_queued(older_than_s=grace_s)
    running = store.stale_running(older_than_s=grace_s)
    if not stale and not running:
        return []
    present = queue.job_ids_in_broker()
    resent = [job_id for job_id in stale if job_id not in present and dispatch(store, queue, job_id)]
    if resent:
        log.warning("re-sent %d queued job(s) the broker did not hold: %s", len(resent), ", ".join(resent))
    orphans = []
    for job_id, token in running:
        fresh = store.requeue_running(job_id, token) if job_id not in present else None
        if fresh is not None:
            queue.send_analysis(job_id, fresh)
            orphans.append(job_id)
    if orphans:
        log.warning("re-sent %d running job(s) whose message the broker lost: %s", len(orphans), ", ".join(orphans))
    return resent + orphans
