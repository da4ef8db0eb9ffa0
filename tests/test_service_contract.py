"""The service contract under real and hostile use (issue 21), against the ASGI app with a real
SQLite job store and a real Redis server: idempotency keys (IETF Idempotency-Key draft),
conditional downloads, no 500 for malformed input, webhook links and signature, offline docs and
per-route metrics. No worker runs: jobs are moved on through the store, as a worker would."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest
import service_helpers as h
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.main import create_app
from app.problems import DETAIL_MAX_CHARS
from app.settings import GatewaySettings
from core.outputs import OUTPUTS, describe_outputs
from core.report.page_policy import REVIEW_MARKER
from service import webhooks
from service.errors import InvalidRequest
from service.storage import Storage
from service.store import Job, JobState, Store, utcnow

REAL = Path(__file__).parent / "data" / "sct_tutorial_dmri"


@pytest.fixture()
def settings(tmp_path: Path, redis_server: h.RedisServer) -> GatewaySettings:
    redis_server.client().flushall()
    # allow_private_networks: callback URLs are kept without a DNS lookup (refusals: tests/test_delivery.py)
    return GatewaySettings(
        data_dir=tmp_path / "var", redis_url=redis_server.url, max_upload_bytes=8 * 1024 * 1024, allow_private_networks=True
    )


def _study(bvals: bytes | None = None) -> list[tuple[str, tuple[str, bytes]]]:
    return [
        ("files", ("dmri.nii.gz", (REAL / "dmri.nii.gz").read_bytes())),
        ("bval", ("bvals.txt", bvals if bvals is not None else (REAL / "bvals.txt").read_bytes())),
        ("bvec", ("bvecs.txt", (REAL / "bvecs.txt").read_bytes())),
    ]


def _job_folders(settings: GatewaySettings) -> set[str]:
    jobs = settings.data_root / "jobs"
    return {p.name for p in jobs.iterdir()} if jobs.exists() else set()


# --- 1. idempotency -----------------------------------------------------------------------


def test_a_reused_idempotency_key_with_another_request_is_422_and_keeps_nothing(service, settings) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    a = h.bearer(store, "a")
    first = client.post("/v1/jobs", files=_study(), headers={**a, "Idempotency-Key": "k-1"})
    assert first.status_code == 202
    digest = store.get(first.json()["id"]).inputs["request_sha256"]  # type: ignore[union-attr]
    assert len(digest) == 64
    folders = _job_folders(settings)
    bvals = (REAL / "bvals.txt").read_bytes()
    for files, data in (
        (_study(bvals=bvals + b"\n"), None),  # one byte more in the b-values: another study
        (_study()[:1], None),  # fewer parts
        (_study(), {"callback_url": "https://example.org/hook"}),  # another field
    ):
        again = client.post("/v1/jobs", files=files, data=data, headers={**a, "Idempotency-Key": "k-1"})
        assert again.status_code == 422, again.text
        assert h.problem_of(again)["type"] == "https://scsnet.dev/problems/idempotency-key-reused"
    # the same request (files in another order of fields included) is still a replay
    reordered = [_study()[2], _study()[0], _study()[1]]
    replay = client.post("/v1/jobs", files=reordered, headers={**a, "Idempotency-Key": "k-1"})
    assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
    assert replay.headers["idempotent-replayed"] == "true"
    assert len(client.get("/v1/jobs", headers=a).json()["items"]) == 1
    assert _job_folders(settings) == folders  # nothing of the refused or replayed uploads is left


def test_a_key_still_being_received_is_409(settings: GatewaySettings) -> None:
    store = Store(settings.store_url)
    app = create_app(settings, store=store)
    auth = h.bearer(store, "a")
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="dmri.nii.gz"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    image = (REAL / "dmri.nii.gz").read_bytes()

    def part(name: str, data: bytes) -> bytes:
        return f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n\r\n'.encode() + data

    tail = part("bval", (REAL / "bvals.txt").read_bytes()) + part("bvec", (REAL / "bvecs.txt").read_bytes())
    tail += f"\r\n--{boundary}--\r\n".encode()

    async def scenario() -> tuple[int, int, int, str]:
        halfway, release = asyncio.Event(), asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield head + image[: len(image) // 2]
            halfway.set()
            await release.wait()  # the first upload is still arriving...
            yield image[len(image) // 2 :] + tail

        headers = {**auth, "Idempotency-Key": "slow", "Content-Type": f"multipart/form-data; boundary={boundary}"}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
            first = asyncio.create_task(client.post("/v1/jobs", content=slow_body(), headers=headers))
            await asyncio.wait_for(halfway.wait(), 30)
            await asyncio.sleep(0.2)
            second = await client.post("/v1/jobs", files=_study(), headers={**auth, "Idempotency-Key": "slow"})
            other_key = await client.post("/v1/jobs", files=_study(), headers={**auth, "Idempotency-Key": "other"})
            release.set()
            done = await asyncio.wait_for(first, 60)
            return second.status_code, other_key.status_code, done.status_code, second.text

    conflict, other, first, text = asyncio.run(scenario())
    assert conflict == 409, text
    assert json.loads(text)["type"] == "https://scsnet.dev/problems/idempotency-key-in-use"
    assert other == 202 and first == 202
    assert app.state.idempotency_in_flight == set()


def test_after_the_replay_window_the_key_starts_a_new_job(service, settings) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    a = h.bearer(store, "a")
    first = client.post("/v1/jobs", files=_study(), headers={**a, "Idempotency-Key": "k-old"}).json()
    with store.session() as s:  # the first request was made longer ago than the window
        s.execute(update(Job).where(Job.id == first["id"]).values(created_at=utcnow() - timedelta(seconds=settings.idempotency_window_s + 60)))
    again = client.post("/v1/jobs", files=_study(), headers={**a, "Idempotency-Key": "k-old"})
    assert again.status_code == 202 and again.json()["id"] != first["id"]
    assert "idempotent-replayed" not in again.headers
    assert store.get(first["id"]).idempotency_key is None  # type: ignore[union-attr]
    assert store.get(again.json()["id"]).idempotency_key == "k-old"  # type: ignore[union-attr]


def test_the_replay_window_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings().idempotency_window_s == 24 * 3600
    monkeypatch.setenv("SCSNET_IDEMPOTENCY_WINDOW_S", "60")
    assert GatewaySettings().idempotency_window_s == 60


# --- 2. conditional downloads -------------------------------------------------------------


def _succeeded(store: Store, settings: GatewaySettings, tenant: str) -> tuple[str, dict[str, str]]:
    headers = h.bearer(store, tenant)
    tenant_id = store.authenticate(headers["Authorization"].split()[1]).id  # type: ignore[union-attr]
    job_id = uuid.uuid4().hex
    store.create_job(Job(id=job_id, tenant_id=tenant_id, inputs={"kind": "nifti", "paths": [], "files": []}))
    token = store.new_dispatch(job_id)
    assert token is not None and store.claim(job_id, token) is not None
    out = Storage(settings.data_root).out_dir(job_id)
    out.mkdir(parents=True)
    for artifact in OUTPUTS:
        content = f"<html><body>{REVIEW_MARKER}</body></html>" if artifact.key == "qc.html" else artifact.key * 100
        (out / artifact.filename).write_text(content)
    assert store.finish(job_id, JobState.succeeded, artifacts=describe_outputs(out), token=token)
    return job_id, headers


def test_every_output_answers_if_none_match_if_modified_since_and_head(service, settings) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    job_id, auth = _succeeded(store, settings, "a")
    job = store.get(job_id)
    assert job is not None
    for artifact in OUTPUTS:
        url = f"/v1/jobs/{job_id}/{artifact.key}"
        full = client.get(url, headers=auth)
        assert full.status_code == 200, url
        tag, modified = full.headers["etag"], full.headers["last-modified"]
        assert tag == f'"{hashlib.sha256(full.content).hexdigest()}"'  # strong, the bytes' digest
        assert tag.strip('"') == job.artifacts[artifact.key]["sha256"]
        for condition in ({"If-None-Match": tag}, {"If-None-Match": "*"}, {"If-None-Match": f'"x", W/{tag}'}, {"If-Modified-Since": modified}):
            cached = client.get(url, headers={**auth, **condition})
            assert cached.status_code == 304 and cached.content == b"", (url, condition)
            assert cached.headers["etag"] == tag
        stale = {"If-None-Match": '"other"', "If-Modified-Since": modified}  # If-None-Match wins
        assert client.get(url, headers={**auth, **stale}).status_code == 200
        earlier = format_datetime(job.finished_at.replace(tzinfo=None) - timedelta(hours=1), usegmt=False)  # type: ignore[union-attr]
        assert client.get(url, headers={**auth, "If-Modified-Since": earlier}).status_code == 200
        assert client.get(url, headers={**auth, "If-Modified-Since": "not a date"}).status_code == 200
        head = client.head(url, headers=auth)
        assert head.status_code == 200 and head.content == b"", url
        assert head.headers["etag"] == tag and int(head.headers["content-length"]) == len(full.content)
    other = h.bearer(store, "b")
    assert client.head(f"/v1/jobs/{job_id}/report", headers=other).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/report", headers={**other, "If-None-Match": "*"}).status_code == 404


def test_the_reviewed_qc_page_is_validated_by_the_digest_of_the_bytes_served(service, settings) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    job_id, auth = _succeeded(store, settings, "a")
    url = f"/v1/jobs/{job_id}/qc.html"
    before = client.get(url, headers=auth).headers["etag"]
    assert client.put(f"/v1/jobs/{job_id}/review", json={"verdict": "pass", "note": "fine"}, headers=auth).status_code == 200
    page = client.get(url, headers=auth)
    tag = page.headers["etag"]
    assert b"Review: pass" in page.content and tag != before
    assert tag == f'"{hashlib.sha256(page.content).hexdigest()}"'
    assert page.headers["repr-digest"] == f"sha-256=:{base64.b64encode(hashlib.sha256(page.content).digest()).decode()}:"
    assert client.get(url, headers={**auth, "If-None-Match": before}).status_code == 200  # the old page is stale
    cached = client.get(url, headers={**auth, "If-None-Match": tag})
    assert cached.status_code == 304 and cached.headers["content-security-policy"]
    assert client.get(url, headers={**auth, "If-Modified-Since": page.headers["last-modified"]}).status_code == 304
    head = client.head(url, headers=auth)
    assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == tag
    assert int(head.headers["content-length"]) == len(page.content)


def test_if_none_match_star_on_the_job_view(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    a = h.bearer(store, "a")
    job = client.post("/v1/jobs", files=_study(), headers=a).json()
    cached = client.get(f"/v1/jobs/{job['id']}", headers={**a, "If-None-Match": "*"})
    assert cached.status_code == 304 and cached.headers["etag"]
    assert client.get(f"/v1/jobs/{'0' * 32}", headers={**a, "If-None-Match": "*"}).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}", headers={**h.bearer(store, "b"), "If-None-Match": "*"}).status_code == 404


# --- 3. no 500 for any request ------------------------------------------------------------

HOSTILE_CALLBACKS = [
    "http://[::1",
    "http://[::1]:99999/hook",
    "http://example.org:port/hook",
    "https://example.org/hook\r\nX-Injected: 1",
    "https://example.org/a b",
    "https://" + "a" * 254 + "/hook",
    "https://" + ".".join(["a" * 60] * 5) + "/hook",
    "https://user:secret-password@example.org/hook",
    "https://token@example.org/hook",
    "ftp://example.org/hook",
    "/relative/hook",
]


@pytest.mark.parametrize("url", HOSTILE_CALLBACKS)
def test_a_malformed_callback_url_is_422_never_stored_never_echoed(service, settings, url: str) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    a = h.bearer(store, "a")
    response = client.post("/v1/jobs", files=_study(), data={"callback_url": url}, headers=a)
    assert response.status_code == 422, response.text
    problem = h.problem_of(response)
    assert problem["type"] == "https://scsnet.dev/problems/invalid-callback-url"
    for secret in ("secret-password", "token", "X-Injected", "a" * 60, "[::1"):
        assert secret not in response.text
    assert client.get("/v1/jobs", headers=a).json()["items"] == []
    assert _job_folders(settings) == set()


def test_a_well_formed_callback_url_is_kept(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    a = h.bearer(store, "a")
    for url in ("https://[2001:db8::1]:8443/hook?x=1", "http://hooks.example.org/scsnet"):
        response = client.post("/v1/jobs", files=_study(), data={"callback_url": url}, headers=a)
        assert response.status_code == 202 and response.json()["callback_url"] == url


def _b64(text: bytes) -> str:
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [_b64(str(2**63).encode()), _b64(str(2**64 + 5).encode()), _b64(b"-1"), _b64(b"0"), _b64(b"1e3"), _b64(b" 12"),
     _b64("١٢".encode()), _b64(b"\xff\xfe"), "!!!!", "a", "%00", _b64(b"9" * 40)],
)  # fmt: skip
def test_a_cursor_that_is_no_position_is_a_problem_not_a_500(service, cursor: str) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    response = client.get("/v1/jobs", params={"cursor": cursor}, headers=h.bearer(store, "a"))
    assert response.status_code == 400, response.text
    assert h.problem_of(response)["type"] == "https://scsnet.dev/problems/invalid-cursor"


def test_the_cursors_handed_out_still_page_through(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    a = h.bearer(store, "a")
    ids = [client.post("/v1/jobs", files=_study(), headers=a).json()["id"] for _ in range(3)]
    first = client.get("/v1/jobs", params={"limit": 2}, headers=a).json()
    rest = client.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}, headers=a).json()
    assert [j["id"] for j in first["items"] + rest["items"]] == ids[::-1] and rest["next_cursor"] is None


def test_every_problem_detail_is_bounded(settings: GatewaySettings) -> None:
    app = create_app(settings, store=Store(settings.store_url))

    @app.get("/boom")
    def boom() -> None:
        raise InvalidRequest("x" * 100_000)

    response = TestClient(app).get("/boom")
    problem = h.problem_of(response)
    assert response.status_code == 422 and len(problem["detail"]) == DETAIL_MAX_CHARS
    assert problem["detail"].endswith("\u2026")


# --- 4. webhooks --------------------------------------------------------------------------


def test_webhook_links_are_absolute_with_the_public_url_and_relative_without() -> None:
    artifacts = {"report": {}, "qc.html": {}}
    relative = json.loads(webhooks.payload(job_id="j1", state="succeeded", artifacts=artifacts, problem=None))
    assert relative["links"] == {"self": "/v1/jobs/j1", "report": "/v1/jobs/j1/report", "qc.html": "/v1/jobs/j1/qc.html"}
    absolute = json.loads(
        webhooks.payload(job_id="j1", state="succeeded", artifacts=artifacts, problem=None, base_url="https://scsnet.example.org/api/")
    )
    assert absolute["links"]["report"] == "https://scsnet.example.org/api/v1/jobs/j1/report"
    assert absolute["links"]["self"] == "https://scsnet.example.org/api/v1/jobs/j1"


def test_the_public_url_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from service.settings import ServiceSettings

    assert ServiceSettings().public_url is None
    monkeypatch.setenv("SCSNET_PUBLIC_URL", "https://scsnet.example.org")
    assert ServiceSettings().public_url == "https://scsnet.example.org"
    monkeypatch.setenv("SCSNET_PUBLIC_URL", "scsnet.example.org")
    with pytest.raises(ValidationError):
        ServiceSettings()


def test_the_signature_is_hmac_sha256_keyed_by_the_whole_secret_over_t_dot_raw_body() -> None:
    secret = "whsec_" + "k" * 43
    body = webhooks.payload(job_id="j1", state="failed", artifacts={}, problem={"detail": "é"})
    header = webhooks.sign(secret, body, timestamp=1_700_000_000)
    # what the README tells a receiver to do, written out by hand
    expected = hmac.new(secret.encode("utf-8"), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert webhooks.verify(secret, header, body, now=1_700_000_000)
    assert not webhooks.verify(secret.removeprefix("whsec_"), header, body, now=1_700_000_000)  # the prefix is part of the key
    assert not webhooks.verify(secret, header, json.dumps(json.loads(body)).encode(), now=1_700_000_000)  # raw bytes, not re-serialised


# --- 6. offline docs and honest metrics ---------------------------------------------------


def test_docs_are_served_offline(service) -> None:  # type: ignore[no-untyped-def]
    client, _ = service
    for path in ("/docs", "/redoc"):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        text = page.text
        assert "<script" not in text and "cdn" not in text.lower() and "src=" not in text
        assert "http://" not in text and "https://" not in text.replace("https://scsnet.dev", "")
        assert "/v1/jobs/{job_id}/review" in text and "POST" in text
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")


def test_metrics_name_the_docs_routes(service) -> None:  # type: ignore[no-untyped-def]
    client, _ = service
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 200
    client.get("/no/such/page")
    metrics = client.get("/metrics").text
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert f'scsnet_http_requests_total{{method="GET",route="{path}",status="200"}} 1.0' in metrics
    assert 'route="unmatched",status="404"' in metrics
