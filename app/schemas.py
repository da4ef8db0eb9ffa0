"""The API's JSON shapes (they feed the OpenAPI document) and how a job record is shown."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from service.links import job_links
from service.store import Job, JobState, Store, aware


class Delivery(BaseModel):
    """One webhook delivery attempt."""

    attempt: int
    at: datetime
    status_code: int | None = None
    error: str | None = None
    delivered: bool
    gave_up: bool = Field(default=False, description="true on a failed attempt after which no more are made")


class JobOut(BaseModel):
    """A job as the API shows it."""

    id: str
    state: JobState
    stage: str | None = Field(default=None, description="pipeline stage while running: load, segment, fit, measure, write")
    progress: float = Field(description="0-1")
    queue_position: int | None = Field(default=None, description="1 = next to run; only while queued")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    input: dict[str, Any] = Field(description="kind (nifti or dicom) and size and SHA-256 of each uploaded file")
    callback_url: str | None = None
    deliveries: list[Delivery] = Field(default_factory=list)
    problem: dict[str, Any] | None = Field(default=None, description="RFC 9457 problem object when failed")
    links: dict[str, str]


class JobPage(BaseModel):
    """One page of jobs, newest first."""

    items: list[JobOut]
    next_cursor: str | None = None
    links: dict[str, str] = Field(default_factory=dict)


def job_out(job: Job, store: Store) -> JobOut:
    """The API view of a job record."""
    return JobOut(
        id=job.id,
        state=JobState(job.state),
        stage=job.stage if job.state == JobState.running else None,
        progress=job.progress,
        queue_position=store.queue_position(job) if job.state == JobState.queued else None,
        created_at=aware(job.created_at),  # type: ignore[arg-type]
        started_at=aware(job.started_at),
        finished_at=aware(job.finished_at),
        updated_at=aware(job.updated_at),  # type: ignore[arg-type]
        input={"kind": job.inputs.get("kind"), "files": job.inputs.get("files", [])},
        callback_url=job.callback_url,
        deliveries=[Delivery.model_validate(d) for d in job.deliveries],
        problem=job.problem,
        links=job_links(job.id, job.artifacts if job.state == JobState.succeeded else {}),
    )


def etag(view: JobOut, version: int) -> str:
    """The job view's entity tag: changes with the record and with the queue position."""
    return f'W/"{view.id}.{version}.{view.queue_position or 0}"'
