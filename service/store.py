"""The job store: tenants, API keys, jobs, their reviews and worker heartbeats (SQLAlchemy 2).

The job record is the truth about a job; Celery's own task state is never read. The gateway and
the worker both use this module (it imports only SQLAlchemy). A SQLite file is the default;
PostgreSQL works through ``SCSNET_DATABASE_URL``. The schema is made and changed only by the
migrations in :mod:`service.migrations`: an empty database gets it on first use, an older one
is refused (:class:`~service.errors.SchemaOutdated`) until ``scsnet db upgrade``.

State machine (``JobState``)::

    queued -> running -> succeeded | failed
    queued | running -> cancelled
    running -> queued          (its broker message was lost: re-sent with a fresh dispatch token)

Every write bumps ``version``, which the gateway turns into the ``ETag``; recording a review
of a job counts as a write of that job.

A succeeded job may be reviewed (``Review``: verdict, note, the reviewer's API key id, time),
any number of times: every review is kept, the latest is the job's verdict. Reviews live in
their own table because ``create_all`` adds new tables to an existing database but never new
columns to an old table.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    exists,
    false,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from service import migrations

KEY_PREFIX = "scsnet"
# an analysis of a typical study takes a few seconds (benchmarks/RESULTS.md): resolve those too
DURATION_BUCKETS_S = (1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class JobState(StrEnum):
    """Where a job is in its life."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})

Verdict = Literal["pass", "fail", "artifact"]
"""A reviewer's verdict on a succeeded job: the result holds, is wrong, or the images are unusable."""
VERDICTS: tuple[str, ...] = get_args(Verdict)
UNREVIEWED = "none"
"""The list filter's value for jobs nobody has reviewed."""
NOTE_MAX_CHARS = 2000


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    """A customer (a hospital, a research group); owns keys and jobs."""

    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    webhook_secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # the secret replaced by the last rotation: it signs webhooks too until it expires
    previous_webhook_secret: Mapped[str | None] = mapped_column(String(100), nullable=True)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    def signing_secrets(self, now: datetime | None = None) -> list[str]:
        """The secrets a webhook is signed with: the current one, then the previous one while
        its grace period lasts."""
        expires = _aware(self.previous_secret_expires_at)
        if self.previous_webhook_secret and expires is not None and expires > (now or utcnow()):
            return [self.webhook_secret, self.previous_webhook_secret]
        return [self.webhook_secret]


class ApiKey(Base):
    """An API key, stored as the SHA-256 of the full key; ``id`` is its public prefix."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Job(Base):
    """One analysis request and everything known about its progress and outcome."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        Index("ix_jobs_tenant_study", "tenant_id", "study_uid"),
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default=JobState.queued)
    stage: Mapped[str | None] = mapped_column(String(16), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    dispatch_token: Mapped[str] = mapped_column(String(32), default="")
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    callback_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    inputs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    problem: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    artifacts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    deliveries: Mapped[list[Any]] = mapped_column(default=list)
    # the retention pass deleted the job's folder then (the record stays)
    files_deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # the Study Instance UID of a DICOM job (GET /v1/jobs?study_uid=), known at intake for STOW-RS
    study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # storing the job's DICOM results in the tenant's DICOMweb destination: {"state": "pending" |
    # "delivered" | "failed", "attempts", "last_error", "at"}; None when there is nothing to deliver
    delivery: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)


