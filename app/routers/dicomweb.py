"""``/v1/dicomweb``: DICOMweb STOW-RS in (PS3.18 10.5), so a PACS can send a study itself.

The instances of a study gather per tenant and start a job once none has arrived for
``stow_settle_s`` (:mod:`app.stow`); the job is found with ``GET /v1/jobs?study_uid=``.
"""

from __future__ import annotations

import shutil
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from app.deps import SettingsDep, StoreDep, TenantDep
from app.problems import problem_responses
from app.settings import GatewaySettings
from app.stow import DICOM, DICOM_JSON, StowArea, accept, store_response
from app.uploads import MAX_PARTS, receive_related
from service.store import Store, Tenant

router = APIRouter(prefix="/v1/dicomweb", tags=["dicomweb"])

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"


class DicomJSONResponse(JSONResponse):
    media_type = DICOM_JSON


_SOP_ITEM = {
    "type": "object",
    "description": "(0008,1150) Referenced SOP Class UID, (0008,1155) Referenced SOP Instance UID, "
    "and in a failed item (0008,1197) Failure Reason (US): 0xC000 cannot understand, 0xA900 the study "
    "differs from the URL's",
    "additionalProperties": {
        "type": "object",
        "properties": {
            "vr": {"type": "string"},
            "Value": {"type": "array", "items": {}},
        },
    },
}
_SEQUENCE = {
    "type": "object",
    "properties": {
        "vr": {"const": "SQ"},
        "Value": {"type": "array", "items": _SOP_ITEM},
    },
}
STORE_RESPONSE = {
    "type": "object",
    "description": "Store Instances Response Module (PS3.18 10.5.3) in the DICOM JSON model: (0008,1199) "
    "Referenced SOP Sequence (stored), (0008,1198) Failed SOP Sequence; no Retrieve URL (no WADO-RS here)",
    "properties": {"00081199": _SEQUENCE, "00081198": _SEQUENCE},
}
STOW_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            'multipart/related; type="application/dicom"': {
                "schema": {"type": "string", "format": "binary"},
                "description": "one DICOM Part 10 instance per part (Content-Type: application/dicom)",
            }
        },
    }
}
STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "every instance stored",
        "content": {DICOM_JSON: {"schema": STORE_RESPONSE}},
    },
    202: {
        "description": "some instances stored, some failed",
        "content": {DICOM_JSON: {"schema": STORE_RESPONSE}},
    },
    409: {
        "description": "no instance stored",
        "content": {DICOM_JSON: {"schema": STORE_RESPONSE}},
    },
    **problem_responses(400, 401, 408, 413, 415, 422),
}


async def _stow(
    request: Request,
    tenant: Tenant,
    settings: GatewaySettings,
    store: Store,
    *,
    study_uid: str | None,
) -> DicomJSONResponse:
    area: StowArea = request.app.state.stow
    incoming = await anyio.to_thread.run_sync(area.incoming)
    try:
        parts = await receive_related(
            request.stream(),
            content_type=request.headers.get("content-type"),
            content_length=request.headers.get("content-length"),
            dest=incoming,
            max_bytes=settings.max_upload_bytes,
            media_type=DICOM,
            max_parts=min(MAX_PARTS, settings.max_zip_entries),
        )
        outcomes = await anyio.to_thread.run_sync(
            lambda: accept(store, area, tenant.id, parts, study_uid=study_uid)
        )
    finally:
        await anyio.to_thread.run_sync(
            lambda: shutil.rmtree(incoming, ignore_errors=True)
        )
    status, body = store_response(outcomes)
    return DicomJSONResponse(body, status_code=status)


@router.post(
    "/studies",
    response_class=DicomJSONResponse,
    responses=STOW_RESPONSES,
    openapi_extra=STOW_BODY,
    status_code=200,
)
async def store_instances(
    request: Request, tenant: TenantDep, settings: SettingsDep, store: StoreDep
) -> DicomJSONResponse:
    """STOW-RS: store DICOM instances (multipart/related; type="application/dicom"); each study starts a job once they settle."""
    return await _stow(request, tenant, settings, store, study_uid=None)


@router.post(
    "/studies/{study_uid}",
    response_class=DicomJSONResponse,
    responses=STOW_RESPONSES,
    openapi_extra=STOW_BODY,
    status_code=200,
)
async def store_study_instances(
    request: Request,
    study_uid: Annotated[
        str, Path(max_length=64, pattern=UID_PATTERN, description="Study Instance UID")
    ],
    tenant: TenantDep,
    settings: SettingsDep,
    store: StoreDep,
) -> DicomJSONResponse:
    """STOW-RS: store DICOM instances of one study; one of another study fails (0xA900)."""
    return await _stow(request, tenant, settings, store, study_uid=study_uid)
