"""DICOMweb STOW-RS in (``POST /v1/dicomweb/studies[/{study}]``, app.stow): against the ASGI app
with a real SQLite job store and a real Redis server (no worker: jobs stay queued), and once
end to end through a real ``scsnet serve`` with the real cervical DWI written as DICOM."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import service_helpers as h
from dicom_synth import write_dicom_series
from pydicom import dcmread
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from app.settings import GatewaySettings
from app.stow import CANNOT_UNDERSTAND, STUDY_MISMATCH, StowArea, settle, sweep
from core.ingest.nifti import load_nifti_dwi
from core.settings import SHIPPED_MODEL_DIR
from service.queue import CeleryQueue
from service.storage import Storage
from service.store import Job, Store

SETTLE_S = 0.3
SOP_SEQ, FAILED_SEQ = "00081199", "00081198"


@pytest.fixture()
def settings(tmp_path: Path, redis_server: h.RedisServer) -> GatewaySettings:
    redis_server.client().flushall()
    return GatewaySettings(
        data_dir=tmp_path / "var", redis_url=redis_server.url, max_upload_bytes=1 << 20, stow_settle_s=SETTLE_S
    )


# --- helpers ---------------------------------------------------------------------------


def instance(study_uid: str, *, sop_uid: str | None = None, padding: int = 0) -> tuple[str, bytes]:
    """(SOP Instance UID, Part 10 bytes) of a small MR instance of ``study_uid``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.PatientID = "MR", "STOW0001"
    if padding:
        ds.add_new(0x00291010, "OB", b"\0" * padding)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return str(ds.SOPInstanceUID), buffer.getvalue()


def related(parts: list[bytes | tuple[bytes, str | None]], *, boundary: str = "stow-boundary-7d3", quoted: bool = True) -> tuple[bytes, str]:
    """A multipart/related body of ``parts`` (bytes as application/dicom, or (bytes, Content-Type
    or None for none)) and its Content-Type."""
    body = bytearray()
    for part in parts:
        data, media_type = (part, "application/dicom") if isinstance(part, bytes) else part
        body += f"--{boundary}\r\n".encode()
        if media_type:
            body += f"Content-Type: {media_type}\r\n".encode()
        body += b"\r\n" + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    kind = '"application/dicom"' if quoted else "application/dicom"
    return bytes(body), f"multipart/related; type={kind}; boundary={boundary}"


def stow(client: Any, headers: dict[str, str], parts: list[Any], *, study: str | None = None) -> Any:
    body, content_type = related(parts)
    url = "/v1/dicomweb/studies" + (f"/{study}" if study else "")
    return client.post(url, content=body, headers={**headers, "Content-Type": content_type})


def sops(answer: dict[str, Any], sequence: str) -> list[dict[str, Any]]:
    return list(answer.get(sequence, {}).get("Value", []))


def uid_of(item: dict[str, Any]) -> str:
    return str(item["00081155"]["Value"][0])


def jobs_of_study(client: Any, headers: dict[str, str], study: str) -> list[dict[str, Any]]:
    response = client.get("/v1/jobs", params={"study_uid": study}, headers=headers)
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def wait_jobs(client: Any, headers: dict[str, str], study: str, count: int, *, timeout_s: float = 15) -> list[dict[str, Any]]:
    return list(
        h.wait_until(lambda: (j := jobs_of_study(client, headers, study)) and len(j) >= count and j, timeout_s=timeout_s, what=f"{count} job(s) of the study")
    )


def stow_root(settings: GatewaySettings) -> Path:
    return settings.data_root / "stow"


def leftovers(settings: GatewaySettings) -> list[str]:
    root = stow_root(settings)
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# --- the route ----------------------------------------------------------------------------


