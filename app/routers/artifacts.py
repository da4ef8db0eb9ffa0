"""``/v1/jobs/{id}/...``: a finished job's report, masks, maps and pictures, with digests.

An HTML output (the QC page) is served under the page's own Content-Security-Policy
(``core.report.page_policy``), never sniffed and never stored by caches; once the job is
reviewed, with its latest review inserted, so its digest and ETag are those of the bytes sent.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from app.deps import StorageDep, StoreDep, TenantDep
from app.problems import problem_responses
from app.routers.jobs import _load
from core.outputs import OUTPUTS, Output
from core.report.page_policy import content_security_policy, with_review
from service.errors import ArtifactUnavailable, JobNotFinished
from service.storage import Storage
from service.store import Job, JobState, Store, aware

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


def _page(job: Job, artifact: Output, sha256_hex: str, store: Store, storage: Storage) -> Response:
    """The job's HTML page, with its latest review inserted if it has one."""
    path = storage.artifact(job.id, artifact.filename)
    disposition = f'inline; filename="{artifact.filename}"'  # for viewing: the policy makes that safe
    review = store.latest_review(job.id)
    if review is None:
        headers = {**digest_headers(sha256_hex), **page_headers(), "Content-Disposition": disposition}
        return FileResponse(path, media_type=artifact.media_type, headers=headers)
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
    headers = {**digest_headers(hashlib.sha256(page).hexdigest()), **page_headers(), "Content-Disposition": disposition}
    return Response(page, media_type=artifact.media_type, headers=headers)


def _handler(artifact: Output) -> Callable[..., Response]:
    def download(job_id: str, tenant: TenantDep, store: StoreDep, storage: StorageDep) -> Response:
        job = _load(store, tenant, job_id)
        if job.state != JobState.succeeded:
            raise JobNotFinished(f"job {job_id} is {job.state}; its outputs exist only once it has succeeded")
        facts = job.artifacts.get(artifact.key)
        if facts is None:
            raise ArtifactUnavailable(f"job {job_id} has no {artifact.filename} (see the job's links)")
        if artifact.media_type == HTML:
            return _page(job, artifact, facts["sha256"], store, storage)
        return FileResponse(
            storage.artifact(job.id, artifact.filename),
            media_type=artifact.media_type,
            filename=artifact.filename,
            headers=digest_headers(facts["sha256"]),
        )

    download.__doc__ = artifact.summary
    return download


def add_download_route(target: APIRouter, artifact: Output) -> None:
    """``GET /v1/jobs/{job_id}/{key}`` on ``target`` for one output of the table."""
    target.add_api_route(
        f"/{{job_id}}/{artifact.key}",
        _handler(artifact),
        methods=["GET"],
        operation_id=f"get_{artifact.key.replace('/', '_').replace('.', '_')}",
        summary=artifact.summary,
        response_class=FileResponse,
        responses={200: {"content": {artifact.media_type: {}}}, **problem_responses(401, 404, 409)},
    )


for _artifact in OUTPUTS:
    add_download_route(router, _artifact)
