"""``/v1/jobs``: submit a study, follow it, list, review, cancel or delete."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import uuid
from datetime import timedelta
from typing import Annotated
from urllib.parse import urlsplit

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials

from app.deps import (
    BearerDep,
    CursorsDep,
    QueueDep,
    SettingsDep,
    StorageDep,
    StoreDep,
    TenantDep,
    ThrottleDep,
    client_address,
    tenant_of,
)
from app.intake import arrange
from app.problems import problem_responses
from app.requeue import dispatch
from app.schemas import JobOut, JobPage, ReviewFilter, ReviewIn, etag, job_out
from app.settings import GatewaySettings
from app.throttle import AuthThrottle
from app.uploads import Form, receive_form
from core.outputs import DICOM_RESULTS
from service.errors import (
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    InvalidCallbackUrl,
    JobNotFinished,
    NotFound,
    NothingToDeliver,
    NotReady,
    Unauthorized,
)
from service.outbound import UnsafeDestination, check_destination
from service.queue import JobQueue
from service.storage import Storage
from service.store import (
    TERMINAL,
    Job,
    JobState,
    Store,
    Tenant,
    aware,
    key_id_of,
    utcnow,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "format": "binary"},
                            "description": "DICOM files, zips of DICOM, or one NIfTI (.nii/.nii.gz)",
                        },
                        "bval": {"type": "string", "format": "binary", "description": "FSL b-values (NIfTI only)"},
                        "bvec": {"type": "string", "format": "binary", "description": "FSL b-vectors (NIfTI only)"},
                        "callback_url": {"type": "string", "format": "uri", "description": "POSTed on a terminal state"},
                    },
                }
            }
        },
    }
}


def _load(store: Store, tenant: Tenant, job_id: str) -> Job:
    job = store.get(job_id, tenant_id=tenant.id) if _JOB_ID.match(job_id) else None
    if job is None:  # another tenant's job is "not found" too, never "forbidden"
        raise NotFound(f"there is no job {job_id}")
    return job


def owned_job(job_id: str, tenant: TenantDep, store: StoreDep) -> Job:
    """The path's job if the caller's tenant owns it; resolved as a dependency, so another
    tenant's job is 404 before the request body is even judged (no 422 telling it apart)."""
    return _load(store, tenant, job_id)


OwnedJobDep = Annotated[Job, Depends(owned_job)]


_HOST_MAX = 253  # RFC 1035: a domain name is at most 253 characters written out
_URL_MAX = 2048  # the job record's column


def _check_callback(url: str | None, settings: GatewaySettings) -> str | None:
    """The callback URL if the service can and may POST to it; :class:`InvalidCallbackUrl`
    otherwise, whose detail never repeats the URL (it may carry secrets)."""
    if not url:
        return None
    schemes = {"https", "http"} if settings.allow_http_callbacks else {"https"}
    wanted = f"callback_url must be an absolute {' or '.join(sorted(schemes))} URL"
    if len(url) > _URL_MAX or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidCallbackUrl(f"{wanted} of at most {_URL_MAX} characters, with no spaces or control characters")
    try:
        parts = urlsplit(url)
        host, _port = parts.hostname, parts.port  # .port raises on a port that is not a number in range
    except ValueError as exc:  # a bracket left open, a bad port
        raise InvalidCallbackUrl(f"{wanted}; this one cannot be parsed") from exc
    if parts.scheme not in schemes or not host:
        raise InvalidCallbackUrl(wanted)
    if len(host) > _HOST_MAX:
        raise InvalidCallbackUrl(f"{wanted}; its host name is longer than {_HOST_MAX} characters")
    if parts.username is not None or parts.password is not None:
        raise InvalidCallbackUrl(f"{wanted} without credentials (user:password@); webhooks are signed instead")
    return url