def test_instances_sent_in_two_requests_settle_into_one_job(service, settings: GatewaySettings) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    study = generate_uid()
    sent = [instance(study) for _ in range(6)]
    for half in (sent[:3], sent[3:]):
        response = stow(client, headers, [data for _, data in half], study=study)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/dicom+json")
        assert response.headers["cache-control"] == "no-store"
        answer = response.json()
        assert [uid_of(i) for i in sops(answer, SOP_SEQ)] == [uid for uid, _ in half] and FAILED_SEQ not in answer
        assert all(i["00081150"] == {"vr": "UI", "Value": [MRImageStorage]} for i in sops(answer, SOP_SEQ))
        assert "00081190" not in answer  # no Retrieve URL: this service does not serve WADO-RS
    last = time.monotonic()
    assert jobs_of_study(client, headers, study) == []  # still gathering
    (job,) = wait_jobs(client, headers, study, 1)
    waited = time.monotonic() - last
    assert SETTLE_S * 0.9 <= waited < SETTLE_S + 3, waited
    assert job["study_uid"] == study and job["state"] == "queued" and job["input"]["kind"] == "dicom"
    assert len(job["input"]["files"]) == 6 and {f["field"] for f in job["input"]["files"]} == {"stow"}
    folder = Storage(settings.data_root).input_dir(job["id"]) / "dicom"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{uid}.dcm" for uid, _ in sent)  # no digest sidecars
    record = store.get(job["id"])
    assert record.inputs["source"] == "stow-rs" and record.inputs["paths"] == ["dicom"]
    assert {f["sha256"] for f in record.inputs["files"]} == {hashlib.sha256(d).hexdigest() for _, d in sent}
    assert leftovers(settings) == []  # the batch folder moved, the incoming folders removed
    broker = CeleryQueue(settings.broker_url, queue_name=settings.queue_name)
    # dispatched as an upload is (just after the job is stored, so it may take a moment)
    h.wait_until(lambda: job["id"] in broker.job_ids_in_broker(), timeout_s=5, what="the job's message in the broker")
    (batch,) = store.stow_batches(record.tenant_id, study)
    assert batch.instances == 6 and batch.job_id == job["id"] and batch.gathering is None
    print(f"\nSTOW-RS: job visible {waited:.2f} s after the last instance (settle {SETTLE_S} s)")


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/form-data; boundary=x",
        "application/json",
        "application/dicom",
        'multipart/related; type="application/dicom+json"; boundary=x',
        "multipart/related; boundary=x",
        None,
    ],
)
def test_another_media_type_is_415(service, settings: GatewaySettings, content_type: str | None) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = {**h.bearer(store, "a"), **({"Content-Type": content_type} if content_type else {})}
    response = client.post("/v1/dicomweb/studies", content=b"--x\r\n\r\n{}\r\n--x--\r\n", headers=headers)
    assert response.status_code == 415, response.text
    assert h.problem_of(response)["type"].endswith("/unsupported-media-type")
    assert leftovers(settings) == []
    catalogue = client.get("/v1/problems", headers=headers).json()["problems"]
    assert any(e["type"].endswith("/unsupported-media-type") and e["status"] == 415 for e in catalogue)


def test_the_type_parameter_may_be_unquoted(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    body, content_type = related([instance("1.2.3")[1]], quoted=False)
    response = client.post("/v1/dicomweb/studies", content=body, headers={**h.bearer(store, "a"), "Content-Type": content_type})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"", 'multipart/related; type="application/dicom"; boundary=b'),
        (b"--b--\r\n", 'multipart/related; type="application/dicom"; boundary=b'),
        (b"--b\r\nContent-Type: application/dicom\r\n\r\nDICM...", 'multipart/related; type="application/dicom"; boundary=b'),
        (b"garbage without any boundary", 'multipart/related; type="application/dicom"; boundary=b'),
        (b"--b\r\n\r\nx\r\n--b--\r\n", 'multipart/related; type="application/dicom"'),
    ],
    ids=["empty", "no part", "cut off", "garbage", "no boundary"],
)
def test_a_malformed_body_is_400_and_leaves_nothing(service, settings: GatewaySettings, body: bytes, content_type: str) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    response = client.post("/v1/dicomweb/studies", content=body, headers={**h.bearer(store, "a"), "Content-Type": content_type})
    assert response.status_code == 400, response.text
    assert h.problem_of(response)["type"].endswith("/malformed-upload")
    assert leftovers(settings) == []


