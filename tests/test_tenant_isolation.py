"""Tenant isolation and authentication on every endpoint of ``openapi/openapi.json``.

The endpoints are read from the committed OpenAPI document (which a drift test keeps equal to
what the app serves), so a new route is covered the day it is added:

- every route but health, readiness and metrics answers 401 problem+json without a key, with an
  unknown key and with another scheme; those three answer without a key;
- every route with a ``{job_id}`` answers tenant B's key on tenant A's job with 404 ``not-found``
  (never 403, never a 409 or ``artifact-unavailable`` that would tell B the job exists), while A
  gets its own answers; A's jobs are untouched afterwards;
- no answer to B, on any route, mentions A's job ids.

Tenant A has a succeeded DICOM job (so every output route really serves something) and a failed
one, on a real ``scsnet serve`` (embedded Redis, Celery worker, uvicorn) with the decoder model.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import service_helpers as h
from hostile_inputs import Materials, build_materials, dicom_zip, forge, nifti_form

pytestmark = [pytest.mark.service, pytest.mark.filterwarnings("ignore::UserWarning")]

OPENAPI = json.loads((Path(__file__).parents[1] / "openapi" / "openapi.json").read_text())
PUBLIC = {"/healthz", "/readyz", "/metrics"}
METHODS = {"get", "post", "put", "patch", "delete", "head", "options"}
ENDPOINTS = sorted((method.upper(), path) for path, item in OPENAPI["paths"].items() for method in item if method in METHODS)
JOB_SCOPED = [(m, p) for m, p in ENDPOINTS if "{job_id}" in p]
PROTECTED = [(m, p) for m, p in ENDPOINTS if p not in PUBLIC]
BAD_CREDENTIALS = {
    "no key": {},
    "unknown key": {"Authorization": "Bearer scsnet_0123456789ab_not-a-real-key-at-all"},
    "bearer without a key": {"Authorization": "Bearer"},
    "basic scheme": {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
}


@dataclass(frozen=True)
class World:
    served: h.Served
    key_a: str
    key_b: str
    revoked: str  # a key of tenant A, revoked
    succeeded: dict[str, Any]  # tenant A's succeeded DICOM job (every output exists)
    failed: dict[str, Any]  # tenant A's failed job (no outputs)


def _wait_terminal(client: httpx.Client, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    return dict(h.wait_until(done, timeout_s=90, what=f"job {job_id} to end", interval_s=0.1))


@pytest.fixture(scope="module")
def world(decoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    materials: Materials = build_materials(tmp_path_factory.mktemp("isolation"), Path(__file__).parent / "data" / "sct_tutorial_dmri" / "dmri.nii.gz")
    # this module sends about a hundred wrong keys from one address on purpose: the throttle
    # (tests/test_gateway_hardening.py) would rightly answer most of them 429
    served = h.start_serve(h.short_tmpdir("scsi") / "var", model_dir=decoder_dir, extra_env={"SCSNET_AUTH_FAILURES_MAX": "0"})
    try:
        key_a, key_b = h.create_key(served.data_dir, "alpha")[0], h.create_key(served.data_dir, "beta")[0]
        revoked = h.create_key(served.data_dir, "alpha")[0]
        subprocess.run([*h.SCSNET, "apikey", "revoke", revoked], env=h.env_for(served.data_dir), check=True, capture_output=True, timeout=60)
        with served.client(key_a) as a:
            dicom = dicom_zip(materials.dicom)
            first = a.post("/v1/jobs", files=dicom.files, headers={"Idempotency-Key": "alpha-study-1"})
            broken = nifti_form(materials, forge(materials.nii, datatype=32))  # complex voxels: fails in the worker
            second = a.post("/v1/jobs", files=broken.files)
            assert first.status_code == second.status_code == 202, (first.text, second.text)
            succeeded = _wait_terminal(a, first.json()["id"])
            failed = _wait_terminal(a, second.json()["id"])
        assert succeeded["state"] == "succeeded", succeeded["problem"]
        assert failed["state"] == "failed"
        yield World(served, key_a, key_b, revoked, succeeded, failed)
    finally:
        assert served.stop() == 0, served.log_path.read_text()[-3000:]


STUDY_UID = "1.2.826.0.1.3680043.8.498.18"  # {study_uid} of the STOW-RS route (tests/test_stow.py covers its tenants)


def _url(path: str, job_id: str) -> str:
    params = set(re.findall(r"{(\w+)}", path)) - {"job_id", "study_uid"}
    assert not params, f"{path}: a new path parameter {params}; teach this test what to put there"
    return path.replace("{job_id}", job_id).replace("{study_uid}", STUDY_UID)


def _call(client: httpx.Client, method: str, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    if method == "POST" and url == "/v1/jobs":
        files = [("files", ("IM0001.dcm", h.dicom_bytes()))]
        return client.post(url, files=files, headers=headers or {})
    return client.request(method, url, headers=headers or {})


def test_the_document_lists_the_routes_we_know_and_they_are_all_covered_below() -> None:
    assert len(ENDPOINTS) >= 20 and set(PUBLIC) <= {p for _, p in ENDPOINTS}
    assert ("POST", "/v1/jobs") in ENDPOINTS and ("DELETE", "/v1/jobs/{job_id}") in ENDPOINTS
    assert len(JOB_SCOPED) >= 15


@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=[f"{m} {p}" for m, p in PROTECTED])
@pytest.mark.parametrize("credentials", [*BAD_CREDENTIALS, "revoked key"])
def test_without_a_valid_key_every_protected_route_is_401(world: World, method: str, path: str, credentials: str) -> None:
    headers = {"Authorization": f"Bearer {world.revoked}"} if credentials == "revoked key" else BAD_CREDENTIALS[credentials]
    with httpx.Client(base_url=world.served.url, timeout=30) as anonymous:
        response = _call(anonymous, method, _url(path, world.succeeded["id"]), headers)
    assert response.status_code == 401, f"{method} {path} with {credentials}: {response.status_code} {response.text[:200]}"
    problem = h.problem_of(response)
    assert problem["type"].endswith("/unauthorized") and problem["detail"]
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert world.succeeded["id"] not in _anonymised(problem, world.succeeded["id"])  # only echoes the path asked


@pytest.mark.parametrize("path", sorted(PUBLIC))
def test_health_readiness_and_metrics_answer_without_a_key(world: World, path: str) -> None:
    for headers in BAD_CREDENTIALS.values():
        response = httpx.get(world.served.url + path, headers=headers, timeout=30)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:200]}"


@pytest.mark.parametrize(("method", "path"), JOB_SCOPED, ids=[f"{m} {p}" for m, p in JOB_SCOPED])
@pytest.mark.parametrize("which", ["succeeded", "failed"])
def test_another_tenants_job_is_not_found_on_every_job_route(world: World, method: str, path: str, which: str) -> None:
    job = getattr(world, which)
    url = _url(path, job["id"])
    with world.served.client(world.key_b) as b, world.served.client(world.key_a) as a:
        response = _call(b, method, url)
        assert response.status_code == 404, f"tenant B, {method} {url}: {response.status_code} {response.text[:200]}"
        problem = h.problem_of(response)
        assert problem["type"].endswith("/not-found"), f"{method} {path}: {problem} tells B the job exists"
        # indistinguishable from a job that never existed: no oracle for guessing ids
        ghost = uuid.uuid4().hex
        unknown = h.problem_of(_call(b, method, _url(path, ghost)))
        assert _anonymised(unknown, ghost) == _anonymised(problem, job["id"])
        if method == "GET":  # the owner's own answer, to show the route really serves this job
            own = a.get(url)
            if which == "succeeded":
                assert own.status_code == 200, f"tenant A, {url}: {own.status_code} {own.text[:200]}"
            else:
                assert own.status_code in (200, 409), f"tenant A, {url}: {own.status_code}"
        after = a.get(f"/v1/jobs/{job['id']}")
        assert after.status_code == 200 and after.json()["state"] == job["state"], "tenant B changed A's job"


def _anonymised(problem: dict[str, Any], job_id: str) -> str:
    """A problem as text with the job id the caller sent (echoed in instance and detail) masked."""
    return json.dumps(problem, sort_keys=True).replace(job_id, "<id>")


def test_no_answer_to_another_tenant_on_any_route_mentions_the_first_tenants_jobs(world: World) -> None:
    ids = (world.succeeded["id"], world.failed["id"])
    with world.served.client(world.key_b) as b:
        for method, path in ENDPOINTS:
            for job_id in ids:
                response = _call(b, method, _url(path, job_id))
                assert response.status_code < 500, f"{method} {path}: {response.status_code}"
                is_problem = response.headers.get("content-type", "").startswith("application/problem+json")
                text = _anonymised(response.json(), job_id) if is_problem else response.text  # B's own id echoed back
                assert not any(i in text for i in ids), f"{method} {path} shows A's job to B: {text[:300]}"
        assert b.get("/v1/jobs").json()["items"] and all(j["id"] not in ids for j in b.get("/v1/jobs").json()["items"])
        # an Idempotency-Key is per tenant: B reusing A's key gets a job of its own
        replay = b.post("/v1/jobs", files=[("files", ("IM0001.dcm", h.dicom_bytes()))], headers={"Idempotency-Key": "alpha-study-1"})
        assert replay.status_code == 202 and replay.json()["id"] not in ids


def test_summary(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    assert {p for _, p in ENDPOINTS} - PUBLIC == {p for _, p in PROTECTED}
    with capsys.disabled():
        print(
            f"\ntenant isolation: {len(ENDPOINTS)} endpoints from openapi/openapi.json covered "
            f"({len(PROTECTED)} need a key: 401 without one, {len(PUBLIC)} public; {len(JOB_SCOPED)} job routes: "
            "another tenant's job is 404 not-found)"
        )
