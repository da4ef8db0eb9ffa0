"""DICOMweb STOW-RS in: instances a PACS sends gather per tenant and study, and a job starts on
them once they settle.

Layout under the data dir::

    stow/incoming-<random>/part-NNNNNN   one request's parts while it is received (removed after)
    stow/<batch id>/<SOP Instance UID>.dcm   the instances of a batch still gathering
    stow/<batch id>/<SOP Instance UID>.sha256   their SHA-256, computed while received

Each instance is judged by its header alone (:func:`core.ingest.dicom_peek.peek`, no pydicom in
the gateway) and moved by rename into the tenant's batch gathering that study
(:meth:`service.store.Store.stow_arrive`); a re-sent SOP instance replaces the earlier copy and
counts once. When no instance of a batch has arrived for ``stow_settle_s``, :func:`settle`
claims it (one gateway wins), moves its folder to ``jobs/<batch id>/input/dicom`` and starts a
job with the batch's id on it, dispatched as an upload is. Instances of the study arriving after
the claim gather into a new batch, which starts a job of its own.

Failure reasons (PS3.18 Store Instances Response Module, PS3.4 Annex GG status codes):
``0xC000`` (cannot understand) for a part that is not application/dicom or not a DICOM Part 10
file with the UIDs needed; ``0xA900`` (data set does not match SOP class: the standard code of the
"data set does not match" family) for an instance whose Study Instance UID differs from the one
in the URL. Microsoft's DICOM server uses the non-standard ``0xA901`` for this last case; we keep
to the standard code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.requeue import dispatch
from app.uploads import RelatedPart
from core.ingest.dicom_peek import DicomIds, NotDicom, peek
from service.queue import JobQueue
from service.storage import Storage, idle_s
from service.store import Job, Store, StowBatch

log = logging.getLogger(__name__)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
CANNOT_UNDERSTAND = 0xC000
STUDY_MISMATCH = 0xA900
RECOVER_AFTER_S = 60.0
"""A batch claimed this long ago without a job is started again (its gateway died)."""
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_BATCH_ID = re.compile(r"^[0-9a-f]{32}$")
_INCOMING = "incoming-"


def is_uid(value: str) -> bool:
    """A DICOM UID as PS3.5 9.1 writes it: digits and dots, at most 64 characters."""
    return len(value) <= 64 and bool(_UID.match(value))


@dataclass(frozen=True)
class Outcome:
    """What became of one part: stored (``reason`` None) or failed with a PS3.18 failure reason;
    the UIDs when they could be read."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    reason: int | None = None


class StowArea:
    """The STOW-RS folders under the data dir (``<data>/stow``)."""

    def __init__(self, data_root: Path) -> None:
        self.root = Path(data_root).absolute() / "stow"

    def incoming(self) -> Path:
        """A new, empty folder for one request's parts."""
        self.root.mkdir(parents=True, exist_ok=True)
        folder = self.root / f"{_INCOMING}{secrets.token_hex(8)}"
        folder.mkdir()
        return folder

    def batch_dir(self, batch_id: str) -> Path:
        """The folder of a gathering batch (``batch_id`` is made by the store: hex)."""
        if not _BATCH_ID.match(batch_id):
            raise ValueError(f"not a batch id: {batch_id!r}")
        return self.root / batch_id

    def batch_ids(self) -> list[str]:
        """Ids of the batch folders present."""
        if not self.root.is_dir():
            return []
        return [
            p.name
            for p in self.root.iterdir()
            if _BATCH_ID.match(p.name) and p.is_dir()
        ]

    def incoming_dirs(self) -> list[Path]:
        """The folders of requests being received (or cut off mid-way)."""
        if not self.root.is_dir():
            return []
        return [
            p
            for p in self.root.iterdir()
            if p.name.startswith(_INCOMING) and p.is_dir()
        ]


# --- receiving ---------------------------------------------------------------------------


def judge(
    part: RelatedPart, *, study_uid: str | None
) -> tuple[DicomIds | None, Outcome | None]:
    """The part's UIDs if it can be stored, else the failed outcome (``study_uid``: the URL's)."""
    if part.path is None:
        return None, Outcome(None, None, CANNOT_UNDERSTAND)
    try:
        ids = peek(part.path)
    except NotDicom:
        return None, Outcome(None, None, CANNOT_UNDERSTAND)
    if not (
        is_uid(ids.sop_class_uid)
        and is_uid(ids.sop_instance_uid)
        and is_uid(ids.study_instance_uid)
    ):
        # the SOP Instance UID names the stored file: only digits and dots may
        return None, Outcome(None, None, CANNOT_UNDERSTAND)
    if study_uid is not None and ids.study_instance_uid != study_uid:
        return None, Outcome(ids.sop_class_uid, ids.sop_instance_uid, STUDY_MISMATCH)
    return ids, None


def accept(
    store: Store,
    area: StowArea,
    tenant_id: int,
    parts: list[RelatedPart],
    *,
    study_uid: str | None,
) -> list[Outcome]:
    """Judge each received part and move those that pass into the tenant's gathering batch of
    their study; the outcome of each part, in order. Blocking: run it in a worker thread."""
    outcomes = []
    for part in parts:
        ids, failed = judge(part, study_uid=study_uid)
        if failed is not None or ids is None or part.path is None:
            outcomes.append(failed or Outcome(None, None, CANNOT_UNDERSTAND))
            continue
        sidecar = part.path.with_name(part.path.name + ".sha256")
        sidecar.write_text(part.sha256)
        store.stow_arrive(
            tenant_id,
            ids.study_instance_uid,
            _placer(area, part.path, sidecar, ids.sop_instance_uid),
        )
        outcomes.append(Outcome(ids.sop_class_uid, ids.sop_instance_uid))
    return outcomes