def test_a_part_that_is_not_dicom_fails_alone_with_0xC000(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    study = generate_uid()
    good = [instance(study) for _ in range(2)]
    parts = [good[0][1], b"this is not DICOM at all", (b"{}", "application/json"), (good[1][1], None), h.dicom_bytes()]
    response = stow(client, headers, parts)
    assert response.status_code == 202, response.text
    answer = response.json()
    assert [uid_of(i) for i in sops(answer, SOP_SEQ)] == [good[0][0], good[1][0]]  # no Content-Type: the body's type
    failed = sops(answer, FAILED_SEQ)
    assert [i["00081197"] for i in failed] == [{"vr": "US", "Value": [CANNOT_UNDERSTAND]}] * 3 and CANNOT_UNDERSTAND == 0xC000
    assert all("00081155" not in i for i in failed)  # nothing readable to name them by
    assert len(wait_jobs(client, headers, study, 1)[0]["input"]["files"]) == 2


def test_instances_of_another_study_than_the_urls_fail_with_0xA900_and_none_is_409(service, settings: GatewaySettings) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    study, other = generate_uid(), generate_uid()
    strangers = [instance(other) for _ in range(3)]
    response = stow(client, headers, [d for _, d in strangers], study=study)
    assert response.status_code == 409, response.text
    answer = response.json()
    assert SOP_SEQ not in answer
    assert [(uid_of(i), i["00081197"]["Value"][0], i["00081150"]["Value"][0]) for i in sops(answer, FAILED_SEQ)] == [
        (uid, STUDY_MISMATCH, MRImageStorage) for uid, _ in strangers
    ]
    assert store.stow_batches(store.authenticate(headers["Authorization"][7:]).id) == [] and leftovers(settings) == []
    mixed = stow(client, headers, [instance(study)[1], strangers[0][1]], study=study)
    assert mixed.status_code == 202 and len(sops(mixed.json(), SOP_SEQ)) == len(sops(mixed.json(), FAILED_SEQ)) == 1
    assert stow(client, headers, [b"not dicom"]).status_code == 409  # none stored, for whatever reason


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
def test_over_the_size_limit_is_413_and_leaves_nothing(service, settings: GatewaySettings, announced: bool) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    study = generate_uid()
    body, content_type = related([instance(study, padding=300_000)[1] for _ in range(4)])  # > 1 MiB
    content: Any = body if announced else iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
    response = client.post("/v1/dicomweb/studies", content=content, headers={**headers, "Content-Type": content_type})
    assert response.status_code == 413, response.text
    assert h.problem_of(response)["type"].endswith("/upload-too-large")
    assert leftovers(settings) == []
    time.sleep(SETTLE_S * 2)
    assert jobs_of_study(client, headers, study) == []


def test_no_key_or_a_bad_key_is_401(service, settings: GatewaySettings) -> None:  # type: ignore[no-untyped-def]
    client, _ = service
    body, content_type = related([instance("1.2.3")[1]])
    for headers in ({}, {"Authorization": "Bearer scsnet_nope_nope"}):
        for url in ("/v1/dicomweb/studies", "/v1/dicomweb/studies/1.2.3"):
            response = client.post(url, content=body, headers={**headers, "Content-Type": content_type})
            assert response.status_code == 401 and h.problem_of(response)["type"].endswith("/unauthorized")
    assert leftovers(settings) == []


def test_each_tenant_gathers_its_own_instances_of_a_study(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    a, b = h.bearer(store, "a"), h.bearer(store, "b")
    study = generate_uid()
    assert stow(client, a, [instance(study)[1] for _ in range(3)]).status_code == 200
    assert stow(client, b, [instance(study)[1] for _ in range(2)]).status_code == 200
    (job_a,) = wait_jobs(client, a, study, 1)
    (job_b,) = wait_jobs(client, b, study, 1)
    assert job_a["id"] != job_b["id"] and len(job_a["input"]["files"]) == 3 and len(job_b["input"]["files"]) == 2
    assert client.get(f"/v1/jobs/{job_a['id']}", headers=b).status_code == 404


def test_a_resent_instance_replaces_the_earlier_copy_and_counts_once(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    study = generate_uid()
    _, data = instance(study)
    assert stow(client, headers, [data, instance(study)[1]]).status_code == 200
    assert stow(client, headers, [data, data]).status_code == 200
    (job,) = wait_jobs(client, headers, study, 1)
    assert len(job["input"]["files"]) == 2
    (batch,) = store.stow_batches(store.get(job["id"]).tenant_id, study)
    assert batch.instances == 2 and batch.size == sum(f["size"] for f in job["input"]["files"])


def test_instances_arriving_after_the_job_started_make_a_second_job(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    study = generate_uid()
    first = [instance(study) for _ in range(3)]
    assert stow(client, headers, [d for _, d in first]).status_code == 200
    (job1,) = wait_jobs(client, headers, study, 1)
    assert stow(client, headers, [first[0][1], instance(study)[1]]).status_code == 200  # the PACS sends again
    jobs = wait_jobs(client, headers, study, 2)
    assert jobs[1]["id"] == job1["id"] and len(jobs[0]["input"]["files"]) == 2  # newest first, on its instances only
    assert len(store.stow_batches(store.get(job1["id"]).tenant_id, study)) == 2


def test_the_study_filter_is_a_uid_and_pages_with_its_cursor(service) -> None:  # type: ignore[no-untyped-def]
    client, store = service
    headers = h.bearer(store, "a")
    tenant = store.authenticate(headers["Authorization"][7:])
    study = "1.2.826.0.1.3680043.8.498.1"
    for index in range(3):
        store.create_job(Job(id=f"{index:032x}", tenant_id=tenant.id, study_uid=study, inputs={"kind": "dicom", "files": []}))
    store.create_job(Job(id=f"{9:032x}", tenant_id=tenant.id, study_uid="1.2.3", inputs={"kind": "dicom", "files": []}))
    page = client.get("/v1/jobs", params={"study_uid": study, "limit": 2}, headers=headers).json()
    assert [j["id"] for j in page["items"]] == [f"{2:032x}", f"{1:032x}"] and f"study_uid={study}" in page["links"]["next"]
    rest = client.get(page["links"]["next"], headers=headers).json()
    assert [j["id"] for j in rest["items"]] == [f"{0:032x}"] and not rest["links"]
    for bad in ("abc", "1..2", "1.2.", "1" * 65, "1.2;drop"):
        response = client.get("/v1/jobs", params={"study_uid": bad}, headers=headers)
        assert response.status_code == 422, bad
    assert client.post("/v1/dicomweb/studies/not-a-uid", content=b"", headers=headers).status_code == 422


# --- settling, races and recovery (the store and the folders, no HTTP) --------------------------


@pytest.fixture()
def parts(settings: GatewaySettings) -> Iterator[tuple[Store, Storage, StowArea, CeleryQueue]]:
    store = Store(settings.store_url)
    yield store, Storage(settings.data_root), StowArea(settings.data_root), CeleryQueue(settings.broker_url, queue_name=settings.queue_name)
    store.engine.dispose()


def _arrive(store: Store, area: StowArea, tenant_id: int, study: str, data: bytes) -> None:
    from app.stow import accept
    from app.uploads import RelatedPart

    incoming = area.incoming()
    path = incoming / "part-000000"
    path.write_bytes(data)
    part = RelatedPart("application/dicom", path, len(data), hashlib.sha256(data).hexdigest())
    assert accept(store, area, tenant_id, [part], study_uid=study)[0].reason is None
    os.rmdir(incoming)


def test_instances_arriving_while_batches_are_claimed_all_land_in_exactly_one_job(parts, settings: GatewaySettings) -> None:  # type: ignore[no-untyped-def]
    """Four senders and a settle loop with no settle time at all, claiming as fast as it can: every
    instance ends in exactly one job's folder and is counted in exactly one batch."""
    store, storage, area, queue = parts
    tenant = store.authenticate(store.create_api_key("a").key)
    study = generate_uid()
    sent = [[instance(study) for _ in range(25)] for _ in range(4)]
    stop = threading.Event()
    started: list[str] = []

    def settler() -> None:
        while not stop.is_set():
            started.extend(settle(store, storage, area, queue, settle_s=0))

    def sender(batch: list[tuple[str, bytes]]) -> None:
        for _, data in batch:
            _arrive(store, area, tenant.id, study, data)

    threads = [threading.Thread(target=settler)] + [threading.Thread(target=sender, args=(b,)) for b in sent]
    for thread in threads[1:]:
        thread.start()
    threads[0].start()
    for thread in threads[1:]:
        thread.join(60)
    stop.set()
    threads[0].join(60)
    started.extend(settle(store, storage, area, queue, settle_s=0))
    stored = [p.name for job_id in started for p in (storage.input_dir(job_id) / "dicom").iterdir()]
    assert sorted(stored) == sorted(f"{uid}.dcm" for batch in sent for uid, _ in batch)  # each once, none lost
    batches = store.stow_batches(tenant.id, study)
    assert sum(b.instances for b in batches) == 100 and all(b.job_id for b in batches)
    assert sum(len(store.get(j).inputs["files"]) for j in started) == 100
    assert leftovers(settings) == []
    print(f"\nSTOW-RS race: 100 instances from 4 senders against a settle-0 claimer -> {len(started)} job(s), none lost")


def test_a_claimed_batch_whose_job_never_started_is_started_by_a_later_pass(parts) -> None:  # type: ignore[no-untyped-def]
    store, storage, area, queue = parts
    tenant = store.authenticate(store.create_api_key("a").key)
    study = generate_uid()
    sent = [instance(study) for _ in range(3)]
    for _, data in sent:
        _arrive(store, area, tenant.id, study, data)
    (batch,) = store.stow_batches(tenant.id, study)
    assert store.stow_claim(batch.id, settle_s=0) is not None  # ... and the gateway dies here
    assert settle(store, storage, area, queue, settle_s=0) == []  # too recent to be taken for dead
    # a second batch dies later still: its folder moved to the job, the job not stored
    more = instance(study)
    _arrive(store, area, tenant.id, study, more[1])
    second = next(b for b in store.stow_batches(tenant.id, study) if b.gathering)
    assert store.stow_claim(second.id, settle_s=0) is not None
    storage.input_dir(second.id).mkdir(parents=True)
    os.rename(area.batch_dir(second.id), storage.input_dir(second.id) / "dicom")
    assert sorted(settle(store, storage, area, queue, settle_s=0, recover_after_s=0)) == sorted([batch.id, second.id])
    first_job, second_job = store.get(batch.id), store.get(second.id)
    assert len(first_job.inputs["files"]) == 3 and first_job.study_uid == study
    assert second_job.inputs["files"][0]["sha256"] == hashlib.sha256(more[1]).hexdigest()
    assert first_job.id in queue.job_ids_in_broker() and second_job.id in queue.job_ids_in_broker()
    assert settle(store, storage, area, queue, settle_s=0, recover_after_s=0) == []  # nothing twice


def test_the_sweep_removes_cut_off_requests_and_dead_batches_never_live_ones(parts, settings: GatewaySettings) -> None:  # type: ignore[no-untyped-def]
    store, storage, area, queue = parts
    tenant = store.authenticate(store.create_api_key("a").key)
    study = generate_uid()
    _arrive(store, area, tenant.id, study, instance(study)[1])
    (live,) = store.stow_batches(tenant.id, study)
    cut_off = area.incoming()
    (cut_off / "part-000000").write_bytes(b"half an instance")
    unowned = area.root / ("f" * 32)
    unowned.mkdir()
    assert sorted(sweep(store, area, grace_s=3600)) == []  # everything is fresh
    old = time.time() - 7200
    for path in (cut_off, cut_off / "part-000000", unowned, area.batch_dir(live.id), *area.batch_dir(live.id).iterdir()):
        os.utime(path, (old, old))
    assert sorted(sweep(store, area, grace_s=3600)) == sorted([cut_off.name, unowned.name])
    assert area.batch_dir(live.id).is_dir() and settle(store, storage, area, queue, settle_s=0) == [live.id]


# --- end to end: the real service, the real cervical DWI as DICOM ------------------------------


@pytest.mark.service
def test_a_study_sent_by_stow_rs_is_analysed_by_the_real_service(real_dwi_paths: dict[str, Path]) -> None:
    folder = h.short_tmpdir("scsstow")
    dwi = load_nifti_dwi(real_dwi_paths["image"], bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"])
    files = sorted(write_dicom_series(real_dwi_paths["image"], dwi.bvals, dwi.bvecs, folder / "study"))
    study = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    served = h.start_serve(folder / "var", model_dir=SHIPPED_MODEL_DIR, extra_env={"SCSNET_STOW_SETTLE_S": "1"})
    try:
        key = h.create_key(served.data_dir, "hospital")[0]
        with served.client(key) as client:
            halves = (files[: len(files) // 2], files[len(files) // 2 :])
            for half in halves:
                body, content_type = related([p.read_bytes() for p in half])
                response = client.post(f"/v1/dicomweb/studies/{study}", content=body, headers={"Content-Type": content_type})
                assert response.status_code == 200, response.text
                assert len(sops(response.json(), SOP_SEQ)) == len(half)
            last = datetime.now().astimezone()
            (job,) = wait_jobs(client, {}, study, 1, timeout_s=30)
            to_job = (datetime.fromisoformat(job["created_at"]) - last).total_seconds()
            assert len(job["input"]["files"]) == len(files) and job["study_uid"] == study

            def finished() -> dict[str, Any] | None:
                view = client.get(f"/v1/jobs/{job['id']}").json()
                return view if view["state"] in ("succeeded", "failed", "cancelled") else None

            done = h.wait_until(finished, timeout_s=180, what="the STOW-RS job to end", interval_s=0.2)
            assert done["state"] == "succeeded", done["problem"]
            for output in ("seg", "sr", "qc.dcm"):
                answer = client.get(f"/v1/jobs/{job['id']}/{output}")
                assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/dicom"), output
                assert answer.content[128:132] == b"DICM"
            assert not list((served.data_dir / "stow").iterdir())
            analysis_s = (datetime.fromisoformat(done["finished_at"]) - datetime.fromisoformat(done["started_at"])).total_seconds()
        print(
            f"\nSTOW-RS end to end: {len(files)} instances in 2 requests; job created {to_job:.2f} s after the last "
            f"answer (settle 1 s); analysis {analysis_s:.1f} s"
        )
    finally:
        assert served.stop() == 0, served.log_path.read_text()[-3000:]
