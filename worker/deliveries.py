"""The delivery tasks: a job's webhook, and its DICOM results stored in the tenant's DICOMweb
destination (STOW-RS). They run on their own queue (``<queue_name>-deliveries``) in their own
worker, so one tenant's slow receiver never delays another tenant's analysis; this module imports
no science (a deliveries-only worker loads neither the model nor ONNX Runtime).

Both send with :func:`service.outbound.post`: the destination is checked again at delivery time
(a name that turned private is refused), the checked address is the one connected to, no
redirect is followed, the answer is read only so far, and each attempt ends at
``SCSNET_DELIVERY_DEADLINE_S`` in total.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

from celery import Task

from core.outputs import DICOM_RESULTS
from service import outbound, webhooks
from service.queue import DICOMWEB_TASK, WEBHOOK_TASK
from service.store import utcnow
from worker.celery_app import TRANSIENT, celery_app, services, settings

log = logging.getLogger(__name__)
FAILED_SOP_SEQUENCE = "00081198"
"""DICOM JSON tag of Failed SOP Sequence in a STOW-RS answer (PS3.18 10.5.3)."""


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
    number, at = self.request.retries + 1, utcnow().isoformat()
    outcome = outbound.post(
        job.callback_url,
        content=body,
        headers=headers,
        allow_private=settings.allow_private_networks,
        deadline_s=settings.delivery_deadline_s,
    )
    retry = not outcome.delivered and self.request.retries < settings.webhook_max_retries
    if not outcome.delivered:  # the detail is the operator's: a tenant could probe ports with it
        log.warning("webhook of job %s, attempt %d, not delivered: %s", job_id, number, outcome.detail)
    # the tenant sees only whether it arrived: no status code, no kind of error
    store.add_delivery(job_id, {"attempt": number, "at": at, "delivered": outcome.delivered, "gave_up": not outcome.delivered and not retry})
    if retry:
        raise self.retry(countdown=settings.webhook_backoff_s * 2**self.request.retries)


@celery_app.task(name=DICOMWEB_TASK, bind=True, autoretry_for=TRANSIENT, max_retries=settings.destination_max_retries)
def deliver_dicomweb(self: Task, job_id: str, run: str) -> None:  # type: ignore[type-arg]
    """Store the job's SEG, SR and SC in its tenant's DICOMweb destination (one STOW-RS request);
    retried with backoff, then the delivery is failed (the job stays succeeded).

    The request goes through :func:`service.outbound.post`, not dicomweb-client's ``requests``
    session: that session resolves the host again on connecting (so it cannot pin the address
    that was checked) and its timeouts are per read, not a bound on the whole attempt.
    """
    store, storage = services()
    job = store.get(job_id)
    if job is None or not job.delivery or job.delivery.get("run") != run:
        return  # deleted, or delivered again since (POST /v1/jobs/{id}/deliver): that run reports
    destination = store.destination(job.tenant_id)
    files = [storage.out_dir(job_id) / output.filename for output in DICOM_RESULTS]
    final = self.request.retries >= settings.destination_max_retries
    if destination is None:
        delivered, error, final = False, "the tenant has no DICOMweb destination any more", True
    elif not all(path.is_file() for path in files):
        delivered, error, final = False, "the job's DICOM results have been deleted", True
    else:
        body, content_type = stow_body(files)
        headers = {**destination.headers, "Content-Type": content_type, "Accept": "application/dicom+json"}
        outcome = outbound.post(
            stow_url(destination.url),
            content=body,
            headers=headers,
            allow_private=settings.allow_private_networks,
            deadline_s=settings.delivery_deadline_s,
        )
        delivered, error = judge_stow(outcome, deadline_s=settings.delivery_deadline_s, instances=len(files))
    if not delivered:
        log.warning("DICOMweb delivery of job %s, attempt %d, failed: %s", job_id, self.request.retries + 1, error)
    if not store.record_delivery_attempt(job_id, run=run, delivered=delivered, error=error, last=delivered or final):
        return  # a newer run took over meanwhile
    if not delivered and not final:
        raise self.retry(countdown=settings.destination_backoff_s * 2**self.request.retries)


def stow_url(root: str) -> str:
    """The STOW-RS endpoint under a DICOMweb root (``https://pacs.example/dicom-web``)."""
    return root.rstrip("/") + "/studies"


def stow_body(files: list[Path]) -> tuple[bytes, str]:
    """One ``multipart/related; type="application/dicom"`` body holding ``files`` (Part 10),
    and its Content-Type (PS3.18 10.5.1.1)."""
    boundary = f"scsnet-{uuid.uuid4().hex}"
    parts = [b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes() + b"\r\n" for path in files]
    body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def judge_stow(outcome: outbound.Outcome, *, deadline_s: float, instances: int) -> tuple[bool, str | None]:
    """(delivered, last error) of a STOW-RS attempt: 200, or 202 with an empty Failed SOP
    Sequence (stored, with warnings), is delivered. The error is shown to the tenant: it may be
    specific, since the destination is the operator's choice, not the tenant's."""
    if outcome.status_code is None:
        detail = outcome.detail
        if detail.startswith("refused"):
            return False, "the destination is not allowed (" + detail.removeprefix("refused: ") + ")"
        if detail.startswith(("no complete answer", "deadline")):
            return False, f"no answer within {deadline_s:g} s"
        if detail in ("ConnectError", "ConnectTimeout"):
            return False, "could not connect"
        return False, f"the connection failed ({detail})"
    if outcome.status_code not in (200, 202):
        return False, f"the destination answered HTTP {outcome.status_code}"
    failed = _failed_instances(outcome.body)
    if failed is None and outcome.status_code == 202:
        return False, "the destination answered HTTP 202 with an answer that cannot be read"
    if failed:
        return False, f"the destination refused {failed} of {instances} instances (HTTP {outcome.status_code})"
    return True, None


def _failed_instances(body: bytes) -> int | None:
    """How many instances a STOW-RS answer (DICOM JSON) lists as failed; None if unreadable."""
    try:
        answer: Any = json.loads(body) if body.strip() else {}
    except ValueError:
        return None
    if isinstance(answer, list):  # some servers answer a list of one dataset
        answer = answer[0] if answer else {}
    if not isinstance(answer, dict):
        return None
    failed = answer.get(FAILED_SOP_SEQUENCE) or {}
    return len(failed.get("Value") or []) if isinstance(failed, dict) else None
