"""No patient identifier in a derived file, and owner-only files in the data dir (issue 22).

The real cervical DWI is written as a DICOM study whose headers carry distinctive identifiers
(a name, an ID, a birth date, an institution, a device serial number, physicians ...). Sent
through ``scsnet analyze`` and through the real service (``scsnet serve``: embedded Redis with
its append-only file, a real Celery worker, the SQLite job store), every file written is searched
for each identifier, in the forms it could take (DICOM ``^`` person names, with a space, the
family name alone, ISO dates; UTF-8, UTF-16, base64 as in Celery messages; inside gzip). Only
the DICOM outputs (seg.dcm, sr.dcm, qc.dcm) carry them, as they must: they are searched too, to
show that the search finds what is there. Every file and folder of the data dir must be
owner-only; run as root, the user ``nobody`` is shown unable to read the store, the log and the
outputs.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import service_helpers as h
from dicom_synth import write_dicom_series

from core.ingest.nifti import load_nifti_dwi
from core.ingest.sidecar import ACQUISITION_FIELDS, acquisition_fields
from core.settings import SHIPPED_MODEL_DIR
from service.privacy import secure_data_dir, secure_process

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

IDENTIFIERS = {
    "PatientName": "Zzprivacy^Quentin",
    "PatientID": "PRIV-7731-XQ",
    "PatientBirthDate": "19130405",
    "InstitutionName": "Zzinstitute Hospital Q",
    "InstitutionAddress": "17 Zzstreet Qtown",
    "InstitutionalDepartmentName": "Zzdepartment Radiology",
    "DeviceSerialNumber": "SN-ZZ-99173",
    "StationName": "ZZSTATION42",
    "ReferringPhysicianName": "Zzreferrer^Ophelia",
    "PerformingPhysicianName": "Zzperformer^Cornelius",
    "OperatorsName": "Zzoperator^Barnaby",
    "StudyDate": "19990817",  # also the series, acquisition and content dates
}
"""Distinctive values (searched for) of the attributes that identify a patient or a place."""

ATTRIBUTES: dict[str, Any] = {
    **IDENTIFIERS,
    "SeriesDate": "19990817",
    "AcquisitionDate": "19990817",
    "ContentDate": "19990817",
    "PatientSex": "M",
    "PatientAge": "087Y",
    "PatientWeight": 71.5,
    "PatientSize": 1.62,
    "ManufacturerModelName": "Prisma",
    "AccessionNumber": "ACC5550123",  # kept on purpose: results are filed against the order
}
DICOM_OUTPUTS = frozenset({"seg.dcm", "sr.dcm", "qc.dcm"})
"""Objects filed in the patient's own study: they must carry the patient module."""


# ----------------------------------------------------------------------------------------------
# Finding identifiers in bytes


def _forms(value: str) -> set[str]:
    """The spellings ``value`` may take in a file: as stored, a person name with its ``^``
    replaced by a space and its family name alone, a DICOM date as ISO 8601."""
    forms = {value, value.replace("^", " ")}
    if "^" in value:
        forms.add(value.split("^")[0])
    if len(value) == 8 and value.isdigit():
        forms.add(f"{value[:4]}-{value[4:6]}-{value[6:]}")
    return forms


