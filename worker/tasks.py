"""The worker's analysis task: run one job. A thin adapter: the job record is loaded and
updated through ``service.store``; the science is ``core.pipeline``. Its webhook and DICOMweb
delivery are sent by name to the deliveries queue (:mod:`worker.deliveries`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from core import pipeline
from core.errors import ScsnetError
from core.outputs import DICOM_RESULTS, REPORT, describe_outputs
from core.segment.runtime import load_segmenter
from core.staging import discard_staging
from service.errors import AnalysisTimedOut, InternalError, storage_error
from service.queue import ANALYZE_TASK, DICOMWEB_TASK, WEBHOOK_TASK
from service.storage import Storage
from service.store import JobState, Store
from worker.celery_app import TRANSIENT, celery_app, model_dir, services, settings

log = logging.getLogger(__name__)


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
    if state == JobState.succeeded:
        _after_success(store, storage.out_dir(job_id), job_id=job_id, tenant_id=job.tenant_id, artifacts=artifacts or {})
    if state == JobState.succeeded and not settings.keep_inputs:
        storage.remove_inputs(job_id)  # SCSNET_KEEP_INPUTS=false: the record keeps their digests
    if job.callback_url:
        celery_app.send_task(WEBHOOK_TASK, args=[job_id], queue=settings.deliveries_queue)


def _after_success(store: Store, out: Path, *, job_id: str, tenant_id: int, artifacts: dict[str, Any]) -> None:
    """Record the study a DICOM job analysed, and send its DICOM results to the tenant's
    DICOMweb destination if it has one (a failed delivery never fails the job)."""
    study_uid = _study_uid(out / REPORT.filename)
    if study_uid:
        store.record_study_uid(job_id, study_uid)
    if not all(output.key in artifacts for output in DICOM_RESULTS) or store.destination(tenant_id) is None:
        return
    run = store.start_delivery(job_id)
    if run is not None:
        celery_app.send_task(DICOMWEB_TASK, args=[job_id, run], queue=settings.deliveries_queue)


def _study_uid(report: Path) -> str | None:
    try:
        uid = json.loads(report.read_text())["input"].get("study_instance_uid")
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return uid if isinstance(uid, str) and uid else None


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
