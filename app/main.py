"""The HTTP gateway: ``create_app(settings)`` builds the FastAPI application.

It stores uploads, records jobs and enqueues them by task name; it never imports the worker's
heavy modules and never waits on a task. At start and every ``requeue_interval_s`` it re-sends
queued jobs the broker has lost and removes upload folders no job owns (``app.sweep``). Run it
with ``scsnet serve`` (or ``uvicorn --factory app.main:app_from_env``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI

import core
from app import problems
from app.metrics import Metrics, MetricsMiddleware
from app.requeue import requeue_lost
from app.routers import artifacts, jobs, system
from app.settings import GatewaySettings
from app.sweep import sweep_orphans
from service.queue import CeleryQueue, JobQueue
from service.storage import Storage
from service.store import Store

log = logging.getLogger(__name__)


async def _housekeeping_forever(app: FastAPI) -> None:
    """Every ``requeue_interval_s``: re-send jobs the broker lost, remove folders of uploads cut
    off mid-way (app.sweep). Each failure is logged and tried again next round."""
    settings: GatewaySettings = app.state.settings
    while True:
        try:
            await anyio.to_thread.run_sync(
                lambda: requeue_lost(app.state.store, app.state.queue, grace_s=settings.requeue_grace_s)
            )
        except Exception as exc:  # noqa: BLE001 - broker or store down: try again next round
            log.warning("re-enqueue pass failed: %s", type(exc).__name__)
        try:
            await anyio.to_thread.run_sync(
                lambda: sweep_orphans(app.state.store, app.state.storage, grace_s=settings.orphan_grace_s)
            )
        except Exception as exc:  # noqa: BLE001 - store or disk unavailable: try again next round
            log.warning("orphan sweep failed: %s", type(exc).__name__)
        await asyncio.sleep(settings.requeue_interval_s)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    task = asyncio.create_task(_housekeeping_forever(app))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def create_app(settings: GatewaySettings, *, store: Store | None = None, queue: JobQueue | None = None) -> FastAPI:
    """The gateway for ``settings``; ``store`` and ``queue`` default to the configured ones."""
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
    )
    app.state.settings = settings
    app.state.store = store
    app.state.storage = Storage(settings.data_root)
    app.state.queue = queue
    app.state.metrics = Metrics(store, queue)
    problems.install(app)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(system.router)
    return app


def app_from_env() -> FastAPI:
    """The gateway configured from the environment (a uvicorn ``--factory`` target)."""
    return create_app(GatewaySettings())
