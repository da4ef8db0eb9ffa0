"""scsnet with a real PACS (issue 18): Orthanc 1.10 with its DICOMweb plugin on 127.0.0.1
(tests/pacs.py) and ``scsnet serve``.

The real cervical DWI, written as DICOM, is stored in Orthanc; Orthanc sends the study to scsnet
with its own DICOMweb client (STOW-RS in, ``POST /v1/dicomweb/studies``), scsnet analyses it and
stores the SEG, SR and SC back in Orthanc (STOW-RS out, the tenant's destination), where they
are found by QIDO-RS and read with dicomweb-client: the SR's FA values equal report.json's. A
second test stops Orthanc before the job ends: the delivery fails, is retried, and arrives once
Orthanc is back; ``POST /v1/jobs/{id}/deliver`` sends it again.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import pydicom
import pytest
import service_helpers as h
from dicom_synth import write_dicom_series
from pacs import Orthanc, orthanc, require_orthanc

from core.ingest.nifti import load_nifti_dwi
from core.settings import SHIPPED_MODEL_DIR

pytestmark = [pytest.mark.service, pytest.mark.filterwarnings("ignore::UserWarning")]

TENANT = "radiology"
FA_CODE = "110808"
SEG, SR, SC = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"


class Setup:
    """scsnet serve, its tenant's key, and an Orthanc that can send to it and receive from it."""

    def __init__(self, served: h.Served, key: str, pacs: Orthanc) -> None:
        self.served, self.key, self.pacs = served, key, pacs


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    require_orthanc()
    data = h.short_tmpdir("scso") / "var"
    served = h.start_serve(
        data, model_dir=SHIPPED_MODEL_DIR,
        extra_env={"SCSNET_STOW_SETTLE_S": "2", "SCSNET_DESTINATION_BACKOFF_S": "1", "SCSNET_DESTINATION_MAX_RETRIES": "5"},
    )  # fmt: skip
    try:
        key, _ = h.create_key(data, TENANT)
        server = {"Url": f"{served.url}/v1/dicomweb", "HttpHeaders": {"Authorization": f"Bearer {key}"}}
        with orthanc(servers={"scsnet": server}) as pacs:
            # scsnet's side: the tenant's destination is Orthanc's DICOMweb root
            done = subprocess_scsnet(data, "destination", "set", "--tenant", TENANT, "--url", pacs.dicomweb)
            assert done.returncode == 0, done.stderr
            yield Setup(served, key, pacs)
    finally:
        served.stop()


