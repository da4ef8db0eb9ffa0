"""Retention of job files (service.retention, SCSNET_RETENTION_DAYS, SCSNET_KEEP_INPUTS) with
real files and a real SQLite store: the purge pass, 410 for purged downloads, inputs deleted on
cancel and after success (a real ``scsnet serve``), and deleted data gone from the SQLite
file and its write-ahead log."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import service_helpers as h
from sqlalchemy import update

from app.settings import GatewaySettings
from core.outputs import OUTPUTS, describe_outputs
from core.settings import SHIPPED_MODEL_DIR
from service.retention import purge_expired
from service.storage import Storage
from service.store import Job, JobState, Store, utcnow

REAL = Path(__file__).parent / "data" / "sct_tutorial_dmri"
DAYS = 7.0


@pytest.fixture()
def settings(tmp_path: Path, redis_server: h.RedisServer) -> GatewaySettings:
    redis_server.client().flushall()
    return GatewaySettings(data_dir=tmp_path / "var", redis_url=redis_server.url, retention_days=DAYS)


def _ended_job(store: Store, storage: Storage, tenant_id: int, *, state: JobState, ended_days_ago: float | None) -> str:
    """A job in ``state`` with an input and (if succeeded) every output on disk, which ended
    ``ended_days_ago`` (None: has not ended)."""
    job, _ = store.create_job(Job(id=uuid.uuid4().hex, tenant_id=tenant_id, inputs={"kind": "nifti"}))
    storage.input_dir(job.id).mkdir(parents=True)
    (storage.input_dir(job.id) / "dwi.nii.gz").write_bytes(b"patient data")
    if state != JobState.queued:
        token = store.new_dispatch(job.id)
        assert token and store.claim(job.id, token)
    artifacts = None
    if state == JobState.succeeded:
        out = storage.out_dir(job.id)
        out.mkdir(parents=True)
        for artifact in OUTPUTS:
            (out / artifact.filename).write_text(artifact.key * 10)
        artifacts = describe_outputs(out)
    if state in (JobState.succeeded, JobState.failed):
        assert store.finish(job.id, state, artifacts=artifacts)
    elif state == JobState.cancelled:
        assert store.cancel(job.id)
    if ended_days_ago is not None:
        with store.session() as s:
            s.execute(update(Job).where(Job.id == job.id).values(finished_at=utcnow() - timedelta(days=ended_days_ago)))
    return job.id


def _tenant(store: Store, name: str = "t") -> tuple[int, dict[str, str]]:
    new = store.create_api_key(name)
    tenant = store.authenticate(new.key)
    assert tenant is not None
    return tenant.id, {"Authorization": f"Bearer {new.key}"}


def test_the_purge_deletes_the_files_of_jobs_ended_long_ago_and_keeps_their_records(tmp_path: Path) -> None:
    store, storage = Store(f"sqlite:///{tmp_path / 'jobs.db'}"), Storage(tmp_path / "data")
    tenant_id, _ = _tenant(store)
    old = [
        _ended_job(store, storage, tenant_id, state=JobState.succeeded, ended_days_ago=DAYS + 1),
        _ended_job(store, storage, tenant_id, state=JobState.failed, ended_days_ago=DAYS + 2),
        _ended_job(store, storage, tenant_id, state=JobState.cancelled, ended_days_ago=DAYS + 3),
    ]
    young = _ended_job(store, storage, tenant_id, state=JobState.succeeded, ended_days_ago=DAYS - 1)
    queued = _ended_job(store, storage, tenant_id, state=JobState.queued, ended_days_ago=None)
    assert len({*old, young, queued}) == 5 and all(storage.job_dir(i).is_dir() for i in (*old, young, queued))

    assert purge_expired(store, storage, None) == []  # no retention period: everything is kept
    assert sorted(purge_expired(store, storage, DAYS, batch=2)) == sorted(old)  # two batches
    for job_id in old:
        job = store.get(job_id)
        assert not storage.job_dir(job_id).exists()
        assert job is not None and job.files_deleted_at is not None and job.state in ("succeeded", "failed", "cancelled")
    kept = store.get(old[0])
    assert kept is not None and kept.artifacts and kept.inputs == {"kind": "nifti"}  # digests stay in the record
    assert (storage.out_dir(young) / "report.json").is_file() and (storage.input_dir(queued) / "dwi.nii.gz").is_file()
    assert purge_expired(store, storage, DAYS) == []  # nothing twice
    # a shorter period, later: the young one goes too
    assert purge_expired(store, storage, DAYS, now=utcnow() + timedelta(days=2)) == [young]
    assert storage.job_dir(queued).is_dir()


def test_the_job_view_dates_the_deletion_and_a_purged_download_is_410(service, settings: GatewaySettings) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    storage = Storage(settings.data_root)
    tenant_id, auth = _tenant(store)
    job_id = _ended_job(store, storage, tenant_id, state=JobState.succeeded, ended_days_ago=1)
    view = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert view["files_deleted_at"] is None and view["files_expire_at"] is not None
    expires, finished = datetime.fromisoformat(view["files_expire_at"]), datetime.fromisoformat(view["finished_at"])
    assert expires - finished == timedelta(days=DAYS)
    assert client.get(f"/v1/jobs/{job_id}/report", headers=auth).status_code == 200

    assert purge_expired(store, storage, DAYS, now=utcnow() + timedelta(days=DAYS)) == [job_id]
    view = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert view["files_deleted_at"] is not None and view["files_expire_at"] is None
    assert view["state"] == "succeeded" and set(view["links"]) == {"self"}
    for artifact in OUTPUTS:
        gone = client.get(f"/v1/jobs/{job_id}/{artifact.key}", headers=auth)
        problem = h.problem_of(gone)
        assert gone.status_code == 410 and problem["type"].endswith("/files-deleted"), artifact.key
        assert "retention period" in problem["detail"]
    running = _ended_job(store, storage, tenant_id, state=JobState.running, ended_days_ago=None)
    assert client.get(f"/v1/jobs/{running}", headers=auth).json()["files_expire_at"] is None


def test_cancelling_a_job_deletes_its_upload(service, settings: GatewaySettings) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    _, auth = _tenant(store)
    files = [
        ("files", ("dmri.nii.gz", (REAL / "dmri.nii.gz").read_bytes())),
        ("bval", ("bvals.txt", (REAL / "bvals.txt").read_bytes())),
        ("bvec", ("bvecs.txt", (REAL / "bvecs.txt").read_bytes())),
    ]
    job = client.post("/v1/jobs", files=files, headers=auth).json()  # no worker: it stays queued
    upload = Storage(settings.data_root).input_dir(job["id"])
    assert job["state"] == "queued" and any(upload.iterdir())
    cancelled = client.delete(f"/v1/jobs/{job['id']}", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert not upload.exists()
    assert cancelled.json()["input"]["files"]  # the record keeps what was uploaded (digests)


def test_the_workers_cancel_path_deletes_outputs_and_inputs(tmp_path: Path) -> None:
    from worker.tasks import _drop_outputs_if_cancelled

    store, storage = Store(f"sqlite:///{tmp_path / 'jobs.db'}"), Storage(tmp_path / "data")
    tenant_id, _ = _tenant(store)
    job_id = _ended_job(store, storage, tenant_id, state=JobState.running, ended_days_ago=None)
    storage.out_dir(job_id).mkdir(parents=True)
    _drop_outputs_if_cancelled(store, storage, job_id)  # still running (re-sent elsewhere): keep
    assert storage.input_dir(job_id).is_dir() and storage.out_dir(job_id).is_dir()
    assert store.cancel(job_id)
    _drop_outputs_if_cancelled(store, storage, job_id)
    assert not storage.input_dir(job_id).exists() and not storage.out_dir(job_id).exists()


def _sqlite_bytes(path: Path) -> bytes:
    wal = path.with_name(path.name + "-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def test_a_deleted_job_and_a_retired_secret_leave_no_trace_in_the_sqlite_files(tmp_path: Path) -> None:
    path = tmp_path / "scsnet.db"
    store = Store(f"sqlite:///{path}")
    marker = "zebra-quartz-7731-distinctive"
    new = store.create_api_key("t")
    tenant = store.authenticate(new.key)
    assert tenant is not None and new.webhook_secret
    job, _ = store.create_job(
        Job(id="d" * 32, tenant_id=tenant.id, idempotency_key=marker, callback_url=f"https://hooks.example.org/{marker}", inputs={"note": marker})
    )
    for _ in range(3):  # rewritten a few times, as a job record is
        store.forget_idempotency_key(job.id)
    assert marker.encode() in _sqlite_bytes(path)  # the test can see it while it is there
    assert store.cancel(job.id)
    store.delete(job.id)
    store.checkpoint()
    assert marker.encode() not in _sqlite_bytes(path)
    assert path.with_name("scsnet.db-wal").stat().st_size == 0  # truncated

    old_secret = new.webhook_secret
    assert store.rotate_webhook_secret("t", grace=timedelta(0)) is not None
    store.checkpoint()
    assert old_secret.encode() not in _sqlite_bytes(path)


@pytest.mark.service
def test_keep_inputs_false_deletes_the_upload_once_the_analysis_succeeded(tmp_path: Path) -> None:
    data = h.short_tmpdir("scsk") / "var"
    served = h.start_serve(data, model_dir=SHIPPED_MODEL_DIR, extra_env={"SCSNET_KEEP_INPUTS": "false"})
    try:
        key, secret = h.create_key(data, "north")
        assert secret is not None  # a new tenant: its secret printed this once
        files = [
            ("files", ("dmri.nii.gz", (REAL / "dmri.nii.gz").read_bytes())),
            ("bval", ("bvals.txt", (REAL / "bvals.txt").read_bytes())),
            ("bvec", ("bvecs.txt", (REAL / "bvecs.txt").read_bytes())),
        ]
        with served.client(key) as client:
            job_id = client.post("/v1/jobs", files=files).json()["id"]

            def ended() -> dict | None:  # type: ignore[type-arg]
                job = client.get(f"/v1/jobs/{job_id}").json()
                return job if job["state"] in ("succeeded", "failed") else None

            job = h.wait_until(ended, timeout_s=120, what="the analysis", interval_s=0.1)
            assert job["state"] == "succeeded", job["problem"]
            # the worker deletes the upload right after recording the success
            h.wait_until(lambda: not (data / "jobs" / job_id / "input").exists(), timeout_s=10, what="the upload to go")
            assert (data / "jobs" / job_id / "out" / "report.json").is_file()
            report = client.get(job["links"]["report"])
            assert report.status_code == 200 and json.loads(report.content)["model"]["name"] == "scsnet"
            assert job["input"]["files"] and all(f["sha256"] for f in job["input"]["files"])
            assert client.get(f"/v1/jobs/{job_id}").json()["files_deleted_at"] is None  # outputs are still there
    finally:
        assert served.stop() == 0, served.log_path.read_text()[-3000:]
