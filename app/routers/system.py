"""Service endpoints: health, readiness, metrics, the model, the problem catalogue."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import MetricsDep, QueueDep, SettingsDep, StorageDep, StoreDep, TenantDep
from app.problems import catalogue, problem_response, problem_responses
from app.settings import GatewaySettings
from service.errors import NotReady, Unauthorized

router = APIRouter(tags=["service"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the gateway process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses=problem_responses(503))
def readyz(settings: SettingsDep, store: StoreDep, storage: StorageDep, queue: QueueDep) -> Response:
    """Readiness: broker, job store, storage writable, a worker seen recently."""
    checks: dict[str, str] = {}
    for name, probe in (("broker", queue.ping), ("store", store.ping), ("storage", storage.check_writable)):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported by name
            checks[name] = f"failed: {type(exc).__name__}"
    try:
        seen = store.workers(seen_within_s=settings.worker_stale_after_s)
        checks["worker"] = "ok" if seen else f"no worker heartbeat in the last {settings.worker_stale_after_s:g} s"
    except Exception as exc:  # noqa: BLE001 - as above
        checks["worker"] = f"failed: {type(exc).__name__}"
    failing = [name for name, result in checks.items() if result != "ok"]
    if failing:
        problem = NotReady(f"not ready: {', '.join(failing)}").problem()
        return problem_response({**problem, "instance": "/readyz", "checks": checks})
    return JSONResponse({"status": "ready", "checks": checks})


def _check_metrics_token(request: Request, settings: GatewaySettings) -> None:
    """With ``metrics_token`` set, /metrics wants ``Authorization: Bearer <token>`` (compared in
    constant time); unset, it is open (keep it then on a network only the scraper reaches)."""
    if settings.metrics_token is None:
        return
    wanted = f"Bearer {settings.metrics_token.get_secret_value()}".encode()
    given = request.headers.get("authorization", "").strip().encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, wanted):
        raise Unauthorized("/metrics wants 'Authorization: Bearer <metrics token>' (SCSNET_METRICS_TOKEN)")


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: problem_responses(401)[401]},
)
def metrics(request: Request, registry: MetricsDep, settings: SettingsDep) -> Response:
    """Prometheus metrics: requests, jobs by state, job duration, queue depth (Bearer token if configured)."""
    _check_metrics_token(request, settings)
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", responses=problem_responses(401))
def models(tenant: TenantDep, settings: SettingsDep, store: StoreDep) -> dict[str, Any]:
    """The model(s) the workers seen recently have loaded: their manifests."""
    workers = store.workers(seen_within_s=settings.worker_stale_after_s)
    manifests: dict[str, Any] = {}
    for worker in workers:
        model = worker.info.get("model")
        if model:
            manifests.setdefault(f"{model.get('name')}@{model.get('version')}:{model.get('sha256')}", model)
    problems = [w.info["model_problem"] for w in workers if w.info.get("model_problem")]
    return {"models": list(manifests.values()), "problems": problems, "workers": len(workers)}


@router.get("/v1/problems", responses=problem_responses(401))
def problems(tenant: TenantDep) -> dict[str, Any]:
    """The catalogue of problem types this service answers with."""
    return {"problems": catalogue()}
