"""The API's JSON shapes (they feed the OpenAPI document) and how a job record is shown."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.links import job_links
from service.retention import files_expire_at
from service.store import NOTE_MAX_CHARS, Job, JobState, Review, Store, Verdict, aware

# a note is plain text shown on the QC page: tabs and line breaks, but no other control characters
_NOTE_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"


class Delivery(BaseModel):
    """One webhook delivery attempt: only whether it arrived (the receiver's status code or
    the kind of connection error would let a tenant probe the service's network; they are in
    the worker's log for the operator)."""

    attempt: int
    at: datetime
    delivered: bool
    gave_up: bool = Field(default=False, description="true on a failed attempt after which no more are made")


class DicomDelivery(BaseModel):
    """Storing the job's DICOM results (SEG, SR, SC) in the tenant's DICOMweb destination (STOW-RS)."""

    state: Literal["pending", "delivered", "failed"] = Field(
        description="pending: an attempt is due or under way; delivered; failed: every attempt failed "
        "(POST /v1/jobs/{id}/deliver tries again). The job's own state is unaffected."
    )
    attempts: int = Field(description="attempts made so far")
    last_error: str | None = Field(
        default=None, description="why the last attempt failed, e.g. 'the destination answered HTTP 503', 'could not connect'"
    )
    at: datetime = Field(description="when the delivery was started or its last attempt made")


ReviewFilter = Literal["pass", "fail", "artifact", "none"]
"""The job list's ``review`` filter: a latest verdict, or ``none`` for jobs nobody reviewed."""


class ReviewIn(BaseModel):
    """A reviewer's verdict on a succeeded job."""

    model_config = ConfigDict(extra="forbid")
    verdict: Verdict = Field(description="pass: the result holds; fail: it is wrong; artifact: the images are unusable")
    note: str = Field(
        default="",
        max_length=NOTE_MAX_CHARS,
        pattern=_NOTE_PATTERN,
        description="free text (no control characters but tab and line breaks)",
    )


class ReviewOut(BaseModel):
    """One recorded review."""

    verdict: Verdict
    note: str
    at: datetime
    key_id: str = Field(description="public id of the API key that recorded it")


class JobOut(BaseModel):
    """A job as the API shows it."""

    id: str
    state: JobState
    stage: str | None = Field(default=None, description="pipeline stage while running: load, segment, fit, measure, write")
    progress: float = Field(description="0-1")
    queue_position: int | None = Field(
        default=None,
        description="only while queued: 1 + the tenant's own queued jobs submitted before this one "
        "(other tenants' jobs are not counted, so it is no promise of the order across tenants)",
    )
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    input: dict[str, Any] = Field(description="kind (nifti or dicom) and size and SHA-256 of each uploaded file")
    study_uid: str | None = Field(
        default=None, description="Study Instance UID of a DICOM job (known at once for one sent by STOW-RS)"
    )
    callback_url: str | None = None
    files_expire_at: datetime | None = Field(
        default=None,
        description="when the job's files (inputs and outputs) will be deleted under the service's retention "
        "period; null: kept (no retention period, the job has not ended, or they are gone already)",
    )
    files_deleted_at: datetime | None = Field(
        default=None, description="when the job's files were deleted (downloads then answer 410); the record stays"
    )
    deliveries: list[Delivery] = Field(default_factory=list, description="webhook delivery attempts")
    delivery: DicomDelivery | None = Field(
        default=None, description="storing the DICOM results in the tenant's DICOMweb destination; null: none is made"
    )
    problem: dict[str, Any] | None = Field(default=None, description="RFC 9457 problem object when failed")
    review: ReviewOut | None = Field(default=None, description="the latest review (succeeded jobs only); null until reviewed")
    reviews: list[ReviewOut] = Field(default_factory=list, description="every review, oldest first")
    links: dict[str, str]


class JobPage(BaseModel):
    """One page of jobs, newest first."""

    items: list[JobOut]
    next_cursor: str | None = None
    links: dict[str, str] = Field(default_factory=dict)


def review_out(review: Review) -> ReviewOut:
    """The API view of a review record."""
    return ReviewOut(verdict=review.verdict, note=review.note, at=aware(review.at), key_id=review.key_id)  # type: ignore[arg-type]


def job_out(job: Job, store: Store, *, reviews: list[Review] | None = None, retention_days: float | None = None) -> JobOut:
    """The API view of a job record; ``reviews`` (oldest first) are read from the store unless
    given (only a succeeded job can have any); ``retention_days`` (the setting) dates the
    deletion of its files."""
    if reviews is None:
        reviews = store.reviews(job.id) if job.state == JobState.succeeded else []
    history = [review_out(r) for r in reviews]
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
        study_uid=job.study_uid,
        callback_url=job.callback_url,
        files_expire_at=files_expire_at(job, retention_days),
        files_deleted_at=aware(job.files_deleted_at),
        deliveries=[Delivery.model_validate(d) for d in job.deliveries],
        delivery=DicomDelivery.model_validate(job.delivery) if job.delivery else None,
        problem=job.problem,
        review=history[-1] if history else None,
        reviews=history,
        links=job_links(job.id, job.artifacts if job.state == JobState.succeeded and job.files_deleted_at is None else {}),
    )


def etag(view: JobOut, version: int) -> str:
    """The job view's entity tag: changes with the record and with the queue position."""
    return f'W/"{view.id}.{version}.{view.queue_position or 0}"'