class Review(Base):
    """One review of a succeeded job; ``latest`` marks the job's current verdict (the newest)."""

    __tablename__ = "reviews"
    # the list filter looks up "the latest review of this job, with this verdict"
    __table_args__ = (Index("ix_reviews_job_latest", "job_id", "latest", "verdict"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    verdict: Mapped[str] = mapped_column(String(16))
    note: Mapped[str] = mapped_column(String(NOTE_MAX_CHARS), default="")
    key_id: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    latest: Mapped[bool] = mapped_column(Boolean, default=True)


class Destination(Base):
    """A tenant's DICOMweb destination (its PACS), set by the operator: after a DICOM job of the
    tenant succeeds, its SEG, SR and SC are stored there by STOW-RS. ``headers`` (an
    ``Authorization``, say) are secrets: stored, never printed back."""

    __tablename__ = "destinations"
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    headers: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StowBatch(Base):
    """Instances of one study that one tenant sent by STOW-RS, gathered in ``stow/<id>/`` until
    none has arrived for the settle time; then a job starts on them (``job_id``). ``gathering``
    is ``"<tenant id>/<study uid>"`` while the batch takes instances and NULL once its job
    started: the unique index lets one batch per tenant and study gather at a time."""

    __tablename__ = "stow_batches"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    gathering: Mapped[str | None] = mapped_column(String(120), unique=True, nullable=True)
    first_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


# Statements of the status-poll path (authenticate, get, queue_position), built once: building
# and cache-keying a statement per call cost more than running it. Authentication and the queue
# position are plain Core queries on a connection, with no ORM session or unit of work.
_AUTHENTICATE = (
    select(ApiKey.sha256, Tenant.id, Tenant.name, Tenant.webhook_secret, Tenant.created_at)
    .join(Tenant, ApiKey.tenant_id == Tenant.id)
    .where(ApiKey.id == bindparam("key_id"), ApiKey.revoked_at.is_(None))
)
_JOB_BY_ID = select(Job).where(Job.id == bindparam("job_id"))
_JOB_BY_ID_OF_TENANT = _JOB_BY_ID.where(Job.tenant_id == bindparam("tenant_id"))
_QUEUED_AHEAD = (
    select(func.count())
    .select_from(Job)
    .where(Job.tenant_id == bindparam("tenant_id"), Job.state == JobState.queued.value, Job.seq < bindparam("seq"))
)


class WorkerBeat(Base):
    """The last heartbeat of each worker host (for ``/readyz``)."""

    __tablename__ = "workers"
    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    info: Mapped[dict[str, Any]] = mapped_column(default=dict)


@dataclass(frozen=True)
class NewKey:
    """What ``apikey create`` tells the operator (the key is shown once, never stored; the
    webhook secret only when the tenant is created with it, None otherwise)."""

    key_id: str
    key: str
    tenant: str
    tenant_created: bool
    webhook_secret: str | None


def hash_key(key: str) -> str:
    """SHA-256 hex of an API key (keys carry 256 random bits: no slow hash is needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The public id inside ``scsnet_<id>_<secret>``, or None if the key is malformed."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1]


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class Store:
    """Access to the job store; one per process, shared by its threads."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = engine_for(url)
        migrations.ensure_current(self.engine)  # or SchemaOutdated: the operator runs scsnet db upgrade
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success and rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def ping(self) -> None:
        """Raise if the store cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def checkpoint(self) -> None:
        """After deleting data: copy SQLite's write-ahead log into the database file and empty
        it, so deleted rows and retired secrets do not linger in ``scsnet.db-wal`` (freed pages
        are zeroed: ``secure_delete``). Nothing to do on PostgreSQL."""
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    # --- tenants and keys -------------------------------------------------------------
    def create_tenant(self, tenant_name: str) -> str | None:
        """Create a tenant; returns its webhook secret (to be shown once), None if it exists."""
        secret = _new_webhook_secret()
        try:
            with self.session() as s:
                s.add(Tenant(name=tenant_name, webhook_secret=secret))
        except IntegrityError:
            return None
        return secret

    def list_tenants(self) -> list[tuple[str, datetime, int, datetime | None]]:
        """(name, created, live keys, previous secret valid until or None) of every tenant."""
        live = func.count(ApiKey.id).filter(ApiKey.revoked_at.is_(None))
        query = (
            select(Tenant.name, Tenant.created_at, live, Tenant.previous_webhook_secret, Tenant.previous_secret_expires_at)
            .outerjoin(ApiKey, ApiKey.tenant_id == Tenant.id)
            .group_by(Tenant.id)
            .order_by(Tenant.name)
        )
        now = utcnow()
        with self.session() as s:
            rows = list(s.execute(query))
        grace = [_aware(r[4]) if r[3] and (_aware(r[4]) or now) > now else None for r in rows]
        return [(r[0], _aware(r[1]), int(r[2]), g) for r, g in zip(rows, grace, strict=True)]  # type: ignore[misc]

    def rotate_webhook_secret(self, tenant_name: str, *, grace: timedelta) -> str | None:
        """Give the tenant a new webhook secret (returned, to be shown once); the current one
        keeps signing, as a second signature, for ``grace``. None if there is no such tenant."""
        with self.session() as s:
            tenant = _select_for_update(s, Tenant, Tenant.name == tenant_name)
            if tenant is None:
                return None
            tenant.previous_webhook_secret = tenant.webhook_secret if grace > timedelta(0) else None
            tenant.previous_secret_expires_at = utcnow() + grace if grace > timedelta(0) else None
            tenant.webhook_secret = _new_webhook_secret()
            return tenant.webhook_secret

    def retire_expired_secrets(self, *, now: datetime | None = None) -> int:
        """Forget previous webhook secrets whose grace period is over; how many were."""
        with self.session() as s:
            done = s.execute(
                update(Tenant)
                .where(Tenant.previous_webhook_secret.is_not(None), Tenant.previous_secret_expires_at <= (now or utcnow()))
                .values(previous_webhook_secret=None, previous_secret_expires_at=None)
            )
            return int(done.rowcount)  # type: ignore[attr-defined]

    def create_api_key(self, tenant_name: str) -> NewKey:
        """Create a key for ``tenant_name`` (and the tenant with its webhook secret if new: only
        then is the secret in the answer)."""
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        with self.session() as s:
            tenant = s.scalar(select(Tenant).where(Tenant.name == tenant_name))
            created = tenant is None
            if tenant is None:
                tenant = Tenant(name=tenant_name, webhook_secret=_new_webhook_secret())
                s.add(tenant)
                s.flush()
            s.add(ApiKey(id=key_id, tenant_id=tenant.id, sha256=hash_key(key)))
            return NewKey(key_id, key, tenant.name, created, tenant.webhook_secret if created else None)

    def revoke_api_key(self, key_or_id: str) -> bool:
        """Revoke a key given as its id or the full key; False if there was no such live key."""
        key_id = key_id_of(key_or_id) or key_or_id
        with self.session() as s:
            done = s.execute(
                update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
            )
            return bool(done.rowcount)  # type: ignore[attr-defined]

    def list_api_keys(self, tenant_name: str | None = None) -> list[tuple[str, str, datetime, datetime | None]]:
        """(key id, tenant, created, revoked) of every key, optionally of one tenant."""
        query = select(ApiKey.id, Tenant.name, ApiKey.created_at, ApiKey.revoked_at).join(Tenant)
        if tenant_name:
            query = query.where(Tenant.name == tenant_name)
        with self.session() as s:
            return [(r[0], r[1], _aware(r[2]), _aware(r[3])) for r in s.execute(query.order_by(ApiKey.created_at))]  # type: ignore[misc]

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant owning a live ``key``, or None."""
        key_id = key_id_of(key)
        if key_id is None:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(_AUTHENTICATE, {"key_id": key_id}).first()
        if row is None or not hmac.compare_digest(row.sha256, hash_key(key)):
            return None
        return Tenant(id=row.id, name=row.name, webhook_secret=row.webhook_secret, created_at=row.created_at)

    def tenant(self, tenant_id: int) -> Tenant | None:
        """A tenant by id."""
        with self.session() as s:
            return s.get(Tenant, tenant_id)

    # --- jobs -------------------------------------------------------------------------
    def create_job(self, job: Job) -> tuple[Job, bool]:
        """Insert ``job``; with an idempotency key already used by its tenant, return that job.

        Returns ``(job, created)``.
        """
        try:
            with self.session() as s:
                s.add(job)
            return job, True
        except IntegrityError:
            existing = self.find_by_idempotency_key(job.tenant_id, job.idempotency_key or "")
            if existing is None:
                raise
            return existing, False

    def find_by_idempotency_key(self, tenant_id: int, key: str) -> Job | None:
        """The tenant's job created with ``key``, if any."""
        with self.session() as s:
            return s.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))

    def forget_idempotency_key(self, job_id: str) -> None:
        """Detach its idempotency key from a job (the key expired): the tenant may use it again."""
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(idempotency_key=None))

    def get(self, job_id: str, *, tenant_id: int | None = None) -> Job | None:
        """A job by id; with ``tenant_id``, only if that tenant owns it."""
        with self.session() as s:
            if tenant_id is None:
                return s.scalar(_JOB_BY_ID, {"job_id": job_id})
            return s.scalar(_JOB_BY_ID_OF_TENANT, {"job_id": job_id, "tenant_id": tenant_id})

    def list_jobs(
        self,
        tenant_id: int,
        *,
        state: str | None,
        before_seq: int | None,
        limit: int,
        review: str | None = None,
        study_uid: str | None = None,
    ) -> list[Job]:
        """The tenant's jobs, newest first, keyset-paginated on ``seq``; ``review`` keeps those
        whose latest verdict it is (:data:`UNREVIEWED`: those without a review); ``study_uid``
        those of one study."""
        query = select(Job).where(Job.tenant_id == tenant_id)
        if study_uid:
            query = query.where(Job.study_uid == study_uid)
        if state:
            query = query.where(Job.state == state)
        if review == UNREVIEWED:
            query = query.where(~exists().where(Review.job_id == Job.id))
        elif review:
            query = query.where(exists().where(Review.job_id == Job.id, Review.latest.is_(True), Review.verdict == review))
        if before_seq is not None:
            query = query.where(Job.seq < before_seq)
        with self.session() as s:
            return list(s.scalars(query.order_by(Job.seq.desc()).limit(limit)))

    def queue_position(self, job: Job) -> int:
        """1 for the tenant's next job to run: the tenant's own queued jobs created before this
        one, plus 1 (other tenants' jobs are not counted: a tenant learns nothing of them)."""
        with self.engine.connect() as conn:
            ahead = conn.execute(_QUEUED_AHEAD, {"tenant_id": job.tenant_id, "seq": job.seq}).scalar()
        return int(ahead or 0) + 1

    def _update(
        self, job_id: str, *, only_from: frozenset[str] | None = None, with_token: str | None = None, **values: Any
    ) -> bool:
        query = update(Job).where(Job.id == job_id)
        if only_from is not None:
            query = query.where(Job.state.in_(only_from))
        if with_token is not None:
            query = query.where(Job.dispatch_token == with_token)
        values.setdefault("updated_at", utcnow())
        with self.session() as s:
            done = s.execute(query.values(version=Job.version + 1, **values))
            return bool(done.rowcount)  # type: ignore[attr-defined]

    def new_dispatch(self, job_id: str) -> str | None:
        """A fresh dispatch token for a queued job about to be (re)sent; None if not queued.

        Only a message carrying the job's current token may run it, so a message the broker
        had not lost after all, arriving after a re-send, does nothing.
        """
        token = secrets.token_hex(8)
        done = self._update(job_id, only_from=frozenset({JobState.queued}), dispatch_token=token, enqueued_at=utcnow())
        return token if done else None

    def claim(self, job_id: str, token: str) -> Job | None:
        """Move a queued job (or a running one whose message is redelivered) to running.

        Returns None if the job is finished, cancelled, unknown or ``token`` is stale, so a
        duplicate message does nothing.
        """
        now = utcnow()
        query = update(Job).where(
            Job.id == job_id, Job.dispatch_token == token, Job.state.in_((JobState.queued, JobState.running))
        )
        with self.session() as s:
            done = s.execute(
                query.values(
                    version=Job.version + 1,
                    updated_at=now,
                    state=JobState.running,
                    stage=None,
                    progress=0.0,
                    started_at=now,
                    attempts=Job.attempts + 1,
                )
            )
            claimed = bool(done.rowcount)  # type: ignore[attr-defined]
        return self.get(job_id) if claimed else None

    def set_progress(self, job_id: str, *, stage: str, progress: float, token: str | None = None) -> bool:
        """Record progress of a running job; False if it is no longer running (cancelled) or,
        given the run's ``token``, if the job was re-sent to another run meanwhile."""
        return self._update(
            job_id,
            only_from=frozenset({JobState.running}),
            with_token=token,
            stage=stage,
            progress=round(min(max(progress, 0.0), 1.0), 4),
        )

    def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        problem: dict[str, Any] | None = None,
        artifacts: dict[str, Any] | None = None,
        token: str | None = None,
    ) -> bool:
        """Record a running job's outcome; False if it was cancelled meanwhile or, given the
        run's ``token``, re-sent to another run."""
        job = self.get(job_id)
        if job is None:
            return False
        now = utcnow()
        started = _aware(job.started_at) or now
        return self._update(
            job_id,
            only_from=frozenset({JobState.running}),
            with_token=token,
            state=state,
            stage=None,
            progress=1.0 if state == JobState.succeeded else job.progress,
            finished_at=now,
            duration_s=(now - started).total_seconds(),
            problem=problem,
            artifacts=artifacts or {},
        )

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if it had already finished."""
        return self._update(
            job_id,
            only_from=frozenset({JobState.queued, JobState.running}),
            state=JobState.cancelled,
            finished_at=utcnow(),
        )

    def delete(self, job_id: str) -> None:
        """Forget a job and its reviews."""
        with self.session() as s:
            # explicit as well as ON DELETE CASCADE: a SQLite connection may have foreign keys off
            s.execute(delete(Review).where(Review.job_id == job_id))
            job = s.scalar(select(Job).where(Job.id == job_id))
            if job is not None:
                s.delete(job)

    def files_due(self, *, ended_before: datetime, limit: int) -> list[str]:
        """Ids of up to ``limit`` ended jobs (any terminal state) whose files are still there and
        which ended before ``ended_before``, oldest end first."""
        query = (
            select(Job.id)
            .where(Job.state.in_([s.value for s in TERMINAL]), Job.files_deleted_at.is_(None), Job.finished_at < ended_before)
            .order_by(Job.finished_at)
            .limit(limit)
        )
        with self.session() as s:
            return list(s.scalars(query))

    def mark_files_deleted(self, job_ids: list[str]) -> None:
        """Record that the folders of ``job_ids`` were deleted (a write: bumps ``version``)."""
        now = utcnow()
        with self.session() as s:
            s.execute(
                update(Job)
                .where(Job.id.in_(job_ids), Job.files_deleted_at.is_(None))
                .values(files_deleted_at=now, version=Job.version + 1, updated_at=now)
            )

    def add_delivery(self, job_id: str, delivery: dict[str, Any]) -> None:
        """Append a webhook delivery attempt to the job's record."""
        with self.session() as s:
            job = _select_for_update(s, Job, Job.id == job_id)
            if job is not None:
                job.deliveries = [*job.deliveries, delivery]
                job.version += 1
                job.updated_at = utcnow()

    # --- destinations and deliveries -------------------------------------------------
    def set_destination(self, tenant_name: str, *, url: str, headers: dict[str, str]) -> bool:
        """Store (or replace) the tenant's DICOMweb destination; False if there is no such tenant."""
        now = utcnow()
        with self.session() as s:
            tenant = s.scalar(select(Tenant).where(Tenant.name == tenant_name))
            if tenant is None:
                return False
            current = s.get(Destination, tenant.id)
            if current is None:
                s.add(Destination(tenant_id=tenant.id, url=url, headers=dict(headers), created_at=now, updated_at=now))
            else:
                current.url, current.headers, current.updated_at = url, dict(headers), now
        return True

    def destination(self, tenant_id: int) -> Destination | None:
        """The tenant's DICOMweb destination, if the operator set one."""
        with self.session() as s:
            return s.get(Destination, tenant_id)

    def destinations(self) -> list[tuple[str, str, list[str]]]:
        """(tenant name, URL, header names) of every destination: never the header values."""
        query = select(Tenant.name, Destination.url, Destination.headers).join(Tenant, Tenant.id == Destination.tenant_id)
        with self.session() as s:
            return [(name, url, sorted(headers or {})) for name, url, headers in s.execute(query.order_by(Tenant.name))]

    def remove_destination(self, tenant_name: str) -> bool:
        """Forget the tenant's destination; False if it had none."""
        with self.session() as s:
            tenant_id = s.scalar(select(Tenant.id).where(Tenant.name == tenant_name))
            done = s.execute(delete(Destination).where(Destination.tenant_id == tenant_id)) if tenant_id is not None else None
            return bool(done is not None and done.rowcount)  # type: ignore[attr-defined]

    def start_delivery(self, job_id: str) -> str | None:
        """Mark a succeeded job's DICOMweb delivery pending, with no attempt yet; returns the
        run id the delivery task must carry (a task of an earlier run then does nothing), None
        if the job is not (any more) succeeded."""
        run = secrets.token_hex(8)
        delivery = {"state": "pending", "attempts": 0, "last_error": None, "at": utcnow().isoformat(), "run": run}
        done = self._update(job_id, only_from=frozenset({JobState.succeeded}), delivery=delivery)
        return run if done else None

    def record_delivery_attempt(self, job_id: str, *, run: str, delivered: bool, error: str | None, last: bool) -> bool:
        """Record one DICOMweb delivery attempt of ``run``: delivered, pending (another attempt
        follows) or, on the ``last`` one, failed; False if the run is no longer current."""
        with self.session() as s:
            job = _select_for_update(s, Job, Job.id == job_id)
            if job is None or not job.delivery or job.delivery.get("run") != run:
                return False
            state = "delivered" if delivered else "failed" if last else "pending"
            job.delivery = {
                **job.delivery,
                "state": state,
                "attempts": int(job.delivery.get("attempts", 0)) + 1,
                "last_error": None if delivered else error,
                "at": utcnow().isoformat(),
            }
            job.version += 1
            job.updated_at = utcnow()
        return True

    def record_study_uid(self, job_id: str, study_uid: str) -> None:
        """Set the job's Study Instance UID unless it has one already (a STOW-RS job knows it at intake)."""
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.study_uid.is_(None)).values(study_uid=study_uid[:64], version=Job.version + 1))

    # --- reviews ----------------------------------------------------------------------
    def add_review(self, job_id: str, *, verdict: str, note: str, key_id: str) -> Review | None:
        """Record a review of a succeeded job, which becomes its latest; None if there is no
        such succeeded job (any more). Bumps the job's ``version``."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        if len(note) > NOTE_MAX_CHARS:
            raise ValueError(f"a review note holds at most {NOTE_MAX_CHARS} characters")
        now = utcnow()
        with self.session() as s:
            # the job's row first: it takes the write lock, so concurrent reviews of one job
            # queue up and exactly one review stays the latest
            bumped = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.succeeded)
                .values(version=Job.version + 1, updated_at=now)
            )
            if not bumped.rowcount:  # type: ignore[attr-defined]
                return None
            s.execute(update(Review).where(Review.job_id == job_id, Review.latest.is_(True)).values(latest=False))
            review = Review(job_id=job_id, verdict=verdict, note=note, key_id=key_id, at=now, latest=True)
            s.add(review)
        return review

    def reviews(self, job_id: str) -> list[Review]:
        """Every review of a job, oldest first (the last is the latest); times via :func:`aware`."""
        return self.reviews_of([job_id]).get(job_id, [])

    def reviews_of(self, job_ids: list[str]) -> dict[str, list[Review]]:
        """The reviews of each of ``job_ids`` that has any, oldest first (one query for a page)."""
        found: dict[str, list[Review]] = {}
        if not job_ids:
            return found
        with self.session() as s:
            for review in s.scalars(select(Review).where(Review.job_id.in_(job_ids)).order_by(Review.id)):
                found.setdefault(review.job_id, []).append(review)
        return found

    def latest_review(self, job_id: str) -> Review | None:
        """A job's latest review, if it has one."""
        with self.session() as s:
            return s.scalar(select(Review).where(Review.job_id == job_id, Review.latest.is_(True)))

    def existing(self, job_ids: list[str]) -> set[str]:
        """Those of ``job_ids`` the store holds a job for."""
        found: set[str] = set()
        with self.session() as s:
            for start in range(0, len(job_ids), 500):
                found.update(s.scalars(select(Job.id).where(Job.id.in_(job_ids[start : start + 500]))))
        return found

    def stale_queued(self, *, older_than_s: float) -> list[str]:
        """Ids of queued jobs last sent to the broker (or created) longer ago than ``older_than_s``."""
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        with self.session() as s:
            rows = s.scalars(
                select(Job.id).where(
                    Job.state == JobState.queued, func.coalesce(Job.enqueued_at, Job.created_at) < cutoff
                )
            )
            return list(rows)

    def stale_running(self, *, older_than_s: float) -> list[tuple[str, str]]:
        """(id, dispatch token) of running jobs claimed longer ago than ``older_than_s``."""
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        with self.session() as s:
            rows = s.execute(select(Job.id, Job.dispatch_token).where(Job.state == JobState.running, Job.started_at < cutoff))
            return [(row[0], row[1]) for row in rows]

    def requeue_running(self, job_id: str, token: str) -> str | None:
        """Put back in the queue, with a fresh dispatch token, a job running under ``token``
        whose broker message is lost; None if it no longer runs under that token.

        The run holding ``token``, should it still be alive somewhere, is fenced off: its
        progress and outcome are refused from now on.
        """
        fresh = secrets.token_hex(8)
        done = self._update(
            job_id,
            only_from=frozenset({JobState.running}),
            with_token=token,
            state=JobState.queued,
            stage=None,
            progress=0.0,
            dispatch_token=fresh,
            enqueued_at=utcnow(),
        )
        return fresh if done else None

    # --- STOW-RS batches ---------------------------------------------------------------
    def stow_arrive(self, tenant_id: int, study_uid: str, place: Callable[[str], tuple[int, int]]) -> str:
        """Record an instance of ``study_uid`` arriving for ``tenant_id``: in the tenant's batch
        gathering that study, or a new one. ``place(batch id)`` puts the file into the batch's
        folder and returns (instances added: 0 for a replaced one, bytes added); it runs inside
        the transaction that bumped the batch's ``last_at`` and holds its row (PostgreSQL) or the
        write lock (SQLite), so a claim (:meth:`stow_claim`) sees either the instance in the
        folder or a batch that is still gathering, never a half. Returns the batch id."""
        key = f"{tenant_id}/{study_uid}"
        for _ in range(10):  # each loss of the race to insert means another request made the batch
            now = utcnow()
            with self.session() as s:
                bumped = s.execute(update(StowBatch).where(StowBatch.gathering == key).values(last_at=now))
                if bumped.rowcount:  # type: ignore[attr-defined]
                    batch_id = s.scalar(select(StowBatch.id).where(StowBatch.gathering == key))
                    assert batch_id is not None
                    added, grown = place(batch_id)
                    s.execute(
                        update(StowBatch)
                        .where(StowBatch.id == batch_id)
                        .values(instances=StowBatch.instances + added, size=StowBatch.size + grown)
                    )
                    return batch_id
            try:
                with self.session() as s:
                    batch = StowBatch(
                        id=secrets.token_hex(16), tenant_id=tenant_id, study_uid=study_uid, gathering=key, first_at=now, last_at=now
                    )
                    s.add(batch)
                    s.flush()  # IntegrityError here if another request made the batch meanwhile
                    batch.instances, batch.size = place(batch.id)
                    return batch.id
            except IntegrityError:
                continue
        raise RuntimeError(f"could not find or make the STOW-RS batch of {key}")

    def stow_settled(self, *, settle_s: float) -> list[str]:
        """Ids of gathering batches none of whose instances arrived in the last ``settle_s``."""
        cutoff = utcnow() - timedelta(seconds=settle_s)
        with self.session() as s:
            return list(s.scalars(select(StowBatch.id).where(StowBatch.gathering.is_not(None), StowBatch.last_at < cutoff)))

    def stow_claim(self, batch_id: str, *, settle_s: float) -> StowBatch | None:
        """Stop a settled batch gathering, for this caller only: the batch if this call did it,
        None if another did, or an instance arrived meanwhile. ``last_at`` becomes the claim's
        time (:meth:`stow_unstarted` finds a claim whose job never started)."""
        now = utcnow()
        cutoff = now - timedelta(seconds=settle_s)
        with self.session() as s:
            done = s.execute(
                update(StowBatch)
                .where(StowBatch.id == batch_id, StowBatch.gathering.is_not(None), StowBatch.last_at < cutoff)
                .values(gathering=None, last_at=now)
            )
            if not done.rowcount:  # type: ignore[attr-defined]
                return None
            return s.get(StowBatch, batch_id)

    def stow_unstarted(self, *, claimed_before_s: float) -> list[StowBatch]:
        """Batches claimed more than ``claimed_before_s`` ago that have no job yet (the gateway
        that claimed them died before starting it)."""
        cutoff = utcnow() - timedelta(seconds=claimed_before_s)
        with self.session() as s:
            query = select(StowBatch).where(StowBatch.gathering.is_(None), StowBatch.job_id.is_(None), StowBatch.last_at < cutoff)
            return list(s.scalars(query))

    def stow_start_job(self, batch_id: str, job: Job) -> Job:
        """Store ``job`` (unless a job with its id exists: then that one) and record it as the
        batch's job, in one transaction; returns the stored job."""
        with self.session() as s:
            existing = s.scalar(select(Job).where(Job.id == job.id))
            if existing is None:
                s.add(job)
            s.execute(update(StowBatch).where(StowBatch.id == batch_id).values(job_id=job.id))
            return existing or job

    def stow_forget(self, batch_id: str) -> None:
        """Delete a batch record (one whose instances are lost)."""
        with self.session() as s:
            s.execute(delete(StowBatch).where(StowBatch.id == batch_id))

    def stow_live(self, batch_ids: list[str]) -> set[str]:
        """Those of ``batch_ids`` whose folder is still wanted: gathering, or claimed without a job."""
        found: set[str] = set()
        with self.session() as s:
            for start in range(0, len(batch_ids), 500):
                query = select(StowBatch.id).where(
                    StowBatch.id.in_(batch_ids[start : start + 500]),
                    (StowBatch.gathering.is_not(None)) | (StowBatch.job_id.is_(None)),
                )
                found.update(s.scalars(query))
        return found

    def stow_batches(self, tenant_id: int, study_uid: str | None = None) -> list[StowBatch]:
        """The tenant's batches (of one study), oldest first."""
        query = select(StowBatch).where(StowBatch.tenant_id == tenant_id)
        if study_uid is not None:
            query = query.where(StowBatch.study_uid == study_uid)
        with self.session() as s:
            return list(s.scalars(query.order_by(StowBatch.first_at)))

    # --- metrics and health -----------------------------------------------------------
    def counts_by_state(self) -> dict[str, int]:
        """Number of jobs in each state (every state present, zero included)."""
        with self.session() as s:
            rows = {state: count for state, count in s.execute(select(Job.state, func.count()).group_by(Job.state))}
        return {state.value: int(rows.get(state.value, 0)) for state in JobState}

    def duration_histogram(self) -> tuple[list[int], int, float]:
        """Cumulative counts per :data:`DURATION_BUCKETS_S` bound, total count and sum (s) of
        the durations of succeeded jobs."""
        done = Job.state == JobState.succeeded
        columns = [func.sum(case((Job.duration_s <= b, 1), else_=0)) for b in DURATION_BUCKETS_S]
        with self.session() as s:
            row = s.execute(select(*columns, func.count(), func.coalesce(func.sum(Job.duration_s), 0.0)).where(done)).one()
        return [int(v or 0) for v in row[:-2]], int(row[-2] or 0), float(row[-1] or 0.0)

    def beat(self, hostname: str, info: dict[str, Any]) -> None:
        """Record that the worker ``hostname`` is alive, with what it serves (its model)."""
        with self.session() as s:
            beat = s.get(WorkerBeat, hostname)
            if beat is None:
                s.add(WorkerBeat(hostname=hostname, seen_at=utcnow(), info=info))
            else:
                beat.seen_at, beat.info = utcnow(), info

    def workers(self, *, seen_within_s: float) -> list[WorkerBeat]:
        """Workers whose last heartbeat is at most ``seen_within_s`` old, most recent first."""
        cutoff = utcnow() - timedelta(seconds=seen_within_s)
        with self.session() as s:
            return list(s.scalars(select(WorkerBeat).where(WorkerBeat.seen_at >= cutoff).order_by(WorkerBeat.seen_at.desc())))