def _base64_cores(text: str) -> set[bytes]:
    """The base64 characters fixed by ``text`` alone, at each of the three byte alignments it
    may have inside a longer encoded string (kombu sends Celery message bodies in base64)."""
    raw = text.encode()
    cores = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        first, last = -(-8 * offset // 6), 8 * (offset + len(raw)) // 6
        cores.add(encoded[first:last])
    return cores


PATTERNS = {
    name: (
        {form.lower().encode() for form in _forms(value)} | {form.lower().encode("utf-16-le") for form in _forms(value)},
        set().union(*(_base64_cores(form) for form in _forms(value))),
    )
    for name, value in IDENTIFIERS.items()
}


def identifiers_in(blob: bytes) -> set[str]:
    """The names (keys of :data:`IDENTIFIERS`) of the identifiers found in ``blob``."""
    lower = blob.lower()
    return {
        name for name, (plain, encoded) in PATTERNS.items()
        if any(p in lower for p in plain) or any(p in blob for p in encoded)
    }  # fmt: skip


def _contents(path: Path) -> bytes:
    """The file's bytes, followed by its decompressed bytes when it is gzipped."""
    blob = path.read_bytes()
    if blob[:2] == b"\x1f\x8b":
        blob += gzip.decompress(blob)
    return blob


def scan(root: Path, *, skip: frozenset[str] = DICOM_OUTPUTS) -> dict[str, set[str]]:
    """Every regular file under ``root`` in which an identifier is found (relative path ->
    identifier names), leaving out files named in ``skip`` and uploaded inputs
    (``jobs/<id>/input``)."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        # The raw upload is the patient's own DICOM, kept until the job is deleted (or at once,
        # where inputs are not kept): it is not a derived file, so it is left out here.
        if len(relative.parts) >= 3 and relative.parts[0] == "jobs" and relative.parts[2] == "input":
            continue
        if path.name in skip or path.is_symlink() or not path.is_file():
            continue
        try:
            hits = identifiers_in(_contents(path))
        except FileNotFoundError:  # removed while walking (a running service)
            continue
        if hits:
            found[str(relative)] = hits
    return found


def loose_modes(root: Path) -> list[str]:
    """Files and folders under ``root`` (and ``root``) granting any group or other permission."""
    loose = []
    for path in [root, *sorted(root.rglob("*"))]:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISLNK(mode) and mode & 0o077:
            loose.append(f"{path.relative_to(root.parent)} {stat.filemode(mode)}")
    return loose


# ----------------------------------------------------------------------------------------------
# The study


@pytest.fixture(scope="module")
def identified_study(real_dwi_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real cervical DWI as a DICOM study carrying :data:`ATTRIBUTES` in every file."""
    dwi = load_nifti_dwi(real_dwi_paths["image"], bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"])
    folder = tmp_path_factory.mktemp("identified") / "study"
    write_dicom_series(real_dwi_paths["image"], dwi.bvals, dwi.bvecs, folder / "series5", attributes=ATTRIBUTES)
    return folder


def test_the_search_finds_every_identifier_in_every_form() -> None:
    assert identifiers_in(b"...ZZPRIVACY^QUENTIN...") == {"PatientName"}
    assert identifiers_in("Zzprivacy Quentin".encode("utf-16-le")) == {"PatientName"}
    assert identifiers_in(b'"PatientBirthDate": "1913-04-05"') == {"PatientBirthDate"}
    for prefix in (b"", b"a", b"ab"):
        message = base64.b64encode(prefix + json.dumps({"id": "SN-ZZ-99173", "who": "Zzoperator^Barnaby"}).encode())
        assert identifiers_in(message) == {"DeviceSerialNumber", "OperatorsName"}
    assert identifiers_in(b"DTI cervical, 3 T, TE 80 ms") == set()


# ----------------------------------------------------------------------------------------------
# The sidecar filter (fast)


def test_the_sidecar_keeps_acquisition_fields_and_drops_every_identifier() -> None:
    """A dcm2niix sidecar as written without anonymisation (-ba n) holds the patient's name,
    ID, birth date, sex, age, weight, the institution, the station, the device serial number,
    physicians and the acquisition date: none of them is kept; acquisition fields are."""
    acquisition = {
        "Modality": "MR", "MagneticFieldStrength": 3, "Manufacturer": "Siemens", "ManufacturersModelName": "Prisma",
        "SoftwareVersions": "syngo MR XA30", "SeriesDescription": "DTI cervical", "ProtocolName": "DTI cervical",
        "SeriesNumber": 5, "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"], "PatientPosition": "HFS",
        "EchoTime": 0.08, "RepetitionTime": 4, "SliceThickness": 5, "SpacingBetweenSlices": 5,
        "PhaseEncodingDirection": "j-", "EffectiveEchoSpacing": 0.00058, "TotalReadoutTime": 0.041,
        "ParallelReductionFactorInPlane": 2, "SliceTiming": [0.0, 0.5], "ConversionSoftware": "dcm2niix",
        "ConversionSoftwareVersion": "v1.0.20260724", "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4",
        "AccessionNumber": "ACC5550123",
    }  # fmt: skip
    identifying = {
        "PatientName": "Zzprivacy^Quentin", "PatientID": "PRIV-7731-XQ", "PatientBirthDate": "1913-04-05",
        "PatientSex": "M", "PatientAge": 87, "PatientWeight": 71.5, "PatientSize": 1.62,
        "InstitutionName": "Zzinstitute Hospital Q", "InstitutionAddress": "17 Zzstreet Qtown",
        "InstitutionalDepartmentName": "Zzdepartment Radiology", "StationName": "ZZSTATION42",
        "DeviceSerialNumber": "SN-ZZ-99173", "ReferringPhysicianName": "Zzreferrer^Ophelia",
        "PerformingPhysicianName": "Zzperformer^Cornelius", "OperatorsName": "Zzoperator^Barnaby",
        "AcquisitionDateTime": "1999-08-17T12:01:02.000000", "AcquisitionTime": "12:01:02.000000",
        "StudyDate": "1999-08-17", "StudyID": "4711", "SomethingNewFromDcm2niix": "Zzprivacy",
    }  # fmt: skip
    kept = acquisition_fields({**identifying, **acquisition})
    assert kept == acquisition
    assert identifiers_in(json.dumps(kept).encode()) == set()
    assert not set(identifying) & ACQUISITION_FIELDS


# ----------------------------------------------------------------------------------------------
# Owner-only files (fast)


def test_secure_process_sets_the_umask_077() -> None:
    previous = os.umask(0o022)
    try:
        secure_process()
        assert os.umask(0o022) == 0o077
    finally:
        os.umask(previous)


def test_a_loose_data_dir_is_made_owner_only_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    new = secure_data_dir(tmp_path / "new" / "var")
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o755)
    with caplog.at_level(logging.WARNING, logger="service.privacy"):
        secure_data_dir(loose)
        os.chmod(loose, 0o750)
        secure_data_dir(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    warnings = [r.getMessage() for r in caplog.records if r.name == "service.privacy"]
    assert len(warnings) == 1 and str(loose) in warnings[0] and "755" in warnings[0], warnings


# ----------------------------------------------------------------------------------------------
# scsnet analyze


def test_scsnet_analyze_writes_no_identifier_outside_the_dicom_outputs(identified_study: Path, tmp_path: Path) -> None:
    """dwi.json, report.json, qc.html, the masks, maps and pictures hold none of the
    identifiers; seg.dcm, sr.dcm and qc.dcm carry them (the search finds them there). The
    study and series UIDs and the accession number stay, to file the results."""
    from cli.main import main

    out = tmp_path / "out"
    assert main(["analyze", str(identified_study), "--out", str(out), "--model-dir", str(SHIPPED_MODEL_DIR)]) == 0
    assert {"dwi.json", "report.json", "qc.html", "dwi.nii.gz", *DICOM_OUTPUTS} <= {p.name for p in out.iterdir()}
    assert scan(out) == {}
    for name in DICOM_OUTPUTS:
        assert "PatientID" in identifiers_in((out / name).read_bytes()), name
    sidecar = json.loads((out / "dwi.json").read_text())
    assert set(sidecar["dcm2niix"]) <= ACQUISITION_FIELDS
    assert {"EchoTime", "RepetitionTime", "MagneticFieldStrength", "SliceThickness"} <= set(sidecar["dcm2niix"])
    assert not [k for k in sidecar["dcm2niix"] if k.startswith("Patient") and k != "PatientPosition"]
    report = json.loads((out / "report.json").read_text())
    import pydicom

    source = pydicom.dcmread(next(identified_study.rglob("IM*")), stop_before_pixels=True)
    for section in (sidecar["input"], report["input"]):
        assert section["study_instance_uid"] == source.StudyInstanceUID
        assert section["series_instance_uid"] == source.SeriesInstanceUID
        assert section["accession_number"] == "ACC5550123"


# ----------------------------------------------------------------------------------------------
# The service


@dataclass
class ServedJob:
    """What one job through ``scsnet serve`` left behind, looked at while serving and after."""

    root: Path
    data: Path
    job_id: str
    api_text: str
    dicom_outputs: dict[str, bytes]
    while_serving: dict[str, set[str]]
    loose_while_serving: list[str]
    files_while_serving: list[str]
    umasks: dict[str, int]


def umask_of(pid: int) -> int:
    """The umask of a running process (Linux: the Umask line of /proc/PID/status)."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Umask:"))
    return int(line.split()[1], 8)


def _descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (children, grandchildren ...) and its command line."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout.splitlines()
    table = [(int(r.split(None, 2)[0]), int(r.split(None, 2)[1]), r.split(None, 2)[2]) for r in rows if r.strip()]
    found: dict[int, str] = {}
    parents = {pid}
    while parents:
        children = {(p, args) for p, ppid, args in table if ppid in parents and p not in found}
        found.update(children)
        parents = {p for p, _ in children}
    return found


def _stored_zip(folder: Path) -> bytes:
    """``folder`` zipped without compression, so the stored upload holds the identifiers as is."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder.parent).as_posix())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served_job(identified_study: Path) -> Iterator[ServedJob]:
    root = h.short_tmpdir("scsp")
    os.chmod(root, 0o755)  # only the data dir's own modes may keep other users out
    data = root / "var"
    served = h.start_serve(data, model_dir=SHIPPED_MODEL_DIR)
    try:
        umasks = {f"scsnet serve ({served.process.pid})": umask_of(served.process.pid)}
        umasks.update({f"{args} ({pid})": umask_of(pid) for pid, args in _descendants(served.process.pid).items()})
        key, _ = h.create_key(data, "privacy")
        with served.client(key) as client:
            response = client.post("/v1/jobs", files=[("files", ("study.zip", _stored_zip(identified_study)))])
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]

            def finished() -> dict[str, Any] | None:
                job = client.get(f"/v1/jobs/{job_id}").json()
                return job if job["state"] in {"succeeded", "failed"} else None

            job = h.wait_until(finished, timeout_s=300, what="the job to finish", interval_s=0.2)
            assert job["state"] == "succeeded", job["problem"]
            api_text = client.get(f"/v1/jobs/{job_id}").text + client.get("/v1/jobs").text
            links = {"seg.dcm": "seg", "sr.dcm": "sr", "qc.dcm": "qc.dcm"}
            dicom_outputs = {name: client.get(job["links"][link]).content for name, link in links.items()}
        h.wait_until(lambda: (data / "scsnet.db-wal").exists(), timeout_s=10, what="the SQLite WAL")
        files = sorted(str(p.relative_to(data)) for p in data.rglob("*"))
        result = ServedJob(root, data, job_id, api_text, dicom_outputs, scan(data), loose_modes(data), files, umasks)
    finally:
        assert served.stop() == 0, served.log_path.read_text()[-3000:]
    yield result
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.service
def test_a_job_through_the_service_leaves_no_identifier_in_any_file(served_job: ServedJob) -> None:
    """Outputs, the worker log, the SQLite file and its WAL (while serving), the Redis
    append-only file and dump (after stopping), the service's own log and the API's answers hold
    none of the identifiers; the DICOM outputs carry them."""
    data = served_job.data
    assert any(f.endswith("scsnet.db-wal") for f in served_job.files_while_serving)
    redis_files = [p for p in (data / "redis").rglob("*") if p.is_file() and p.suffix in {".aof", ".rdb"}]
    assert redis_files, sorted((data / "redis").rglob("*"))
    # the Celery message in Redis carries the job id and its token, nothing else
    bodies = re.findall(rb'"body": "([A-Za-z0-9+/=]+)"', (data / "redis" / "appendonly.aof").read_bytes())
    messages = [json.loads(base64.b64decode(body)) for body in bodies]
    assert messages and all(
        len(args) == 2 and args[0] == served_job.job_id and re.fullmatch(r"[0-9a-f]+", args[1]) and kwargs == {}
        for args, kwargs, _ in messages
    ), messages
    assert (data / "logs" / "worker.log").stat().st_size > 0
    assert served_job.while_serving == {}
    assert scan(data) == {}
    assert identifiers_in(served_job.api_text.encode()) == set()
    serve_logs = list(served_job.root.glob("serve-*.log"))
    assert serve_logs and all(identifiers_in(p.read_bytes()) == set() for p in serve_logs)
    out = data / "jobs" / served_job.job_id / "out"
    for name, content in served_job.dicom_outputs.items():
        assert "PatientID" in identifiers_in(content), name
        assert "PatientID" in identifiers_in((out / name).read_bytes()), name
    assert json.loads((out / "dwi.json").read_text())["input"]["accession_number"] == "ACC5550123"


