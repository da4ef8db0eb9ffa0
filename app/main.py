"""The HTTP gateway: ``create_app(settings)`` builds the FastAPI application.

It stores uploads, records jobs and enqueues them by task name; it never imports the worker's
heavy modules and never waits on a task. At start and every ``requeue_interval_s`` it re-sends
queued jobs the broker has lost and removes upload folders no job owns (``app.sweep``); a second
loop starts a job on each study sent by STOW-RS once it has settled (``app.stow``). Run it
with ``scsnet serve`` (or ``uvicorn --factory app.main:app_from_env``).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

import core
from app import problems
from app.cursors import Cursors
from app.metrics import Metrics, MetricsMiddleware
from app.middleware import BodyTimeoutMiddleware, NoStoreMiddleware
from app.requeue import requeue_lost
from app.routers import artifacts, dicomweb, jobs, system
from app.settings import GatewaySettings
from app.stow import StowArea, settle
from app.stow import sweep as sweep_stow
from app.sweep import sweep_orphans
from app.throttle import AuthThrottle
from service.privacy import secure_service
from service.queue import CeleryQueue, JobQueue
from service.retention import purge_expired
from service.storage import Storage
from service.store import Store

log = logging.getLogger(__name__)


async def _run_pass(name: str, work: Callable[[], object]) -> None:
    """Run one housekeeping pass in a thread; a failure (store, broker or disk unavailable) is
    logged by its kind only and the pass is tried again next round."""
    try:
        await anyio.to_thread.run_sync(work)
    except Exception as exc:  # noqa: BLE001 - try again next round
        log.warning("%s failed: %s", name, type(exc).__name__)


def _purge(app: FastAPI) -> None:
    purged = purge_expired(app.state.store, app.state.storage, app.state.settings.retention_days)
    if purged:
        log.info("retention: deleted the files of %d jobs", len(purged))


async def _housekeeping_forever(app: FastAPI) -> None:
    """Every ``requeue_interval_s``: re-send jobs the broker lost, remove folders of uploads cut
    off mid-way (app.sweep) and of STOW-RS requests (app.stow), delete the files of jobs past the
    retention period and retire expired webhook secrets (service.retention)."""
    settings: GatewaySettings = app.state.settings
    store, storage = app.state.store, app.state.storage
    passes: list[tuple[str, Callable[[], object]]] = [
        ("re-enqueue pass", lambda: requeue_lost(store, app.state.queue, grace_s=settings.requeue_grace_s)),
        ("orphan sweep", lambda: sweep_orphans(store, storage, grace_s=settings.orphan_grace_s)),
        ("STOW-RS sweep", lambda: sweep_stow(store, app.state.stow, grace_s=settings.orphan_grace_s)),
        ("retention pass", lambda: _purge(app)),
    ]
    while True:
        for name, work in passes:
            await _run_pass(name, work)
        await asyncio.sleep(settings.requeue_interval_s)


async def _settle_forever(app: FastAPI) -> None:
    """Start a job on each study sent by STOW-RS once its instances have settled (app.stow),
    checking a few times per settle period (at most every 5 s)."""
    settings: GatewaySettings = app.state.settings
    interval_s = min(5.0, max(settings.stow_settle_s / 4, 0.2))
    while True:
        await _run_pass(
            "STOW-RS settle pass",
            lambda: settle(app.state.store, app.state.storage, app.state.stow, app.state.queue, settle_s=settings.stow_settle_s),
        )
        await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(_housekeeping_forever(app)), asyncio.create_task(_settle_forever(app))]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


DOCS_POLICY = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
_METHODS = ("get", "head", "post", "put", "delete", "patch")


def docs_page(document: dict[str, Any]) -> str:
    """A self-contained HTML page listing the API's operations from its OpenAPI ``document``:
    no script, no external request (unlike Swagger UI or ReDoc, which load from a CDN)."""
    info = document.get("info", {})
    rows = []
    for path, item in document.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            statuses = ", ".join(str(code) for code in operation.get("responses", {}))
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(operation.get('summary', ''))}<br><small>{html.escape(operation.get('description', ''))}"
                f"</small></td><td>{html.escape(statuses)}</td></tr>"
            )
    title = html.escape(f"{info.get('title', 'API')} {info.get('version', '')}")
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        "<style>body{font-family:sans-serif;margin:2em}td,th{border-bottom:1px solid #ccc;padding:.3em;"
        "text-align:left;vertical-align:top}table{border-collapse:collapse}</style></head><body>"
        f"<h1>{title}</h1><p>{html.escape(info.get('description', ''))}</p>"
        '<p>The full OpenAPI 3.1 document: <a href="/openapi.json">/openapi.json</a>.</p>'
        f"<table><tr><th>method</th><th>path</th><th>what</th><th>answers</th></tr>{''.join(rows)}</table>"
        "</body></html>"
    )


def _add_docs(app: FastAPI) -> None:
    """``/openapi.json`` and an offline ``/docs`` (``/redoc`` the same page) as ordinary API
    routes: served without a CDN, and counted under their own route in /metrics."""

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document() -> JSONResponse:
        return JSONResponse(app.openapi())

    async def docs(request: Request) -> HTMLResponse:
        headers = {"Content-Security-Policy": DOCS_POLICY, "X-Content-Type-Options": "nosniff"}
        return HTMLResponse(docs_page(request.app.openapi()), headers=headers)

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", docs, methods=["GET"], include_in_schema=False)


def create_app(settings: GatewaySettings, *, store: Store | None = None, queue: JobQueue | None = None) -> FastAPI:
    """The gateway for ``settings``; ``store`` and ``queue`` default to the configured ones."""
    secure_service(settings.data_root)  # owner-only files, also when uvicorn starts the gateway
    store = store or Store(settings.store_url)
    queue = queue or CeleryQueue(settings.broker_url, queue_name=settings.queue_name)
    app = FastAPI(
        title="scsnet",
        version=core.__version__,
        summary="Eight-region cervical spinal-cord DTI measures from a diffusion MRI study",
        description=(
            "Submit a study (DICOM or NIfTI with gradients), poll the job, download the report, "
            "masks and maps. Authenticate with `Authorization: Bearer <API key>`. Errors are "
            "RFC 9457 `application/problem+json`; `GET /v1/problems` lists their types."
        ),
        lifespan=_lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN: replaced by _add_docs's offline page
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.storage = Storage(settings.data_root)
    app.state.stow = StowArea(settings.data_root)
    app.state.queue = queue
    app.state.metrics = Metrics(store, queue)
    app.state.idempotency_in_flight = set()  # (tenant id, Idempotency-Key) of uploads being received
    app.state.auth_throttle = AuthThrottle(
        limit=settings.auth_failures_max, window_s=settings.auth_failure_window_s, max_addresses=settings.auth_throttle_addresses
    )
    signing_key = settings.signing_key.get_secret_value().encode() if settings.signing_key else None
    app.state.cursors = Cursors(key=signing_key, folder=settings.data_root)
    problems.install(app)
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(NoStoreMiddleware)  # outermost of ours: also on what the others answer
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(dicomweb.router)
    app.include_router(system.router)
    if settings.docs_enabled:
        _add_docs(app)
    return app


def app_from_env() -> FastAPI:
    """The gateway configured from the environment (a uvicorn ``--factory`` target)."""
    return create_app(GatewaySettings())
