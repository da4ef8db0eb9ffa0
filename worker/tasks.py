"""The worker's tasks: run one analysis job, deliver one webhook. Thin adapters: the job
record is loaded and updated through ``service.store``; the science is ``core.pipeline``."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import redis.exceptions
import sqlalchemy.exc
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from core import pipeline
from core.errors import ScsnetError
from core.outputs import describe_outputs
from core.segment.runtime import load_segmenter
from core.staging import discard_staging
from service import webhooks
from service.errors import AnalysisTimedOut, InternalError, storage_error
from service.queue import ANALYZE_TASK, WEBHOOK_TASK
from service.storage import Storage
from service.store import JobState, Store, utcnow
from worker.celery_app import celery_app, model_dir, services, settings

log = logging.getLogger(__name__)
TRANSIENT = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, redis.exceptions.ConnectionError)


class JobCancelled(Exception):
    """The job record says cancelled (or re-sent to another run): stop at the next stage."""


@celery_app.task(name=ANALYZE_TASK, autoretry_for=TRANSIENT, retry_backoff=2, retry_backoff_max=60, max_retries=5)
def analyze(job_id: str, token: str) -> None:
    """Run the analysis of ``job_id``; its outcome lands in the job record."""
    store, storage = services()
    job = store.claim(job_id, token)
    if job is None:  # finished, cancelled, deleted, or a stale duplicate message
        return

    def progress(stage: str, fraction: float) -> None:
        overall = (pipeline.STAGES.index(stage) + fraction) / len(pipeline.STAGES)
        if not store.set_progress(job_id, stage=stage, progress=overall, token=token):
            raise JobCancelled(job_id)

    paths, bval, bvec = storage.input_paths(job_id, job.inputs)
    state, problem, artifacts = JobState.succeeded, None, None
    try:
        out = storage.out_dir(job_id)
        discard_staging(out)  # what an earlier run of this job, killed mid-way, left
        segmenter = load_segmenter(model_dir(), settings.onnx_threads)
        pipeline.analyze(
            paths, out_dir=out, segmenter=segmenter, bval=bval, bvec=bvec, limits=settings.upload_limits, progress=progress
        )
        artifacts = describe_outputs(out)
    except JobCancelled:
        _drop_outputs_if_cancelled(store, storage, job_id)
        return
    except ScsnetError as exc:
        state, problem = JobState.failed, exc.problem()
    except SoftTimeLimitExceeded:
        state, problem = JobState.failed, AnalysisTimedOut(f"the analysis did not finish within {settings.soft_time_limit_s} s").problem()
    except TRANSIENT:
        raise
    except Exception as exc:  # noqa: BLE001 - a storage fault or a bug, told apart and logged below
        if _cancelled(store, job_id):  # the cancel deleted the inputs under the running analysis
            _drop_outputs_if_cancelled(store, storage, job_id)
            return
        state, problem = JobState.failed, _unexpected_problem(job_id, exc)
    if not store.finish(job_id, state, problem=problem, artifacts=artifacts, token=token):
        _drop_outputs_if_cancelled(store, storage, job_id)  # cancelled while finishing
        return
    if state == JobState.succeeded and not settings.keep_inputs:
        storage.remove_inputs(job_id)  # SCSNET_KEEP_INPUTS=false: the record keeps their digests
    if job.callback_url:
        deliver_webhook.delay(job_id)


def _unexpected_problem(job_id: str, exc: Exception) -> dict[str, Any]:
    """A full, read-only or failing disk is the operator's to fix (``storage-unavailable``,
    503); anything else is a bug, logged with its traceback."""
    storage = storage_error(exc)
    if storage is not None:
        log.error("job %s failed on a storage fault: %s", job_id, exc)
        return storage.problem()
    log.exception("job %s crashed", job_id)
    return InternalError("the analysis failed unexpectedly; the error has been logged").problem()


def _cancelled(store: Store, job_id: str) -> bool:
    current = store.get(job_id)
    return current is None or current.state == JobState.cancelled


def _drop_outputs_if_cancelled(store: Store, storage: Storage, job_id: str) -> None:
    # A job re-sent to another run keeps its folder: that run writes (or wrote) the outputs.
    # A cancelled one keeps neither outputs nor inputs (the gateway deleted those already,
    # unless the worker was still writing into the folder).
    if _cancelled(store, job_id):
        storage.remove_outputs(job_id)
        storage.remove_inputs(job_id)


@celery_app.task(name=WEBHOOK_TASK, bind=True, autoretry_for=TRANSIENT, max_retries=settings.webhook_max_retries)
def deliver_webhook(self: Task, job_id: str) -> None:  # type: ignore[type-arg]
    """POST the job's terminal state to its callback URL, signed; retried with backoff."""
    store, _ = services()
    job = store.get(job_id)
    tenant = store.tenant(job.tenant_id) if job is not None else None
    if job is None or tenant is None or not job.callback_url:
        return
    body = webhooks.payload(
        job_id=job.id, state=job.state, artifacts=job.artifacts, problem=job.problem, base_url=settings.public_url
    )
    headers = {"Content-Type": "application/json", webhooks.SIGNATURE_HEADER: webhooks.sign(tenant.signing_secrets(), body)}
    attempt: dict[str, Any] = {"attempt": self.request.retries + 1, "at": utcnow().isoformat(), "delivered": False}
    try:
        response = httpx.post(job.callback_url, content=body, headers=headers, timeout=settings.webhook_timeout_s)
        attempt.update(status_code=response.status_code, delivered=response.is_success)
    except httpx.HTTPError as exc:
        attempt["error"] = type(exc).__name__
    retry = not attempt["delivered"] and self.request.retries < settings.webhook_max_retries
    attempt["gave_up"] = not attempt["delivered"] and not retry
    store.add_delivery(job_id, attempt)
    if retry:
        raise self.retry(countdown=settings.webhook_backoff_s * 2**self.request.retries)
