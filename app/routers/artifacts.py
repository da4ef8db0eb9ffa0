"""``/v1/jobs/{id}/...``: a finished job's report, masks, maps and pictures, with digests."""

from __future__ import annotations

import base64
from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.deps import StorageDep, StoreDep, TenantDep
from app.problems import problem_responses
from app.routers.jobs import _load
from core.outputs import OUTPUTS, Output
from service.errors import ArtifactUnavailable, JobNotFinished
from service.store import JobState

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])


def digest_headers(sha256_hex: str) -> dict[str, str]:
    """``Repr-Digest`` (RFC 9530) and its predecessor ``Digest`` (RFC 3230) for a file."""
    b64 = base64.b64encode(bytes.fromhex(sha256_hex)).decode()
    return {"Repr-Digest": f"sha-256=:{b64}:", "Digest": f"sha-256={b64}", "ETag": f'"{sha256_hex}"'}


def _handler(artifact: Output) -> Callable[..., FileResponse]:
    def download(job_id: str, tenant: TenantDep, store: StoreDep, storage: StorageDep) -> FileResponse:
        job = _load(store, tenant, job_id)
        if job.state != JobState.succeeded:
            raise JobNotFinished(f"job {job_id} is {job.state}; its outputs exist only once it has succeeded")
        facts = job.artifacts.get(artifact.key)
        if facts is None:
            raise ArtifactUnavailable(f"job {job_id} has no {artifact.filename} (see the job's links)")
        return FileResponse(
            storage.artifact(job.id, artifact.filename),
            media_type=artifact.media_type,
            filename=artifact.filename,
            headers=digest_headers(facts["sha256"]),
        )

    download.__doc__ = artifact.summary
    return download


for _artifact in OUTPUTS:
    router.add_api_route(
        f"/{{job_id}}/{_artifact.key}",
        _handler(_artifact),
        methods=["GET"],
        operation_id=f"get_{_artifact.key.replace('/', '_').replace('.', '_')}",
        summary=_artifact.summary,
        response_class=FileResponse,
        responses={200: {"content": {_artifact.media_type: {}}}, **problem_responses(401, 404, 409)},
    )
