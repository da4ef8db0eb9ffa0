"""Reviews through the API (``PUT /v1/jobs/{id}/review``, the job view, the list filter) and the
QC page (``qc.html``) served under its policy with the latest review in it; in-process against
the ASGI app with a real SQLite job store and a real Redis server, as in test_service_api."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import service_helpers as h
from fastapi import APIRouter
from fastapi.testclient import TestClient

from app.main import create_app
from app.routers.artifacts import add_download_route
from app.settings import GatewaySettings
from core.outputs import OUTPUTS, Output, describe_outputs
from core.report.page_policy import (
    REVIEW_MARKER,
    content_security_policy,
    script,
    style,
)
from service.storage import Storage
from service.store import Job, JobState, Store

# The QC page's row of the output table; until core/outputs.py has it, the same row is added
# here and its route put on the app under test by the gateway's own route builder.
QC_HTML = next((o for o in OUTPUTS if o.media_type == "text/html"), None) or Output(
    "qc.html", "qc.html", "text/html", "QC page: the regions on every slice, with the measures."
)
PAGE = (
    "<!doctype html><html><head><meta charset=utf-8><title>QC \u2013 C3</title>"
    f"<style>{style()}</style></head><body><h1>QC \u00e9</h1>{REVIEW_MARKER}"
    f"<script>{script()}</script></body></html>"
)


@pytest.fixture()
def service(tmp_path: Path, redis_server: h.RedisServer) -> Iterator[tuple[TestClient, Store, Storage]]:
    redis_server.client().flushall()
    settings = GatewaySettings(data_dir=tmp_path / "var", redis_url=redis_server.url)
    store = Store(settings.store_url)
    app = create_app(settings, store=store)
    if QC_HTML not in OUTPUTS:
        extra = APIRouter(prefix="/v1/jobs")
        add_download_route(extra, QC_HTML)
        app.include_router(extra)
    with TestClient(app) as client:
        yield client, store, Storage(settings.data_root)


def _key(store: Store, tenant: str) -> tuple[dict[str, str], str]:
    new = store.create_api_key(tenant)
    return {"Authorization": f"Bearer {new.key}"}, new.key_id


def _job(store: Store, storage: Storage, key_header: dict[str, str], state: JobState = JobState.succeeded) -> str:
    """A job of the key's tenant in ``state``, moved there through the store as a worker would;
    a succeeded one has a report and the QC page."""
    tenant = store.authenticate(key_header["Authorization"].removeprefix("Bearer "))
    assert tenant is not None
    job_id = uuid.uuid4().hex
    store.create_job(Job(id=job_id, tenant_id=tenant.id, inputs={"kind": "nifti", "files": []}))
    token = store.new_dispatch(job_id)
    assert token is not None
    if state == JobState.queued:
        return job_id
    assert store.claim(job_id, token) is not None
    if state == JobState.running:
        return job_id
    out = storage.out_dir(job_id)
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps({"ok": True}))
    (out / QC_HTML.filename).write_text(PAGE, encoding="utf-8")
    artifacts = describe_outputs(out)
    page = (out / QC_HTML.filename).read_bytes()
    artifacts.setdefault(QC_HTML.key, {"filename": QC_HTML.filename, "size": len(page), "sha256": hashlib.sha256(page).hexdigest()})
    assert store.finish(job_id, state, artifacts=artifacts if state == JobState.succeeded else None)
    return job_id


def _review(client: TestClient, headers: dict[str, str], job_id: str, **body: Any):  # type: ignore[no-untyped-def]
    return client.put(f"/v1/jobs/{job_id}/review", json=body, headers=headers)


def _digest_of(body: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"


def test_a_review_is_recorded_shown_on_the_job_and_the_last_one_wins(service) -> None:  # type: ignore[no-untyped-def]
    client, store, storage = service
    headers, key_id = _key(store, "a")
    other_key, other_key_id = _key(store, "a")  # a second key of the same tenant
    job_id = _job(store, storage, headers)
    before = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert before.json()["review"] is None and before.json()["reviews"] == []
    tag = before.headers["etag"]

    first = _review(client, headers, job_id, verdict="fail", note="C4 right dorsal column misses the cord")
    assert first.status_code == 200, first.text
    view = first.json()
    assert view["id"] == job_id and view["review"]["verdict"] == "fail" and view["review"]["key_id"] == key_id
    assert view["review"]["note"] == "C4 right dorsal column misses the cord" and view["review"]["at"].endswith(("Z", "+00:00"))
    assert first.headers["etag"] != tag

    second = _review(client, other_key, job_id, verdict="pass")  # note left out: empty
    assert second.status_code == 200 and second.headers["etag"] != first.headers["etag"]
    shown = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert shown.headers["etag"] == second.headers["etag"]
    assert client.get(f"/v1/jobs/{job_id}", headers={**headers, "If-None-Match": tag}).status_code == 200
    assert client.get(f"/v1/jobs/{job_id}", headers={**headers, "If-None-Match": shown.headers["etag"]}).status_code == 304
    job = shown.json()
    assert job["review"] == {"verdict": "pass", "note": "", "at": job["reviews"][-1]["at"], "key_id": other_key_id}
    assert [(r["verdict"], r["key_id"]) for r in job["reviews"]] == [("fail", key_id), ("pass", other_key_id)]
    assert [r.verdict for r in store.reviews(job_id)] == ["fail", "pass"]


def test_only_the_owner_may_review_and_only_a_succeeded_job(service) -> None:  # type: ignore[no-untyped-def]
    client, store, storage = service
    a, _ = _key(store, "a")
    b, _ = _key(store, "b")
    done = _job(store, storage, a)
    theirs = _review(client, b, done, verdict="pass")
    unknown = _review(client, a, uuid.uuid4().hex, verdict="pass")
    assert theirs.status_code == unknown.status_code == 404
    assert h.problem_of(theirs)["type"] == h.problem_of(unknown)["type"] and h.problem_of(theirs)["type"].endswith("/not-found")
    assert _review(client, {}, done, verdict="pass").status_code == 401
    for state in (JobState.queued, JobState.running, JobState.failed):
        response = _review(client, a, _job(store, storage, a, state), verdict="pass")
        assert response.status_code == 409 and h.problem_of(response)["type"].endswith("/job-not-finished"), state
    assert store.reviews(done) == []


@pytest.mark.parametrize(
    "body",
    [
        {"verdict": "maybe"},
        {"verdict": "PASS"},
        {"note": "no verdict"},
        {"verdict": "pass", "note": "x" * 2001},
        {"verdict": "pass", "note": "a\x00b"},
        {"verdict": "pass", "comment": "a field nobody reads"},
        {"verdict": "pass", "note": 3},
    ],
)
def test_a_bad_review_is_422_problem_json(service, body) -> None:  # type: ignore[no-untyped-def]
    client, store, storage = service
    headers, _ = _key(store, "a")
    job_id = _job(store, storage, headers)
    response = _review(client, headers, job_id, **body)
    assert response.status_code == 422 and h.problem_of(response)["type"].endswith("/invalid-request")
    not_json = client.put(f"/v1/jobs/{job_id}/review", content=b"pass", headers={**headers, "Content-Type": "application/json"})
    assert not_json.status_code == 422 and h.problem_of(not_json)["type"].endswith("/invalid-request")
    not_text = client.put(f"/v1/jobs/{job_id}/review", content=b"\xff", headers={**headers, "Content-Type": "application/json"})
    assert not_text.status_code == 400 and h.problem_of(not_text)["type"].endswith("/invalid-request")
    assert store.reviews(job_id) == []


def test_a_note_of_the_longest_length_with_line_breaks_is_kept(service) -> None:  # type: ignore[no-untyped-def]
    client, store, storage = service
    headers, _ = _key(store, "a")
    job_id = _job(store, storage, headers)
    note = ("line\tone\r\n" * 200)[:2000]
    assert _review(client, headers, job_id, verdict="artifact", note=note).json()["review"]["note"] == note


def test_the_list_filters_by_the_latest_verdict_with_paging(service) -> None:  # type: ignore[no-untyped-def]
    client, store, storage = service
    headers, _ = _key(store, "a")
    other, _ = _key(store, "b")
    ids = [_job(store, storage, headers) for _ in range(7)]  # oldest first
    queued = _job(store, storage, headers, JobState.queued)
    verdicts = {ids[0]: ["pass"], ids[1]: ["fail", "pass"], ids[2]: ["pass", "fail"], ids[3]: ["artifact"], ids[4]: ["pass"]}
    for job_id, given in verdicts.items():
        for verdict in given:
            assert _review(client, headers, job_id, verdict=verdict).status_code == 200
    theirs = _job(store, storage, other)
    assert _review(client, other, theirs, verdict="pass").status_code == 200

    def listed(query: str) -> list[str]:
        seen, url, pages = [], f"/v1/jobs?limit=2&{query}", 0
        while url:
            page = client.get(url, headers=headers)
            assert page.status_code == 200, page.text
            seen += [item["id"] for item in page.json()["items"]]
            url, pages = page.json()["links"].get("next"), pages + 1
        assert pages >= len(seen) // 2
        return seen

    assert listed("review=pass") == [ids[4], ids[1], ids[0]]  # newest first, paged 2 + 1
    assert listed("review=fail") == [ids[2]]
    assert listed("review=artifact") == [ids[3]]
    assert listed("review=none") == [queued, ids[6], ids[5]]
    assert listed("review=none&state=succeeded") == [ids[6], ids[5]]
    assert listed("review=pass&state=queued") == []
    page = client.get("/v1/jobs?review=pass", headers=headers).json()
    assert [item["review"]["verdict"] for item in page["items"]] == ["pass"] * 3
    assert [len(item["reviews"]) for item in page["items"]] == [1, 2, 1]
    assert client.get("/v1/jobs?review=none", headers=headers).json()["items"][0]["review"] is None
    bad = client.get("/v1/jobs?review=maybe", headers=headers)
    assert bad.status_code == 422 and h.problem_of(bad)["type"].endswith("/invalid-request")


def test_the_qc_page_is_served_under_its_policy_with_the_review_escaped(service) -> None:  # type: ignore[no-untyped-def]
    client, store, storage = service
    headers, key_id = _key(store, "a")
    job_id = _job(store, storage, headers)
    url = f"/v1/jobs/{job_id}/{QC_HTML.key}"
    stored = (storage.out_dir(job_id) / QC_HTML.filename).read_bytes()

    plain = client.get(url, headers=headers)
    assert plain.status_code == 200 and plain.content == stored
    for response in (plain,):
        assert response.headers["content-type"].startswith("text/html")
        assert response.headers["content-security-policy"] == content_security_policy()
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"
    assert plain.headers["repr-digest"] == _digest_of(stored) and plain.headers["etag"] == f'"{hashlib.sha256(stored).hexdigest()}"'

    note = 'C5 <script>alert("x")</script> & <img src=x onerror=alert(1)>'
    assert _review(client, headers, job_id, verdict="fail", note=note).status_code == 200
    reviewed = client.get(url, headers=headers)
    body = reviewed.content
    assert reviewed.status_code == 200 and body != stored
    assert reviewed.headers["content-security-policy"] == content_security_policy()
    assert reviewed.headers["x-content-type-options"] == "nosniff" and reviewed.headers["cache-control"] == "no-store"
    text = body.decode("utf-8")
    assert html.escape(note) in text and "<script>alert" not in text and "<img" not in text
    assert "Review: fail" in text and f"by key {key_id}" in text and REVIEW_MARKER not in text
    assert text.count("<script>") == 1 and "QC \u00e9" in text  # the page's own script only; UTF-8 intact
    # the digests describe the bytes sent (RFC 9530), not the stored file
    assert reviewed.headers["repr-digest"] == _digest_of(body) != plain.headers["repr-digest"]
    assert reviewed.headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"' and int(reviewed.headers["content-length"]) == len(body)
    assert (storage.out_dir(job_id) / QC_HTML.filename).read_bytes() == stored  # the stored page is untouched

    assert _review(client, headers, job_id, verdict="pass", note="fine after all").status_code == 200
    latest = client.get(url, headers=headers)
    assert "Review: pass" in latest.text and "fine after all" in latest.text and "Review: fail" not in latest.text
    assert latest.headers["repr-digest"] == _digest_of(latest.content) != reviewed.headers["repr-digest"]


def test_other_outputs_keep_their_stored_digests_after_a_review(service) -> None:  # type: ignore[no-untyped-def]
    client, store, storage = service
    headers, _ = _key(store, "a")
    job_id = _job(store, storage, headers)
    assert _review(client, headers, job_id, verdict="pass").status_code == 200
    report = client.get(f"/v1/jobs/{job_id}/report", headers=headers)
    assert report.status_code == 200 and report.headers["repr-digest"] == _digest_of(report.content)
    assert "content-security-policy" not in report.headers


def test_deleting_a_reviewed_job_deletes_its_reviews(service) -> None:  # type: ignore[no-untyped-def]
    client, store, storage = service
    headers, _ = _key(store, "a")
    job_id = _job(store, storage, headers)
    assert _review(client, headers, job_id, verdict="artifact", note="motion").status_code == 200
    assert client.delete(f"/v1/jobs/{job_id}", headers=headers).status_code == 204
    assert store.reviews(job_id) == [] and store.latest_review(job_id) is None
    assert _review(client, headers, job_id, verdict="pass").status_code == 404