def _placer(
    area: StowArea, path: Path, sidecar: Path, sop_instance_uid: str
) -> Callable[[str], tuple[int, int]]:
    def place(batch_id: str) -> tuple[int, int]:
        folder = area.batch_dir(batch_id)
        folder.mkdir(exist_ok=True)
        target = folder / f"{sop_instance_uid}.dcm"
        try:
            added, before = (
                0,
                target.stat().st_size,
            )  # re-sent: replaces the earlier copy
        except FileNotFoundError:
            added, before = 1, 0
        size = path.stat().st_size
        os.replace(sidecar, folder / f"{sop_instance_uid}.sha256")
        os.replace(path, target)
        return added, size - before

    return place


def _sop(outcome: Outcome) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if outcome.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [outcome.sop_class_uid]}
    if outcome.sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [outcome.sop_instance_uid]}
    if outcome.reason is not None:
        item["00081197"] = {"vr": "US", "Value": [outcome.reason]}
    return item


def store_response(outcomes: list[Outcome]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the Store Instances Response Module (PS3.18 10.5.3, in the DICOM JSON
    model of PS3.18 F.2): 200 every instance stored, 202 some, 409 none. The Retrieve URL
    (0008,1190) is left out, at the top and per instance: this service does not serve WADO-RS."""
    stored = [o for o in outcomes if o.reason is None]
    failed = [o for o in outcomes if o.reason is not None]
    body: dict[str, Any] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [_sop(o) for o in stored]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [_sop(o) for o in failed]}
    status = 200 if not failed else 202 if stored else 409
    return status, body


# --- settling ----------------------------------------------------------------------------


def _digests(folder: Path) -> list[dict[str, Any]]:
    """Size and SHA-256 of each instance in ``folder`` (from its sidecar, which is removed; hashed
    again if the sidecar is gone), in file-name order."""
    files = []
    for path in sorted(folder.glob("*.dcm")):
        sidecar = path.with_suffix(".sha256")
        try:
            sha256 = sidecar.read_text().strip()
        except FileNotFoundError:
            digest = hashlib.sha256()
            with path.open("rb") as source:
                for block in iter(lambda: source.read(1 << 20), b""):
                    digest.update(block)
            sha256 = digest.hexdigest()
        files.append({"field": "stow", "size": path.stat().st_size, "sha256": sha256})
    for sidecar in folder.glob("*.sha256"):
        sidecar.unlink(missing_ok=True)
    return files


def start_job(
    store: Store, storage: Storage, area: StowArea, queue: JobQueue, batch: StowBatch
) -> str | None:
    """Move a claimed batch's instances into the input folder of a job with the batch's id,
    store that job (on the batch's study) and send it; the job id, None if the instances are
    lost. Safe to repeat after a crash at any point (each step checks what is done)."""
    source, dest = area.batch_dir(batch.id), storage.input_dir(batch.id) / "dicom"
    if source.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, dest)  # same file system: atomic
    elif not dest.is_dir():
        log.error(
            "STOW-RS batch %s has no instances on disk any more; forgotten", batch.id
        )
        store.stow_forget(batch.id)
        return None
    inputs = {
        "kind": "dicom",
        "paths": ["dicom"],
        "bval": None,
        "bvec": None,
        "files": _digests(dest),
        "source": "stow-rs",
    }
    job = store.stow_start_job(
        batch.id,
        Job(
            id=batch.id,
            tenant_id=batch.tenant_id,
            study_uid=batch.study_uid,
            inputs=inputs,
        ),
    )
    try:
        dispatch(store, queue, job.id)
    except Exception as exc:  # noqa: BLE001 - the job is stored: the re-enqueue loop will send it
        log.warning(
            "STOW-RS job %s stored but not sent to the broker (%s); it will be re-sent",
            job.id,
            type(exc).__name__,
        )
    return job.id


def settle(
    store: Store, storage: Storage, area: StowArea, queue: JobQueue, *, settle_s: float, recover_after_s: float = RECOVER_AFTER_S
) -> list[str]:
    """One pass: start a job on every batch that has settled, and on any batch claimed more than
    ``recover_after_s`` ago whose gateway died before starting its job; the ids of the jobs started."""
    started = []
    for batch_id in store.stow_settled(settle_s=settle_s):
        batch = store.stow_claim(batch_id, settle_s=settle_s)
        if (
            batch is not None
        ):  # else another gateway claimed it, or an instance just arrived
            job_id = start_job(store, storage, area, queue, batch)
            if job_id:
                log.info(
                    "STOW-RS: job %s started on %d instance(s) of a study",
                    job_id,
                    batch.instances,
                )
                started.append(job_id)
    for batch in store.stow_unstarted(claimed_before_s=recover_after_s):
        log.warning(
            "STOW-RS batch %s was claimed but its job never started; starting it now",
            batch.id,
        )
        job_id = start_job(store, storage, area, queue, batch)
        if job_id:
            started.append(job_id)
    return started


def sweep(store: Store, area: StowArea, *, grace_s: float) -> list[str]:
    """Remove folders untouched for ``grace_s`` that nothing will read: those of requests cut off
    mid-way (a gateway killed while receiving) and of batches the store no longer gathers; the
    names removed. A live batch's folder is never removed."""
    removed = [p for p in area.incoming_dirs() if idle_s(p) > grace_s]
    present = area.batch_ids()
    live = store.stow_live(present) if present else set()
    removed += [
        area.batch_dir(i)
        for i in present
        if i not in live and idle_s(area.batch_dir(i)) > grace_s
    ]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    if removed:
        log.warning(
            "removed %d STOW-RS folder(s) nothing will read: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return [p.name for p in removed]
