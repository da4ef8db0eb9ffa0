"""Unit tests of the service's small pieces: content sniffing, zip checks, webhook signatures,
settings, key format, and the job store (each store test twice: on a SQLite file and on a
PostgreSQL database, conftest's ``store_url``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import service_helpers as h

from app.intake import _check_gradients, check_zip
from app.settings import GatewaySettings
from app.uploads import Part
from core.errors import ArchiveError, GradientError
from core.ingest.archive import collect_inputs
from core.ingest.gradients import read_bvals, read_bvecs
from core.ingest.rules import UploadLimits, check_gradient_counts
from core.ingest.sniff import Kind, sniff
from core.settings import CoreSettings
from service import webhooks
from service.store import key_id_of
from worker.settings import WorkerSettings

REAL = Path(__file__).parent / "data" / "sct_tutorial_dmri"


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (h.nifti_header((4, 4, 2, 3)), Kind.nifti),
        (h.gz(h.nifti_header((4, 4, 2, 3))), Kind.nifti),
        (h.dicom_bytes(), Kind.dicom),
        (h.gz(h.dicom_bytes()), Kind.dicom),
        (b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", Kind.dicom),  # no preamble, explicit VR
        (h.zip_bytes({"a.dcm": b"x"}), Kind.zip),
        (b"0 1000 1000\n", Kind.text),
        (bytes(range(256)), Kind.unknown),
        (b"", Kind.unknown),
    ],
    ids=["nifti", "nifti-gz", "dicom", "dicom-gz", "dicom-no-preamble", "zip", "text", "binary", "empty"],
)
def test_sniffing_goes_by_content(tmp_path: Path, content: bytes, kind: Kind) -> None:
    path = tmp_path / "upload.nii.gz"  # a misleading name on purpose
    path.write_bytes(content)
    assert sniff(path)[0] == kind


def test_the_real_dwi_header_is_read_without_nibabel() -> None:
    kind, dims = sniff(REAL / "dmri.nii.gz")
    assert kind == Kind.nifti and len(dims or ()) == 4
    assert dims[3] == len((REAL / "bvals.txt").read_text().split())  # type: ignore[index]


def test_zip_checks_refuse_traversal_links_and_bombs(tmp_path: Path) -> None:
    limits = UploadLimits(max_files=3, max_total_bytes=1000)
    cases = {
        "traversal": h.zip_bytes({"../x.dcm": b"x"}),
        "absolute": h.zip_bytes({"/etc/x.dcm": b"x"}),
        "link": h.zip_bytes({}, symlink="a.dcm"),
        "entries": h.zip_bytes({f"{i}.dcm": b"x" for i in range(4)}),
        "bomb": h.zip_bytes({"big.dcm": b"\0" * 5000}),
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.zip"
        path.write_bytes(content)
        with pytest.raises(ArchiveError):
            check_zip(path, label=name, limits=limits)
    fine = tmp_path / "fine.zip"
    fine.write_bytes(h.zip_bytes({"dir/a.dcm": b"x", "b.dcm": b"y"}))
    check_zip(fine, label="fine", limits=limits)


def test_webhook_signatures_verify_and_reject_tampering_and_age() -> None:
    body = webhooks.payload(job_id="j1", state="succeeded", artifacts={"report": {}}, problem=None)
    header = webhooks.sign("s3cret", body, timestamp=1_000_000)
    assert webhooks.verify("s3cret", header, body, now=1_000_010)
    assert not webhooks.verify("s3cret", header, body + b" ", now=1_000_010)
    assert not webhooks.verify("other", header, body, now=1_000_010)
    assert not webhooks.verify("s3cret", header, body, now=1_000_000 + webhooks.TOLERANCE_S + 1)
    assert not webhooks.verify("s3cret", "garbage", body)


def test_settings_come_from_prefixed_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SCSNET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SCSNET_MAX_UPLOAD_BYTES", "1234")
    settings = GatewaySettings()
    assert settings.max_upload_bytes == 1234
    assert settings.store_url == f"sqlite:///{tmp_path}/scsnet.db"
    assert settings.broker_url == f"redis+socket://{tmp_path}/redis/redis.sock"
    monkeypatch.setenv("SCSNET_MAX_UPLOAD_BYTES", "-1")
    with pytest.raises(ValueError):
        GatewaySettings()


def test_api_key_ids_parse_only_well_formed_keys() -> None:
    assert key_id_of("scsnet_abc123_x_y-z") == "abc123"
    for bad in ("", "scsnet__x", "other_abc_x", "scsnet_abc", "Bearer x"):
        assert key_id_of(bad) is None


def test_the_visibility_timeout_must_outlast_the_hard_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import WorkerSettings

    monkeypatch.setenv("SCSNET_TIME_LIMIT_S", "100")
    assert WorkerSettings().redelivery_after_s == 200
    monkeypatch.setenv("SCSNET_VISIBILITY_TIMEOUT_S", "101")
    assert WorkerSettings().redelivery_after_s == 101
    monkeypatch.setenv("SCSNET_VISIBILITY_TIMEOUT_S", "100")  # a redelivery could meet the first run alive
    with pytest.raises(ValueError, match="must exceed"):
        WorkerSettings()


class _Broker:
    """A :class:`service.queue.JobQueue` holding messages in memory (what Redis would hold)."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.sent: list[tuple[str, str]] = []

    def send_analysis(self, job_id: str, token: str) -> None:
        self.sent.append((job_id, token))
        self.held.add(job_id)

    def send_webhook(self, job_id: str) -> None: ...

    def send_delivery(self, job_id: str, run: str) -> None: ...

    def depth(self) -> int:
        return len(self.held)

    def ping(self) -> None: ...

    def job_ids_in_broker(self) -> set[str]:
        return set(self.held)