async def _check_callback_network(url: str | None, settings: GatewaySettings) -> None:
    """Refuse (:class:`InvalidCallbackUrl`) a callback URL whose host is or resolves to a
    loopback, private, link-local or multicast address, unless the operator allows private
    networks; the worker checks again when it delivers (the name may resolve differently then).
    The detail repeats neither the URL nor the addresses."""
    if not url or settings.allow_private_networks:
        return
    try:  # the DNS lookup blocks: off the event loop
        await anyio.to_thread.run_sync(lambda: check_destination(url, allow_private=False))
    except UnsafeDestination as exc:
        raise InvalidCallbackUrl(f"callback_url is not allowed: {exc.detail}") from None


def _accepted(view: JobOut, settings: GatewaySettings, *, replayed: bool) -> JSONResponse:
    headers = {"Location": view.links["self"], "Retry-After": str(settings.retry_after_s)}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(view.model_dump(mode="json"), status_code=202, headers=headers)


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    openapi_extra=UPLOAD_BODY,
    responses=problem_responses(400, 401, 409, 413, 415, 422),
)
async def create_job(
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    store: StoreDep,
    storage: StorageDep,
    queue: QueueDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JSONResponse:
    """Submit a study (multipart: files, bval, bvec, callback_url); answered 202 at once."""
    if not idempotency_key:
        return await _create(request, tenant, settings, store, storage, queue, idempotency_key=None)
    in_flight: set[tuple[int, str]] = request.app.state.idempotency_in_flight
    slot = (tenant.id, idempotency_key)
    if slot in in_flight:  # this gateway is still receiving the first request with the key
        raise IdempotencyKeyInUse("a request with this Idempotency-Key is still being received; retry once it is answered")
    in_flight.add(slot)
    try:
        return await _create(request, tenant, settings, store, storage, queue, idempotency_key=idempotency_key)
    finally:
        in_flight.discard(slot)


def request_digest(form: Form) -> str:
    """SHA-256 of what a submission asks for: each file part's field, digest and size (sorted),
    and the text fields; two requests with one Idempotency-Key must have the same."""
    parts = sorted((p.field, p.sha256, p.size) for p in form.parts)
    canonical = json.dumps({"parts": parts, "fields": sorted(form.fields.items())}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _same_request(job: Job, digest: str) -> bool:
    # a job stored before digests were kept cannot be told apart: replay it, as before
    return job.inputs.get("request_sha256", digest) == digest


def _replay(job: Job, digest: str) -> None:
    if not _same_request(job, digest):
        raise IdempotencyKeyReused(
            "this Idempotency-Key was already used for a different request (other files or fields); use a new key"
        )


def _live_job_with_key(store: Store, tenant: Tenant, key: str, window_s: float) -> Job | None:
    """The tenant's job created with ``key`` within the replay window; an older one loses its
    key (the draft's expiry: the key may then start a new job)."""
    job = store.find_by_idempotency_key(tenant.id, key)
    created = aware(job.created_at) if job is not None else None
    if job is not None and created is not None and utcnow() - created > timedelta(seconds=window_s):
        store.forget_idempotency_key(job.id)
        return None
    return job


async def _create(
    request: Request,
    tenant: Tenant,
    settings: GatewaySettings,
    store: Store,
    storage: Storage,
    queue: JobQueue,
    *,
    idempotency_key: str | None,
) -> JSONResponse:
    job_id = uuid.uuid4().hex
    dest = storage.input_dir(job_id)
    dest.mkdir(parents=True)
    try:
        form = await receive_form(
            request.stream(),
            content_type=request.headers.get("content-type"),
            content_length=request.headers.get("content-length"),
            dest=dest,
            max_bytes=settings.max_upload_bytes,
        )
        digest = request_digest(form)
        if idempotency_key:
            existing = await anyio.to_thread.run_sync(
                _live_job_with_key, store, tenant, idempotency_key, settings.idempotency_window_s
            )
            if existing is not None:
                _replay(existing, digest)
                shutil.rmtree(storage.job_dir(job_id), ignore_errors=True)
                view = await anyio.to_thread.run_sync(lambda: job_out(existing, store, retention_days=settings.retention_days))
                return _accepted(view, settings, replayed=True)
        callback_url = _check_callback(form.fields.get("callback_url"), settings)
        await _check_callback_network(callback_url, settings)
        inputs = await anyio.to_thread.run_sync(lambda: arrange(form, dest=dest, limits=settings.upload_limits))
        inputs["request_sha256"] = digest
        record = Job(id=job_id, tenant_id=tenant.id, idempotency_key=idempotency_key, callback_url=callback_url, inputs=inputs)
        job, created = await anyio.to_thread.run_sync(store.create_job, record)
        if not created:  # another gateway with the same idempotency key won
            _replay(job, digest)
    except BaseException:
        shutil.rmtree(storage.job_dir(job_id), ignore_errors=True)
        raise
    if not created:
        shutil.rmtree(storage.job_dir(job_id), ignore_errors=True)
    else:
        try:
            await anyio.to_thread.run_sync(dispatch, store, queue, job.id)
        except Exception as exc:  # noqa: BLE001 - the job is stored: the re-enqueue loop will send it
            log.warning("job %s stored but not sent to the broker (%s); it will be re-sent", job.id, type(exc).__name__)
    view = await anyio.to_thread.run_sync(lambda: job_out(job, store, retention_days=settings.retention_days))
    return _accepted(view, settings, replayed=not created)


@router.get("", response_model=JobPage, responses=problem_responses(400, 401, 422))
def list_jobs(
    tenant: TenantDep,
    store: StoreDep,
    cursors: CursorsDep,
    settings: SettingsDep,
    state: JobState | None = None,
    review: ReviewFilter | None = None,
    study_uid: Annotated[
        str | None, Query(max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$", description="Study Instance UID")
    ] = None,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobPage:
    """The tenant's jobs, newest first, optionally of one state, latest review verdict (or none) and DICOM study."""
    before = cursors.read(tenant.id, cursor) if cursor else None
    jobs = store.list_jobs(
        tenant.id, state=state.value if state else None, review=review, study_uid=study_uid, before_seq=before, limit=limit + 1
    )
    page, more = jobs[:limit], len(jobs) > limit
    next_cursor = cursors.make(tenant.id, page[-1].seq) if more else None
    links = {}
    if next_cursor:
        links["next"] = (
            f"/v1/jobs?limit={limit}&cursor={next_cursor}"
            + (f"&state={state.value}" if state else "")
            + (f"&review={review}" if review else "")
            + (f"&study_uid={study_uid}" if study_uid else "")
        )
    reviews = store.reviews_of([j.id for j in page if j.state == JobState.succeeded])  # one query for the page
    items = [job_out(j, store, reviews=reviews.get(j.id, []), retention_days=settings.retention_days) for j in page]
    return JobPage(items=items, next_cursor=next_cursor, links=links)


def _view(
    store: Store,
    credentials: HTTPAuthorizationCredentials | None,
    job_id: str,
    throttle: AuthThrottle,
    address: str,
    retention_days: float | None,
) -> tuple[Job, JobOut]:
    job = _load(store, tenant_of(store, credentials, throttle=throttle, address=address), job_id)
    return job, job_out(job, store, retention_days=retention_days)


@router.get("/{job_id}", response_model=JobOut, responses={304: {"description": "not modified"}, **problem_responses(401, 404)})
async def get_job(
    request: Request,
    job_id: str,
    credentials: BearerDep,
    store: StoreDep,
    settings: SettingsDep,
    throttle: ThrottleDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """A job's state, stage, progress, queue position, problem and links (ETag for polling)."""
    # The hot path of polling clients: authentication and every store read in one trip to the
    # thread pool (TenantDep would add a second one).
    job, view = await anyio.to_thread.run_sync(
        _view, store, credentials, job_id, throttle, client_address(request), settings.retention_days
    )
    tag = etag(view, job.version)
    headers = {"ETag": tag}  # Cache-Control: no-store comes from app.middleware
    if job.state not in TERMINAL:
        headers["Retry-After"] = str(settings.retry_after_s)
    if if_none_match and (if_none_match.strip() == "*" or tag in [t.strip() for t in if_none_match.split(",")]):
        return Response(status_code=304, headers=headers)
    return JSONResponse(view.model_dump(mode="json"), headers=headers)


@router.put(
    "/{job_id}/review",
    response_model=JobOut,
    responses=problem_responses(400, 401, 404, 409, 422),
)
def review_job(
    job_id: str, job: OwnedJobDep, body: ReviewIn, credentials: BearerDep, store: StoreDep, settings: SettingsDep
) -> JSONResponse:
    """Record a verdict on a succeeded job (the latest wins, all are kept); 200 with the job view and its new ETag."""
    if job.state != JobState.succeeded:
        raise JobNotFinished(f"job {job_id} is {job.state}; only a succeeded job can be reviewed")
    key_id = key_id_of(credentials.credentials.strip()) if credentials else None
    if key_id is None:  # authentication succeeded, so the key is well formed: never here
        raise Unauthorized("the API key is malformed")
    if store.add_review(job.id, verdict=body.verdict, note=body.note, key_id=key_id) is None:
        raise NotFound(f"there is no job {job_id}")  # deleted meanwhile
    reviewed = store.get(job.id) or job
    view = job_out(reviewed, store, retention_days=settings.retention_days)
    return JSONResponse(view.model_dump(mode="json"), headers={"ETag": etag(view, reviewed.version)})


@router.post("/{job_id}/deliver", status_code=202, response_model=JobOut, responses=problem_responses(401, 404, 409, 503))
def deliver_job(job_id: str, job: OwnedJobDep, store: StoreDep, queue: QueueDep, settings: SettingsDep) -> JSONResponse:
    """Store a succeeded DICOM job's SEG, SR and SC in the tenant's DICOMweb destination (again); 202 with the job view."""
    if job.state != JobState.succeeded:
        raise NothingToDeliver(f"job {job_id} is {job.state}; only a succeeded job's results can be delivered")
    if job.files_deleted_at is not None or not all(output.key in job.artifacts for output in DICOM_RESULTS):
        raise NothingToDeliver(f"job {job_id} has no DICOM results to deliver (not a DICOM study, or its files were deleted)")
    if store.destination(job.tenant_id) is None:
        raise NothingToDeliver("your tenant has no DICOMweb destination (the operator sets one: scsnet destination set)")
    run = store.start_delivery(job.id)
    if run is None:
        raise NotFound(f"there is no job {job_id}")  # deleted meanwhile
    try:
        queue.send_delivery(job.id, run)
    except Exception as exc:  # noqa: BLE001 - the broker is down: say so, the client may try again
        log.warning("delivery of job %s not sent to the broker: %s", job.id, type(exc).__name__)
        raise NotReady("the task queue cannot be reached; try again shortly") from None
    view = job_out(store.get(job.id) or job, store, retention_days=settings.retention_days)
    return JSONResponse(view.model_dump(mode="json"), status_code=202)


@router.delete(
    "/{job_id}",
    status_code=200,
    response_model=JobOut,
    responses={204: {"description": "the finished job and its data were deleted"}, **problem_responses(401, 404)},
)
def delete_job(
    job_id: str, tenant: TenantDep, store: StoreDep, storage: StorageDep, queue: QueueDep, settings: SettingsDep
) -> Response:
    """Cancel a queued or running job (200 with the job; its upload is deleted), or delete a finished job and its data (204)."""
    job = _load(store, tenant, job_id)
    if job.state not in TERMINAL:
        cancelled = store.cancel(job.id)
        if cancelled:  # a running analysis stops at its next stage and removes what it wrote
            storage.remove_inputs(job.id)
        if cancelled and job.callback_url:
            try:
                queue.send_webhook(job.id)
            except Exception as exc:  # noqa: BLE001 - the cancellation stands without its webhook
                log.warning("webhook for cancelled job %s not sent: %s", job.id, type(exc).__name__)
        # cancelled now, or finished just before: either way show it; a second DELETE deletes
        view = job_out(_load(store, tenant, job_id), store, retention_days=settings.retention_days)
        return JSONResponse(view.model_dump(mode="json"))
    storage.delete(job.id)
    store.delete(job.id)
    store.checkpoint()  # the deleted record leaves no copy in SQLite's write-ahead log
    return Response(status_code=204)
