"""The gateway's hardening against nosy tenants and abusive clients, in-process (FastAPI
TestClient) on a real SQLite file and a real Redis: failed authentication throttled per client
address, ``no-store`` and ``nosniff`` on every ``/v1`` answer, opaque signed list cursors, the
per-tenant queue position, the optional /metrics token, and the docs that can be switched off.
(Slow clients, which need a real server and raw sockets: tests/test_slow_clients.py.)"""

from __future__ import annotations

import base64
import json
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import service_helpers as h
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.cursors import KEY_FILE, Cursors
from app.main import create_app
from app.settings import GatewaySettings
from app.throttle import AuthThrottle
from core.outputs import OUTPUTS, describe_outputs
from service.storage import Storage
from service.store import Job, JobState, Store

WINDOW_S = 3.0
LIMIT = 10


@pytest.fixture()
def settings(tmp_path: Path, redis_server: h.RedisServer) -> GatewaySettings:
    return GatewaySettings(
        data_dir=tmp_path / "var", redis_url=redis_server.url, auth_failures_max=LIMIT, auth_failure_window_s=WINDOW_S
    )


def _job(store: Store, storage: Storage, tenant_id: int, state: JobState = JobState.queued) -> str:
    """A job of ``tenant_id`` put in ``state`` through the store, as the gateway and a worker would."""
    job_id = uuid.uuid4().hex
    inputs = {"kind": "nifti", "paths": ["dwi.nii.gz"], "bval": "dwi.bval", "bvec": "dwi.bvec", "files": []}
    store.create_job(Job(id=job_id, tenant_id=tenant_id, inputs=inputs))
    token = store.new_dispatch(job_id)
    if state == JobState.queued:
        return job_id
    assert token is not None and store.claim(job_id, token) is not None
    out = storage.out_dir(job_id)
    out.mkdir(parents=True)
    for artifact in OUTPUTS:
        (out / artifact.filename).write_bytes(json.dumps({"artifact": artifact.key}).encode())
    assert store.finish(job_id, JobState.succeeded, artifacts=describe_outputs(out))
    return job_id


def _tenant(store: Store, name: str) -> tuple[int, dict[str, str]]:
    key = store.create_api_key(name).key
    tenant = store.authenticate(key)
    assert tenant is not None
    return tenant.id, {"Authorization": f"Bearer {key}"}


# --- failed authentication throttled per address ---------------------------------------------


def test_wrong_keys_are_throttled_per_address_but_a_valid_key_still_works(service, capsys) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    _, good = _tenant(store, "a")
    statuses: list[int] = []
    retry_after: set[str] = set()
    valid_s: list[float] = []
    start = time.monotonic()
    good_id = good["Authorization"].split("_")[1]
    for n in range(300):
        # unknown key ids, and the valid key's id with a wrong secret
        wrong_key = f"scsnet_{n:012x}_{'x' * 43}" if n % 2 else f"scsnet_{good_id}_{n:043d}"
        wrong = client.get("/v1/jobs", headers={"Authorization": f"Bearer {wrong_key}"})
        statuses.append(wrong.status_code)
        if wrong.status_code == 429:
            assert h.problem_of(wrong)["type"].endswith("/too-many-failed-attempts")
            retry_after.add(wrong.headers["retry-after"])
        if n % 30 == 29:  # a valid key from the same address, during the attack
            t0 = time.perf_counter()
            assert client.get("/v1/jobs", headers=good).status_code == 200
            valid_s.append(time.perf_counter() - t0)
    attack_s = time.monotonic() - start
    with capsys.disabled():
        print(
            f"\nthrottle: 300 wrong keys in {attack_s:.1f} s (limit {LIMIT} per {WINDOW_S:g} s): {statuses.count(429)} got 429, "
            f"{statuses.count(401)} got 401; valid key during the attack: {1000 * max(valid_s):.1f} ms at most, "
            f"{1000 * sum(valid_s) / len(valid_s):.1f} ms mean"
        )
    assert set(statuses) == {401, 429} and statuses[:LIMIT] == [401] * LIMIT and statuses[LIMIT] == 429
    # at most LIMIT failures are heard per window
    assert statuses.count(401) <= LIMIT * (1 + int(attack_s / WINDOW_S) + 1)
    assert statuses.count(429) >= 200
    assert retry_after and all(1 <= int(r) <= WINDOW_S + 1 for r in retry_after)
    assert max(valid_s) < 0.5
    # throttled: a missing key is 429 too (nothing to check), another scheme as well
    assert client.get("/v1/jobs").status_code == 429
    time.sleep(WINDOW_S + 0.2)
    again = client.get("/v1/jobs", headers={"Authorization": "Bearer scsnet_nope_nope"})
    assert again.status_code == 401 and h.problem_of(again)["type"].endswith("/unauthorized")


