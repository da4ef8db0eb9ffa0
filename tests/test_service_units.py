"""Unit tests of the service's small pieces: content sniffing, zip checks, webhook signatures,
settings, key format."""

from __future__ import annotations

from pathlib import Path

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

    def depth(self) -> int:
        return len(self.held)

    def ping(self) -> None: ...

    def job_ids_in_broker(self) -> set[str]:
        return set(self.held)


def test_a_running_job_whose_message_is_lost_is_re_sent_and_its_old_run_fenced_off(tmp_path: Path) -> None:
    from app.requeue import dispatch, requeue_lost
    from service.store import Job, JobState, Store

    store, broker, job_id = Store(f"sqlite:///{tmp_path / 'jobs.db'}"), _Broker(), "a" * 32
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


def test_only_old_job_folders_without_a_job_are_swept(tmp_path: Path) -> None:
    """A folder left by an upload cut off mid-way goes once untouched for the grace period; a
    job's folder, a fresh upload and anything that is not a job folder stay."""
    import os
    import time

    from app.sweep import sweep_orphans
    from service.storage import Storage
    from service.store import Job, Store

    store, storage = Store(f"sqlite:///{tmp_path / 'jobs.db'}"), Storage(tmp_path / "data")
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