def subprocess_scsnet(data: Path, *args: str) -> Any:
    import subprocess

    env = h.env_for(data, SCSNET_ALLOW_PRIVATE_NETWORKS="true")
    return subprocess.run([*h.SCSNET, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def _new_study(real_dwi_paths: dict[str, Path], folder: Path) -> tuple[list[Path], str]:
    """The real DWI as a new DICOM study (new UIDs each call): its files and Study Instance UID."""
    dwi = load_nifti_dwi(real_dwi_paths["image"], bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"])
    files = write_dicom_series(real_dwi_paths["image"], dwi.bvals, dwi.bvecs, folder / "series5")
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _store_in_orthanc(pacs: Orthanc, files: list[Path]) -> str:
    """POST each file to Orthanc; its study id (Orthanc's own)."""
    with httpx.Client(base_url=pacs.url, timeout=30) as client:
        ids = {client.post("/instances", content=path.read_bytes()).raise_for_status().json()["ParentStudy"] for path in files}
    assert len(ids) == 1
    return ids.pop()


def _wait(what: str, probe: Any, timeout_s: float = 180) -> Any:
    return h.wait_until(probe, timeout_s=timeout_s, what=what, interval_s=0.25)


def _job_of_study(client: httpx.Client, study_uid: str) -> dict[str, Any] | None:
    response = client.get("/v1/jobs", params={"study_uid": study_uid})
    items = response.json().get("items", []) if response.status_code == 200 else []
    return items[0] if items else None


def _finished(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    job = client.get(f"/v1/jobs/{job_id}").json()
    return job if job["state"] in {"succeeded", "failed", "cancelled"} else None


def _delivered(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    job = client.get(f"/v1/jobs/{job_id}").json()
    return job if (job.get("delivery") or {}).get("state") in {"delivered", "failed"} else None


def _fa_by_group(document: hd.sr.Comprehensive3DSR) -> dict[str, float]:
    content = document.content
    assert isinstance(content, hd.sr.MeasurementReport)
    values = {}
    for group in content.get_volumetric_roi_measurement_groups():
        fa = [m.value for m in group.get_measurements() if m.name.value == FA_CODE]
        if fa:
            values[group.tracking_identifier] = fa[0]
    return values


def _expected_fa(report: dict[str, Any]) -> dict[str, float]:
    from core.labels import REGIONS

    regions = {entry["code"]: entry for entry in report["regions"]}
    expected = {r.key: regions[r.code]["fa"]["mean"] for r in REGIONS if regions[r.code]["fa"]["mean"] is not None}
    expected["spinal_cord"] = report["cord"]["fa"]["mean"]
    return expected


def _check_results_in_orthanc(setup: Setup, client: httpx.Client, job: dict[str, Any], study_uid: str) -> None:
    """The job's SEG, SR and SC are in Orthanc's study (QIDO-RS), and the SR read back there
    (WADO-RS) carries report.json's FA values."""
    from dicomweb_client.api import DICOMwebClient

    ours = pydicom.dcmread(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/sr").content), stop_before_pixels=True)
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    pacs = DICOMwebClient(url=setup.pacs.dicomweb)
    series = pacs.search_for_series(study_uid)
    found = {}
    for item in series:
        uid = item["0020000E"]["Value"][0]
        for instance in pacs.search_for_instances(study_uid, uid):
            found[instance["00080016"]["Value"][0]] = (uid, instance["00080018"]["Value"][0])
    assert {SEG, SR, SC} <= set(found), sorted(found)
    assert found[SR] == (ours.SeriesInstanceUID, ours.SOPInstanceUID) or any(
        s["0020000E"]["Value"][0] == ours.SeriesInstanceUID for s in series
    ), "the job's SR is not in Orthanc"
    instance = pacs.retrieve_instance(study_uid, ours.SeriesInstanceUID, ours.SOPInstanceUID)
    document = hd.sr.Comprehensive3DSR.from_dataset(instance)
    assert _fa_by_group(document) == _expected_fa(report)  # exactly: the floats of report.json


def test_orthanc_sends_a_study_by_stow_rs_and_gets_the_seg_sr_and_sc_back(
    setup: Setup, real_dwi_paths: dict[str, Path], tmp_path: Path
) -> None:
    with setup.served.client(setup.key) as client:
        if client.post("/v1/dicomweb/studies", content=b"").status_code in (404, 405):
            pytest.fail("scsnet has no STOW-RS route (POST /v1/dicomweb/studies)")
        files, study_uid = _new_study(real_dwi_paths, tmp_path)
        orthanc_study = _store_in_orthanc(setup.pacs, files)
        started = time.monotonic()
        sent = httpx.post(
            f"{setup.pacs.dicomweb}/servers/scsnet/stow", json={"Resources": [orthanc_study]}, timeout=120
        )  # Orthanc's own DICOMweb client sends the study to scsnet
        assert sent.status_code == 200, sent.text
        job = _wait("scsnet's job of the study", lambda: _job_of_study(client, study_uid))
        job = _wait("the job to finish", lambda: _finished(client, job["id"]))
        assert job["state"] == "succeeded", job.get("problem")
        job = _wait("the delivery", lambda: _delivered(client, job["id"]))
        print(f"\nOrthanc -> scsnet -> Orthanc: {time.monotonic() - started:.1f} s")
        assert job["delivery"]["state"] == "delivered" and job["delivery"]["attempts"] == 1, job["delivery"]
        _check_results_in_orthanc(setup, client, job, study_uid)


def _zip(files: list[Path]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in files:
            archive.write(path, path.name)
    return buffer.getvalue()


def test_a_delivery_while_orthanc_is_down_is_retried_and_arrives_once_it_is_back(
    setup: Setup, real_dwi_paths: dict[str, Path], tmp_path: Path
) -> None:
    files, study_uid = _new_study(real_dwi_paths, tmp_path)
    with setup.served.client(setup.key) as client:
        job = client.post("/v1/jobs", files=[("files", ("study.zip", _zip(files)))]).json()  # the upload API
        setup.pacs.stop()  # before the job ends; its storage folder stays
        try:
            def failed_once() -> dict[str, Any] | None:
                record = client.get(f"/v1/jobs/{job['id']}").json()
                delivery = record.get("delivery") or {}
                return record if delivery.get("attempts", 0) >= 1 and delivery.get("state") in {"pending", "failed"} else None

            down = _wait("a failed delivery attempt", failed_once, timeout_s=120)
        finally:
            setup.pacs.start()
        assert down["state"] == "succeeded"  # a failed delivery never fails the analysis
        assert down["delivery"]["last_error"] == "could not connect", down["delivery"]
        if "study_uid" in down:  # recorded from report.json for an upload job
            assert down["study_uid"] == study_uid
        back = _wait("the delivery after Orthanc came back", lambda: _delivered(client, job["id"]), timeout_s=120)
        assert back["delivery"]["state"] == "delivered" and back["delivery"]["attempts"] >= 2, back["delivery"]
        assert back["delivery"]["last_error"] is None
        _check_results_in_orthanc(setup, client, back, study_uid)

        # and once more on request: the state goes pending, then delivered again
        again = client.post(f"/v1/jobs/{job['id']}/deliver")
        assert again.status_code == 202 and again.json()["delivery"]["state"] == "pending"
        done = _wait("the delivery on request", lambda: _delivered(client, job["id"]), timeout_s=60)
        assert done["delivery"]["state"] == "delivered" and done["delivery"]["attempts"] == 1