def test_a_running_job_whose_message_is_lost_is_re_sent_and_its_old_run_fenced_off(store_url: str) -> None:
    from app.requeue import dispatch, requeue_lost
    from service.store import Job, JobState, Store

    store, broker, job_id = Store(store_url), _Broker(), "a" * 32
    tenant = store.authenticate(store.create_api_key("t").key)
    assert tenant is not None
    store.create_job(Job(id=job_id, tenant_id=tenant.id, inputs={}))
    dispatch(store, broker, job_id)
    old = broker.sent[-1][1]
    assert store.claim(job_id, old) is not None
    assert requeue_lost(store, broker, grace_s=0) == []  # running; its message waits unacknowledged
    broker.held.clear()  # Redis restarted empty
    assert requeue_lost(store, broker, grace_s=0) == [job_id]
    job = store.get(job_id)
    assert job is not None and job.state == JobState.queued
    fresh = job.dispatch_token
    assert fresh != old and broker.sent[-1] == (job_id, fresh)
    # the old run, were it still alive somewhere, can neither go on, report nor finish
    assert store.claim(job_id, old) is None
    assert store.claim(job_id, fresh) is not None
    assert not store.set_progress(job_id, stage="fit", progress=0.5, token=old)
    assert not store.finish(job_id, JobState.succeeded, token=old)
    assert store.finish(job_id, JobState.succeeded, token=fresh)