def test_the_throttle_remembers_a_bounded_number_of_addresses() -> None:
    now = [0.0]
    throttle = AuthThrottle(limit=3, window_s=60, max_addresses=100, clock=lambda: now[0])
    for n in range(10_000):
        throttle.failed(f"10.0.{n // 256}.{n % 256}")
    assert len(throttle) == 100
    for _ in range(3):
        throttle.failed("192.0.2.1")
    assert throttle.retry_after_s("192.0.2.1") == 60 and throttle.retry_after_s("192.0.2.2") is None
    now[0] = 59.5
    assert throttle.retry_after_s("192.0.2.1") == 1
    now[0] = 60.0
    assert throttle.retry_after_s("192.0.2.1") is None
    assert AuthThrottle(limit=0, window_s=60, max_addresses=1).retry_after_s("x") is None


# --- no-store, nosniff -------------------------------------------------------------------------


def _paths_under_v1(client: TestClient) -> list[tuple[str, str]]:
    document = client.get("/openapi.json").json()
    return [(m.upper(), p) for p, item in document["paths"].items() if p.startswith("/v1") for m in item]


def test_every_v1_answer_is_no_store_and_nosniff(service, settings: GatewaySettings) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    storage = Storage(settings.data_root)
    tenant_id, a = _tenant(store, "a")
    done = _job(store, storage, tenant_id, JobState.succeeded)
    answers: dict[str, Any] = {}
    for method, path in _paths_under_v1(client):
        url = path.replace("{job_id}", done if method != "DELETE" else _job(store, storage, tenant_id))
        if method == "POST":
            answers[f"{method} {path}"] = client.post(url, files={"files": ("x.bin", b"not a study")}, headers=a)
        elif method == "PUT":
            answers[f"{method} {path}"] = client.put(url, json={"verdict": "pass"}, headers=a)
        else:
            answers[f"{method} {path}"] = client.request(method, url, headers=a)
        answers[f"{method} {path} without a key"] = client.request(method, url)
    job = client.get(f"/v1/jobs/{done}", headers=a)
    report = client.get(f"/v1/jobs/{done}/report", headers=a)
    answers["304 job"] = client.get(f"/v1/jobs/{done}", headers={**a, "If-None-Match": job.headers["etag"]})
    answers["304 download"] = client.get(f"/v1/jobs/{done}/report", headers={**a, "If-None-Match": report.headers["etag"]})
    answers["HEAD download"] = client.head(f"/v1/jobs/{done}/labels", headers=a)
    answers["404 problem"] = client.get("/v1/nothing-here", headers=a)
    answers["404 job"] = client.get("/v1/jobs/" + "0" * 32, headers=a)
    answers["405"] = client.patch("/v1/jobs", headers=a)
    answers["422"] = client.get("/v1/jobs?limit=0", headers=a)
    assert answers["304 job"].status_code == answers["304 download"].status_code == 304  # ETags still work
    assert answers["404 problem"].status_code == 404 and answers["GET /v1/jobs without a key"].status_code == 401
    assert report.status_code == 200 and report.headers["etag"] and "attachment" in report.headers["content-disposition"]
    assert len(answers) > 40
    for what, response in answers.items():
        assert response.headers.get("cache-control") == "no-store", f"{what}: {response.status_code} {response.headers}"
        assert response.headers.get("x-content-type-options") == "nosniff", f"{what}: {response.headers}"
        assert len(response.headers.get_list("cache-control")) == 1, what
    assert "no-store" not in client.get("/healthz").headers.get("cache-control", "")  # /v1 only


# --- tenants stay invisible to each other --------------------------------------------------------


def test_the_queue_position_counts_only_the_tenants_own_jobs(service, settings: GatewaySettings) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    storage = Storage(settings.data_root)
    tenant_a, a = _tenant(store, "a")
    tenant_b, b = _tenant(store, "b")
    a_jobs = [_job(store, storage, tenant_a) for _ in range(3)]
    b_job = _job(store, storage, tenant_b)
    a_late = _job(store, storage, tenant_a)
    assert client.get(f"/v1/jobs/{b_job}", headers=b).json()["queue_position"] == 1
    assert [client.get(f"/v1/jobs/{j}", headers=a).json()["queue_position"] for j in [*a_jobs, a_late]] == [1, 2, 3, 4]


def _cursor_of(client: TestClient, headers: dict[str, str]) -> str:
    page = client.get("/v1/jobs", params={"limit": 1}, headers=headers).json()
    assert page["next_cursor"], page
    return str(page["next_cursor"])


