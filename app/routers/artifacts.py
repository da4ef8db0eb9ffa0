"""``/v1/jobs/{id}/...``: a finished job's report, masks, maps and pictures, with digests.

An HTML output (the QC page) is served under the page's own Content-Security-Policy
(``core.report.page_policy``), never sniffed and never stored by caches; once the job is
reviewed, with its latest review inserted, so its digest and ETag are those of the bytes sent.

Every output answers conditional requests: its strong ``ETag`` is the SHA-256 of the bytes
served, ``Last-Modified`` the job's end (or, for the QC page, its latest review);
``If-None-Match`` (also ``*``) or else ``If-Modified-Since`` give 304; ``HEAD`` gives the
headers without the body.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from app.deps import StorageDep, StoreDep, TenantDep
from app.problems import problem_responses
from app.routers.jobs import _load
from core.outputs import OUTPUTS, Output
from core.report.page_policy import content_security_policy, with_review
from service.errors import ArtifactUnavailable, FilesDeleted, JobNotFinished
from service.storage import Storage
from service.store import Job, JobState, Review, Store, aware

HTML = "text/html"

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])


def digest_headers(sha256_hex: str) -> dict[str, str]:
    """``Repr-Digest`` (RFC 9530) and its predecessor ``Digest`` (RFC 3230) for a file."""
    b64 = base64.b64encode(bytes.fromhex(sha256_hex)).decode()
    return {"Repr-Digest": f"sha-256=:{b64}:", "Digest": f"sha-256={b64}", "ETag": f'"{sha256_hex}"'}


def page_headers() -> dict[str, str]:
    """What every served HTML page carries: its policy (nothing external, nothing inline but its
    own script and style), no content sniffing, no copy kept by any cache (a review changes it)."""
    return {
        "Content-Security-Policy": content_security_policy(),
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }


def _last_modified(job: Job, review: Review | None) -> datetime | None:
    """When the representation last changed: the job's end, or its latest review's time."""
    times = [t for t in (aware(job.finished_at), aware(review.at) if review else None) if t is not None]
    return max(times) if times else None


def _not_modified(request: Request, tag: str, last_modified: datetime | None) -> bool:
    """RFC 9110 section 13.1: ``If-None-Match`` (weak comparison, ``*`` for any), else
    ``If-Modified-Since`` (ignored when ``If-None-Match`` is present or the date is malformed)."""
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
        return "*" in tags or tag in tags
    since = request.headers.get("if-modified-since")
    if since is None or last_modified is None:
        return False
    try:
        when = parsedate_to_datetime(since)
    except (TypeError, ValueError, IndexError):
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return last_modified.replace(microsecond=0) <= when


def _conditional(request: Request, headers: dict[str, str], last_modified: datetime | None) -> Response | None:
    """A 304 carrying the validators when the client's copy is current, else None."""
    if not _not_modified(request, headers["ETag"], last_modified):
        return None
    keep = ("ETag", "Last-Modified", "Cache-Control", "Content-Security-Policy", "X-Content-Type-Options")
    return Response(status_code=304, headers={k: v for k, v in headers.items() if k in keep})


def _page(request: Request, job: Job, artifact: Output, sha256_hex: str, store: Store, storage: Storage) -> Response:
    """The job's HTML page, with its latest review inserted if it has one."""
    path = storage.artifact(job.id, artifact.filename)
    disposition = f'inline; filename="{artifact.filename}"'  # for viewing: the policy makes that safe
    review = store.latest_review(job.id)
    modified = _last_modified(job, review)
    dated = {"Last-Modified": format_datetime(modified, usegmt=True)} if modified else {}
    if review is None:
        headers = {**digest_headers(sha256_hex), **page_headers(), **dated, "Content-Disposition": disposition}
        return _conditional(request, headers, modified) or FileResponse(path, media_type=artifact.media_type, headers=headers)
    try:
        stored = path.read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactUnavailable(f"job {job.id} has no {artifact.filename} any more") from exc
    at = aware(review.at)
    # surrogateescape: bytes that are not UTF-8 go back out exactly as they came in
    page = with_review(
        stored.decode("utf-8", "surrogateescape"),
        verdict=review.verdict,
        note=review.note,
        at=at.isoformat(timespec="seconds") if at else "",
        reviewer=review.key_id,
    ).encode("utf-8", "surrogateescape")
    # the representation sent is not the stored file: its digest and ETag are the served bytes'
    headers = {**digest_headers(hashlib.sha256(page).hexdigest()), **page_headers(), **dated, "Content-Disposition": disposition}
    if request.method == "HEAD":  # the headers of the page as GET would send it, no body
        headers["Content-Length"] = str(len(page))
        page = b""
    return _conditional(request, headers, modified) or Response(page, media_type=artifact.media_type, headers=headers)


def _handler(artifact: Output) -> Callable[..., Response]:
    def download(request: Request, job_id: str, tenant: TenantDep, store: StoreDep, storage: StorageDep) -> Response:
        job = _load(store, tenant, job_id)
        if job.state != JobState.succeeded:
            raise JobNotFinished(f"job {job_id} is {job.state}; its outputs exist only once it has succeeded")
        deleted = aware(job.files_deleted_at)
        if deleted is not None:
            raise FilesDeleted(
                f"the files of job {job_id} were deleted on {deleted:%Y-%m-%d %H:%M} UTC, at the end of the service's "
                "retention period; the job record (state, digests) remains"
            )
        facts = job.artifacts.get(artifact.key)
        if facts is None:
            raise ArtifactUnavailable(f"job {job_id} has no {artifact.filename} (see the job's links)")
        if artifact.media_type == HTML:
            return _page(request, job, artifact, facts["sha256"], store, storage)
        modified = _last_modified(job, None)
        headers = digest_headers(facts["sha256"])
        if modified is not None:
            headers["Last-Modified"] = format_datetime(modified, usegmt=True)
        return _conditional(request, headers, modified) or FileResponse(
            storage.artifact(job.id, artifact.filename),
            media_type=artifact.media_type,
            filename=artifact.filename,
            headers=headers,
        )

    download.__doc__ = artifact.summary
    return download


def add_download_route(target: APIRouter, artifact: Output) -> None:
    """``GET`` and ``HEAD /v1/jobs/{job_id}/{key}`` on ``target`` for one output of the table."""
    target.add_api_route(
        f"/{{job_id}}/{artifact.key}",
        _handler(artifact),
        methods=["HEAD"],
        operation_id=f"head_{artifact.key.replace('/', '_').replace('.', '_')}",
        include_in_schema=False,  # the GET's headers without its body; documented with the GET
    )
    target.add_api_route(
        f"/{{job_id}}/{artifact.key}",
        _handler(artifact),
        methods=["GET"],
        operation_id=f"get_{artifact.key.replace('/', '_').replace('.', '_')}",
        summary=artifact.summary,
        response_class=FileResponse,
        responses={
            200: {"content": {artifact.media_type: {}}},
            304: {"description": "not modified (If-None-Match, If-Modified-Since)"},
            **problem_responses(401, 404, 409, 410),
        },
    )


for _artifact in OUTPUTS:
    add_download_route(router, _artifact)