def test_only_old_job_folders_without_a_job_are_swept(tmp_path: Path, store_url: str) -> None:
    """A folder left by an upload cut off mid-way goes once untouched for the grace period; a
    job's folder, a fresh upload and anything that is not a job folder stay."""
    import os
    import time

    from app.sweep import sweep_orphans
    from service.storage import Storage
    from service.store import Job, Store

    store, storage = Store(store_url), Storage(tmp_path / "data")
    tenant = store.authenticate(store.create_api_key("t").key)
    assert tenant is not None
    owned, orphan, uploading = "a" * 32, "b" * 32, "c" * 32
    store.create_job(Job(id=owned, tenant_id=tenant.id, inputs={}))
    for job_id in (owned, orphan, uploading):
        storage.input_dir(job_id).mkdir(parents=True)
        (storage.input_dir(job_id) / "part-000000").write_bytes(b"x" * 10)
    (storage.jobs / "not-a-job").mkdir()
    old = time.time() - 7200
    for job_id in (owned, orphan, uploading):
        for path in [storage.job_dir(job_id), *storage.job_dir(job_id).rglob("*")]:
            os.utime(path, (old, old))
    os.utime(storage.input_dir(uploading) / "part-000000")  # still being written
    assert sweep_orphans(store, storage, grace_s=3600) == [orphan]
    assert not storage.job_dir(orphan).exists()
    assert storage.job_dir(owned).exists() and storage.job_dir(uploading).exists() and (storage.jobs / "not-a-job").exists()
    assert sweep_orphans(store, storage, grace_s=3600) == []


def _part(path: Path, field: str) -> Part:
    return Part(field=field, path=path, size=path.stat().st_size)


def _analysis_reads(folder: Path, n_volumes: int) -> None:
    bvals, bvecs = read_bvals(folder / "b.bval"), read_bvecs(folder / "b.bvec")
    check_gradient_counts(n_bvals=len(bvals), n_bvecs=len(bvecs), n_volumes=n_volumes)


@pytest.mark.parametrize(
    ("bval", "bvec", "accepted"),
    [
        ("# b-values written by a scanner export\n0 800 800 800 800 800 800\n", "0 1 0 0 .7 .7 0\n0 0 1 0 .7 0 .7\n0 0 0 1 0 .7 .7\n", True),
        ("0, 800, 800, 800, 800, 800, 800\n", "\n".join("0 0 0" if i == 0 else "1 0 0" for i in range(7)) + "\n", True),
        ("0 800 800\n800 800 800\n", "0 1 0 0 .7 .7 0\n0 0 1 0 .7 0 .7\n0 0 0 1 0 .7 .7\n", False),
        ("0 800 800 800 800 800 -800\n", "0 1 0 0 .7 .7 0\n0 0 1 0 .7 0 .7\n0 0 0 1 0 .7 .7\n", False),
        ("0 800 800 800 800 800 800\n", "0 1 0 0 .7 .7 0\n0 0 1 0 .7 0 .7\n", False),
        ("0 800 800 800 800 800 nan\n", "0 1 0 0 .7 .7 0\n0 0 1 0 .7 0 .7\n0 0 0 1 0 .7 .7\n", False),
        ("0 800 800 800 800 800\n", "0 1 0 0 .7 .7\n0 0 1 0 .7 0\n0 0 0 1 0 .7\n", False),
    ],
)
def test_the_gateway_and_the_analysis_read_gradient_files_by_one_rule(
    tmp_path: Path, bval: str, bvec: str, accepted: bool
) -> None:
    """A gradient table the gateway accepts, the analysis reads; one it refuses, the analysis
    refuses with the same sentence (bar the file's name)."""
    (tmp_path / "b.bval").write_text(bval)
    (tmp_path / "b.bvec").write_text(bvec)
    verdicts = []
    for read in (
        lambda: _check_gradients(_part(tmp_path / "b.bval", "bval"), _part(tmp_path / "b.bvec", "bvec"), 7),
        lambda: _analysis_reads(tmp_path, 7),
    ):
        try:
            read()
            verdicts.append(None)
        except GradientError as exc:
            verdicts.append(exc.detail.replace("(the 'bval' field)", "b.bval").replace("(the 'bvec' field)", "b.bvec"))
    if accepted:
        assert verdicts == [None, None]
    else:
        assert verdicts[0] is not None and verdicts[0] == verdicts[1], verdicts