@pytest.mark.service
def test_every_file_and_folder_of_the_data_dir_is_owner_only(served_job: ServedJob) -> None:
    """Nothing under the data dir (job folders, outputs, logs, scsnet.db*, the Redis folder)
    grants group or other users any permission, while serving and after."""
    assert served_job.loose_while_serving == []
    assert loose_modes(served_job.data) == []
    # scsnet serve, redis-server, the Celery worker and its pool process
    assert len(served_job.umasks) >= 4 and all(u == 0o077 for u in served_job.umasks.values()), served_job.umasks
    names = {Path(f).name for f in served_job.files_while_serving}
    assert {"scsnet.db", "scsnet.db-wal", "worker.log", "report.json", "dwi.json"} <= names


@pytest.mark.service
def test_another_local_user_cannot_read_the_data_dir(served_job: ServedJob) -> None:
    """As ``nobody``: a world-readable file beside the data dir can be read (the probe works),
    but not the job store, the worker log, the Redis files or an output; not even if an
    operator loosens the data dir itself, since each file is owner-only too."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run a probe as another user (nobody); the mode bits are checked by the test above")
    data = served_job.data

    def nobody_reads(path: Path) -> bool:
        probe = subprocess.run(["cat", str(path)], user="nobody", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30, check=False)
        return probe.returncode == 0

    control = served_job.root / "control.txt"
    control.write_text("readable")
    os.chmod(control, 0o644)
    assert nobody_reads(control)
    secrets = [
        data / "scsnet.db", data / "logs" / "worker.log", data / "jobs" / served_job.job_id / "out" / "report.json",
        *[p for p in (data / "redis").rglob("*") if p.is_file()],
    ]  # fmt: skip
    assert not [p for p in secrets if nobody_reads(p)]
    os.chmod(data, 0o755)
    try:
        assert not [p for p in secrets if nobody_reads(p)]
    finally:
        os.chmod(data, 0o700)


# ----------------------------------------------------------------------------------------------
# Processes started without scsnet serve


def test_a_gateway_built_by_the_uvicorn_factory_is_owner_only(tmp_path: Path) -> None:
    """``uvicorn --factory app.main:app_from_env`` (here: the factory itself, in a process
    started with umask 022) sets the umask 077 and makes the data dir owner-only."""
    data = tmp_path / "var"
    code = "import os; from app.main import app_from_env; app_from_env(); print(oct(os.umask(0)))"
    env = h.env_for(data, SCSNET_REDIS_URL="redis://127.0.0.1:1/0")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False, umask=0o022
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "0o77"
    assert loose_modes(data) == []


@pytest.mark.service
def test_a_celery_worker_started_directly_is_owner_only(redis_server: h.RedisServer, tmp_path: Path) -> None:
    """``celery -A worker.celery_app worker`` started with umask 022: the worker and its pool
    process run with umask 077, and the data dir and the job store it creates are owner-only."""
    from cli.embedded import worker_argv

    data = tmp_path / "var"
    env = h.env_for(data, SCSNET_REDIS_URL=redis_server.url, SCSNET_MODEL_DIR=str(SHIPPED_MODEL_DIR), SCSNET_HEARTBEAT_S="1")
    with open(tmp_path / "celery.log", "w") as sink:
        worker = subprocess.Popen(
            worker_argv(queue_name="privacy"), env=env, stdout=sink, stderr=subprocess.STDOUT, umask=0o022, cwd=tmp_path
        )  # fmt: skip
    try:
        h.wait_until(lambda: (data / "scsnet.db").exists() and _descendants(worker.pid), timeout_s=120, what="the worker's first heartbeat")
        umasks = {pid: umask_of(pid) for pid in [worker.pid, *_descendants(worker.pid)]}
        assert len(umasks) >= 2 and set(umasks.values()) == {0o077}, umasks  # the worker and its pool process
        assert loose_modes(data) == []
    finally:
        worker.terminate()
        worker.wait(60)