def test_cursors_are_opaque_signed_and_bound_to_their_tenant(service, settings: GatewaySettings) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    storage = Storage(settings.data_root)
    tenant_a, a = _tenant(store, "a")
    tenant_b, b = _tenant(store, "b")
    for _ in range(2):
        _job(store, storage, tenant_a)
        _job(store, storage, tenant_b)
    cursor = _cursor_of(client, a)
    assert client.get("/v1/jobs", params={"cursor": cursor}, headers=a).status_code == 200
    # another tenant's cursor
    foreign = client.get("/v1/jobs", params={"cursor": cursor}, headers=b)
    assert foreign.status_code == 400 and h.problem_of(foreign)["type"].endswith("/invalid-cursor")
    # any one character changed
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i in range(len(cursor)):
        changed = cursor[:i] + alphabet[(alphabet.index(cursor[i]) + 1) % 64] + cursor[i + 1 :]
        response = client.get("/v1/jobs", params={"cursor": changed}, headers=a)
        assert response.status_code == 400, (i, changed)
    # the seq does not show: not base64 of a number, not the number's bytes
    raw = base64.urlsafe_b64decode(cursor + "==")
    seqs = [j.seq for j in store.list_jobs(tenant_a, state=None, before_seq=None, limit=10)]
    assert len(raw) == 24 and not raw.isdigit()  # the old form was base64 of the seq's digits
    assert not any(s.to_bytes(8, "big") in raw or s.to_bytes(8, "little") in raw for s in seqs)
    # the old form (base64 of the seq) is refused now
    old = base64.urlsafe_b64encode(str(max(seqs)).encode()).decode().rstrip("=")
    assert client.get("/v1/jobs", params={"cursor": old}, headers=a).status_code == 400


def test_the_signing_key_is_made_once_owner_only_and_shared_by_gateways_on_the_data_dir(
    settings: GatewaySettings, redis_server: h.RedisServer
) -> None:
    store = Store(settings.store_url)
    storage = Storage(settings.data_root)
    tenant_a, a = _tenant(store, "a")
    for _ in range(2):
        _job(store, storage, tenant_a)
    with TestClient(create_app(settings, store=store)) as first:
        cursor = _cursor_of(first, a)
    key_file = settings.data_root / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key_file.read_bytes()) == 32
    assert [p.name for p in settings.data_root.iterdir() if p.name.startswith(".")] == []  # no temporary left
    with TestClient(create_app(settings, store=store)) as second:  # another gateway, same data dir
        assert second.get("/v1/jobs", params={"cursor": cursor}, headers=a).status_code == 200
    configured = settings.model_copy(update={"signing_key": SecretStr("a configured key of enough length")})
    with TestClient(create_app(configured, store=store)) as third:  # SCSNET_SIGNING_KEY wins over the file
        assert third.get("/v1/jobs", params={"cursor": cursor}, headers=a).status_code == 400
        assert third.get("/v1/jobs", params={"cursor": _cursor_of(third, a)}, headers=a).status_code == 200


def test_concurrent_gateways_agree_on_one_key(tmp_path: Path) -> None:
    import threading

    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(Cursors(folder=tmp_path).key)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and (tmp_path / KEY_FILE).read_bytes() == keys[0]


# --- /metrics token, docs switch ---------------------------------------------------------------


@pytest.fixture()
def app_with(settings: GatewaySettings) -> Iterator[Any]:
    clients: list[TestClient] = []

    def make(**changes: Any) -> TestClient:
        client = TestClient(create_app(settings.model_copy(update=changes), store=Store(settings.store_url)))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_metrics_are_open_without_a_token_and_want_it_when_one_is_set(app_with) -> None:  # type: ignore[no-untyped-def]
    assert app_with().get("/metrics").status_code == 200

    client = app_with(metrics_token=SecretStr("s3cret-scrape-token"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-scrape-token"}, {"Authorization": "Basic czNjcmV0"}):
        refused = client.get("/metrics", headers=headers)
        assert refused.status_code == 401, headers
        assert h.problem_of(refused)["type"].endswith("/unauthorized") and refused.headers["www-authenticate"].startswith("Bearer")
    allowed = client.get("/metrics", headers={"Authorization": "Bearer s3cret-scrape-token"})
    assert allowed.status_code == 200 and "scsnet_http_requests_total" in allowed.text


def test_the_docs_can_be_switched_off(app_with) -> None:  # type: ignore[no-untyped-def]
    on = app_with()
    assert all(on.get(p).status_code == 200 for p in ("/docs", "/redoc", "/openapi.json"))
    off = app_with(docs_enabled=False)
    for path in ("/docs", "/redoc", "/openapi.json"):
        response = off.get(path)
        assert response.status_code == 404 and h.problem_of(response)["type"].endswith("/not-found")
    assert off.get("/healthz").status_code == 200