def test_one_setting_sets_the_upload_limits_of_the_gateway_the_worker_and_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCSNET_MAX_ZIP_ENTRIES", "3")
    monkeypatch.setenv("SCSNET_MAX_ZIP_EXPANDED_BYTES", "5000")
    limits = {type(s).__name__: s.upload_limits for s in (GatewaySettings(), WorkerSettings(), CoreSettings())}
    assert set(limits.values()) == {UploadLimits(max_files=3, max_total_bytes=5000)}, limits
    upload = tmp_path / "four.zip"
    upload.write_bytes(h.zip_bytes({f"{i}.dcm": b"x" for i in range(4)}))
    for name, each in limits.items():
        with pytest.raises(ArchiveError, match="holds 4 files, more than the 3 accepted"):
            check_zip(upload, label="four.zip", limits=each)
        with pytest.raises(ArchiveError, match="holds 4 files, more than the 3 accepted"):
            collect_inputs([upload], workdir=tmp_path / name, limits=each)


def test_the_store_keeps_times_json_unique_keys_and_counts_on_every_backend(store_url: str) -> None:
    """What a PostgreSQL store could get wrong where SQLite forgives: times come back as the UTC
    instants written (the test cluster's own time zone is not UTC), JSON round-trips, unique
    constraints answer as the store promises, UPDATE row counts, the aggregates' types."""
    from datetime import UTC, datetime, timedelta

    from service.store import Job, JobState, Store, aware, utcnow

    store, before = Store(store_url), utcnow()

    def utc(value: datetime | None) -> datetime:
        value = aware(value)
        assert value is not None and value.utcoffset() == timedelta(0), value
        assert before - timedelta(seconds=5) <= value <= utcnow() + timedelta(seconds=5), value
        return value

    assert store.create_tenant("north") is not None and store.create_tenant("north") is None  # unique name
    new = store.create_api_key("north")
    assert not new.tenant_created and new.webhook_secret is None
    tenant = store.authenticate(new.key)
    assert tenant is not None and tenant.name == "north"
    utc(tenant.created_at)
    [(key_id, name, created, revoked)] = store.list_api_keys("north")
    assert (key_id, name, revoked) == (new.key_id, "north", None)
    utc(created)

    inputs = {"kind": "nifti", "files": [{"name": "Ærø ✓.nii.gz", "size": 2**40, "sha256": "ab" * 32}], "nested": {"x": [1.5, None, True]}}
    job, created_job = store.create_job(Job(id="a" * 32, tenant_id=tenant.id, inputs=inputs, idempotency_key="k-1"))
    assert created_job
    again, created_again = store.create_job(Job(id="b" * 32, tenant_id=tenant.id, inputs={}, idempotency_key="k-1"))
    assert (again.id, created_again) == ("a" * 32, False)  # the unique key answered with the first job
    stored = store.get("a" * 32)
    assert stored is not None and stored.inputs == inputs and stored.state == JobState.queued and stored.version == 1
    utc(stored.created_at)
    assert store.queue_position(stored) == 1

    token = store.new_dispatch(job.id)
    assert token is not None and store.new_dispatch("f" * 32) is None  # zero rows updated
    assert store.claim(job.id, token) is not None and store.set_progress(job.id, stage="fit", progress=0.5, token=token)
    artifacts = {"report": {"path": "report.json", "sha256": "cd" * 32, "size": 12}}
    assert store.finish(job.id, JobState.succeeded, artifacts=artifacts, token=token)
    assert not store.finish(job.id, JobState.failed, token=token)  # no longer running: zero rows
    done = store.get(job.id)
    assert done is not None and done.artifacts == artifacts and done.problem is None and done.progress == 1.0
    assert done.duration_s is not None and 0 <= done.duration_s < 60
    assert utc(done.finished_at) >= utc(done.started_at)
    assert store.counts_by_state() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0}
    buckets, count, total = store.duration_histogram()
    assert buckets[-1] == count == 1 and total == done.duration_s and all(isinstance(b, int) for b in buckets)

    review = store.add_review(job.id, verdict="pass", note="fine", key_id=new.key_id)
    assert review is not None and utc(review.at)
    assert store.add_review("f" * 32, verdict="pass", note="", key_id=new.key_id) is None
    assert [j.id for j in store.list_jobs(tenant.id, state=None, before_seq=None, limit=10, review="pass")] == [job.id]
    assert store.list_jobs(tenant.id, state=None, before_seq=None, limit=10, review="none") == []
    assert store.files_due(ended_before=utcnow() + timedelta(hours=1), limit=10) == [job.id]
    store.mark_files_deleted([job.id])
    assert store.files_due(ended_before=utcnow() + timedelta(hours=1), limit=10) == []
    utc(store.get(job.id).files_deleted_at)  # type: ignore[union-attr]

    secret = store.rotate_webhook_secret("north", grace=timedelta(hours=1))
    assert secret is not None and store.rotate_webhook_secret("nobody", grace=timedelta(hours=1)) is None
    fresh = store.tenant(tenant.id)
    assert fresh is not None and fresh.signing_secrets() == [secret, fresh.previous_webhook_secret]
    [(_, tenant_created, live, grace_until)] = store.list_tenants()
    assert live == 1 and utc(tenant_created) and grace_until is not None and grace_until.utcoffset() == timedelta(0)
    assert timedelta(minutes=59) < grace_until - utcnow() <= timedelta(hours=1)
    assert store.retire_expired_secrets() == 0
    assert store.retire_expired_secrets(now=datetime.now(UTC) + timedelta(hours=2)) == 1
    assert store.tenant(tenant.id).signing_secrets() == [secret]  # type: ignore[union-attr]

    store.beat("w1@host", {"model": {"name": "scsnet"}})
    store.beat("w1@host", {"model": {"name": "scsnet", "version": "2"}})
    [beat] = store.workers(seen_within_s=60)
    assert beat.info == {"model": {"name": "scsnet", "version": "2"}} and utc(beat.seen_at)
    assert store.revoke_api_key(new.key_id) and not store.revoke_api_key(new.key_id)
    assert store.authenticate(new.key) is None
    store.delete(job.id)
    assert store.get(job.id) is None and store.reviews(job.id) == []
    store.checkpoint()  # SQLite: the WAL copied back; PostgreSQL: nothing to do
    store.engine.dispose()


