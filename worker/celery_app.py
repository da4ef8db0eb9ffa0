"""The Celery application of the worker (``celery -A worker.celery_app worker``).

Configured on purpose; every non-default setting says why. The gateway does not import this
module: it sends tasks by name (``service.queue``). What a worker process runs is
``SCSNET_WORKER_QUEUES`` (``scsnet worker --queues``): ``analyses`` (:mod:`worker.tasks`, the
science stack), ``deliveries`` (:mod:`worker.deliveries`: webhooks and DICOMweb; the science stack
is not even imported, no model is loaded and no heartbeat is sent), or ``all``.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import redis.exceptions
import sqlalchemy.exc
from celery import Celery
from celery.signals import (
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

from service.errors import SchemaOutdated
from service.privacy import secure_service
from service.queue import ANALYZE_TASK, DICOMWEB_TASK, WEBHOOK_TASK
from service.storage import Storage
from service.store import Store
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)
settings = WorkerSettings()
TRANSIENT = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, redis.exceptions.ConnectionError)
"""Faults of the job store or the broker that a task is retried for (not the receiver's faults)."""
RUNS_ANALYSES = settings.worker_queues in ("analyses", "all")
TASK_MODULES = {"analyses": ["worker.tasks"], "deliveries": ["worker.deliveries"], "all": ["worker.tasks", "worker.deliveries"]}

celery_app = Celery("scsnet", include=TASK_MODULES[settings.worker_queues])
celery_app.conf.update(
    broker_url=settings.broker_url,
    # The job record in our store is the truth; Celery results would be a second, stale copy.
    task_ignore_result=True,
    result_backend=None,
    # Analyses and deliveries have a queue each (named so that several deployments can share a
    # Redis): a receiver that answers slowly holds a delivery worker, never an analysis.
    task_default_queue=settings.queue_name,
    task_routes={
        ANALYZE_TASK: {"queue": settings.queue_name},
        WEBHOOK_TASK: {"queue": settings.deliveries_queue},
        DICOMWEB_TASK: {"queue": settings.deliveries_queue},
    },
    # Acknowledge after the task ran, so a worker that dies mid-analysis leaves the message to
    # be redelivered (the task is idempotent: outputs are renamed into place at the end).
    task_acks_late=True,
    # ... and a pool child killed by the OOM killer or a signal also gets its message requeued.
    task_reject_on_worker_lost=True,
    # One analysis takes seconds to minutes and a lot of memory: take one message at a time so
    # queued jobs wait in the broker, where another worker can take them.
    worker_prefetch_multiplier=1,
    # Bound every analysis: the soft limit raises inside the task (recorded as a failed job),
    # the hard limit kills a stuck process.
    task_soft_time_limit=settings.soft_time_limit_s,
    task_time_limit=settings.time_limit_s,
    # With acks_late, Redis redelivers an unacknowledged message after the visibility timeout:
    # it must exceed the hard time limit, or a long analysis would run twice (checked in the
    # settings). kombu looks for such messages only every 10 x 10 s by default; sweeping every
    # tenth of the timeout (at most a minute) gives a dead worker's job to a live one soon after.
    broker_transport_options={
        "visibility_timeout": settings.redelivery_after_s,
        "unacked_restore_interval": max(1, min(60, settings.redelivery_after_s // 10)),
        "unacked_restore_throttle": 1,
    },
    # If the broker connection drops mid-task, the message is redelivered anyway; stop the
    # late-acked task instead of finishing work nobody can acknowledge.
    worker_cancel_long_running_tasks_on_connection_loss=True,
    # Keep retrying the broker at start-up (the embedded Redis may still be starting).
    broker_connection_retry_on_startup=True,
    # JSON only: tasks carry a job id and a token, never pickled objects.
    task_serializer="json",
    accept_content=["json"],
    # Task events are not used (metrics come from the store), so do not send them.
    worker_send_task_events=False,
)


@functools.cache
def services() -> tuple[Store, Storage]:
    """This process's job store and storage (created on first use, after any fork)."""
    return Store(settings.store_url), Storage(settings.data_root)


def model_dir() -> str:
    """The model folder this worker serves (``SCSNET_MODEL_DIR``, default the shipped model)."""
    return str(settings.model_dir)


def _model_info() -> dict[str, Any]:
    """The manifest of the model this worker serves, or the problem loading it."""
    from core.errors import ScsnetError
    from core.segment.manifest import load_manifest

    try:
        manifest, _ = load_manifest(Path(model_dir()))
    except ScsnetError as exc:
        return {"model_problem": exc.problem()}
    return {"model": manifest.model_dump(mode="json")}


_stop = threading.Event()

# The main process forks pool processes (at start, and to replace one that died) while its
# heartbeat thread writes to the job store. A child forked during such a write inherits SQLite's
# in-process lock bookkeeping, with a write lock no one in the child will ever release: every
# write there is then "database is locked", for good. Any inherited connection is unsafe anyway
# (SQLite, psycopg). So the heartbeat keeps no connection between beats, and a fork waits for a
# beat in progress.
_fork_guard = threading.Lock()
os.register_at_fork(before=_fork_guard.acquire, after_in_parent=_fork_guard.release, after_in_child=_fork_guard.release)


def _heartbeat(hostname: str) -> None:
    info = _model_info()
    store: Store | None = None
    while not _stop.is_set():
        with _fork_guard:
            try:
                store = store or Store(settings.store_url)
                store.beat(hostname, info)
            except Exception as exc:  # noqa: BLE001 - the store may be briefly unreachable; beat again later
                log.warning("heartbeat failed: %s", type(exc).__name__)
            finally:
                if store is not None:
                    store.engine.dispose()  # no open connection for a fork to inherit
        _stop.wait(settings.heartbeat_s)


@worker_init.connect
def _secure(**_: Any) -> None:
    """Owner-only files (umask 077, data dir 0700) also when celery is started directly, set in
    the main process before it forks the pool (not at import: importing must not touch disk)."""
    secure_service(settings.data_root)


@worker_init.connect
def _check_store(**_: Any) -> None:
    """Refuse to start, in one line and with status 2, on a job store whose schema is not this
    scsnet's (an empty store gets its schema here, before any pool process exists)."""
    try:
        Store(settings.store_url).engine.dispose()
    except SchemaOutdated as exc:
        print(f"scsnet: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    if not RUNS_ANALYSES:  # /readyz counts the workers that can run an analysis
        return
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    threading.Thread(target=_heartbeat, args=(hostname,), name="scsnet-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    _stop.set()


@worker_process_init.connect
def _warm_up(**_: Any) -> None:
    """Create the ONNX session once per pool process, before the first job arrives."""
    services.cache_clear()  # never share the parent's database connections across a fork
    if not RUNS_ANALYSES:
        return
    from core.errors import ScsnetError
    from core.segment.runtime import load_segmenter

    try:
        load_segmenter(model_dir(), settings.onnx_threads)
    except ScsnetError as exc:  # jobs will fail with the same problem; the worker stays up
        log.error("model unavailable: %s", exc.detail)
