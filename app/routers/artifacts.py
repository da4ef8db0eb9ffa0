"""``/v1/jobs/{id}/...``: a finished job's report, masks, maps and pictures, with digests."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.artifacts import ARTIFACTS, Artifact, digest_headers
from app.deps import StorageDep, StoreDep, TenantDep
from app.errors import ArtifactUnavailable, JobNotFinished
from app.problems import problem_responses
from app.routers.jobs import _load
from app.store import JobState

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])


def _handler(artifact: Artifact) -> Callable[..., FileResponse]:
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


for _artifact in ARTIFACTS:
    router.add_api_route(
        f"/{{job_id}}/{_artifact.key}",
        _handler(_artifact),
        methods=["GET"],
        operation_id=f"get_{_artifact.key.replace('/', '_').replace('.', '_')}",
        summary=_artifact.summary,
        response_class=FileResponse,
        responses={200: {"content": {_artifact.media_type: {}}}, **problem_responses(401, 404, 409)},
    )