def test_concurrent_writes_to_one_job_lose_nothing_on_every_backend(store_url: str) -> None:
    """Webhook deliveries appended and reviews recorded by several threads at once: every
    delivery is kept, every write bumps the version once, exactly one review is the latest."""
    import threading

    from service.store import Job, JobState, Store

    store = Store(store_url)
    tenant = store.authenticate(store.create_api_key("t").key)
    assert tenant is not None
    job, _ = store.create_job(Job(id="a" * 32, tenant_id=tenant.id, inputs={}))
    token = store.new_dispatch(job.id)
    assert token is not None and store.claim(job.id, token) is not None and store.finish(job.id, JobState.succeeded, token=token)
    version = store.get(job.id).version  # type: ignore[union-attr]
    errors: list[BaseException] = []

    def run(work: Any) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - shown by the assertion
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(lambda i=i: store.add_delivery(job.id, {"attempt": i}),)) for i in range(8)]
    threads += [
        threading.Thread(target=run, args=(lambda i=i: store.add_review(job.id, verdict="pass", note=str(i), key_id="k"),))
        for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    final = store.get(job.id)
    assert final is not None and sorted(d["attempt"] for d in final.deliveries) == list(range(8))
    assert final.version == version + 16
    reviews = store.reviews(job.id)
    assert len(reviews) == 8 and [r.latest for r in reviews].count(True) == 1
    assert store.latest_review(job.id).id == reviews[-1].id  # type: ignore[union-attr]
    store.engine.dispose()