def engine_for(url: str) -> Engine:
    """The SQLAlchemy engine of the job store at ``url`` (SQLite: its folder made, its pragmas
    set on every connection)."""
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "postgresql":
        event.listen(engine, "connect", _postgres_utc)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        if engine.url.database and engine.url.database != ":memory:":
            Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
    return engine


def _select_for_update(s: Session, model: Any, *where: Any) -> Any:
    """The row ``select(model).where(*where)``, locked until the session ends (``FOR UPDATE``).
    SQLite has no row locks, and pysqlite opens its transaction only at the first write, running
    the SELECTs before it outside: two read-modify-writes at once would lose one's change. There
    an UPDATE matching no row comes first: it writes nothing but takes the database's write lock
    (waiting for it as any write does), so the read and the write after it are one transaction."""
    if s.get_bind().dialect.name == "sqlite":
        key = model.__mapper__.primary_key[0]
        s.execute(update(model).where(false()).values({key: key}).execution_options(synchronize_session=False))
    return s.scalar(select(model).where(*where).with_for_update())


def _new_webhook_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def aware(value: datetime | None) -> datetime | None:
    """A stored time as timezone-aware UTC (SQLite drops the zone)."""
    return _aware(value)


def _postgres_utc(dbapi_connection: Any, _record: Any) -> None:
    # PostgreSQL hands a timestamptz back in the session's time zone, the server's own by default
    # (Debian's initdb takes the machine's): make it UTC, the zone every time is shown in
    # ('valid until ... UTC', the API's times), whatever the server's configuration.
    cursor = dbapi_connection.cursor()
    cursor.execute("SET TIME ZONE 'UTC'")
    cursor.close()
    dbapi_connection.commit()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The gateway and the worker are separate processes writing one file: WAL lets readers
    # and a writer proceed together, and the busy timeout waits for a lock instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=10000")
    _use_wal(cursor)
    cursor.execute("PRAGMA foreign_keys=ON")
    # deleted rows (a deleted job, a retired secret) are overwritten with zeros, not left in
    # free pages of the file
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _use_wal(cursor: Any, *, tries: int = 100) -> None:
    """Switch the file to WAL (a setting the file keeps). Switching takes an exclusive lock that
    processes opening a new store together contend for, and SQLite may refuse it at once
    ("database is locked") rather than wait: try again for a few seconds."""
    for attempt in range(tries):
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(0.05)
