"""The one place where errors become RFC 9457 ``application/problem+json``, and the catalogue
of problem types.

Every :class:`~core.errors.ScsnetError` (the science core's and the service's own) maps to
its ``problem()`` with ``instance`` set to the request path; request validation errors become
``invalid-request`` (422) with the offending fields; unknown routes and methods get ``not-found``
and ``method-not-allowed``; a client hanging up mid-upload is ``malformed-upload``; a full or
read-only disk is ``storage-unavailable`` (503); anything else is logged and answered with a bare
``internal-error``.
A failed job stores the same ``problem()`` object, so asynchronous failures look alike.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import service.errors as service_errors
from app.middleware import NO_STORE_HEADERS
from core import errors as core_errors
from core.errors import ScsnetError

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger(__name__)


def _all_error_classes() -> list[type[ScsnetError]]:
    seen: list[type[ScsnetError]] = []
    stack: list[type[ScsnetError]] = [ScsnetError]
    while stack:
        cls = stack.pop(0)
        if cls not in seen:
            seen.append(cls)
            stack.extend(cls.__subclasses__())
    return seen


def catalogue() -> list[dict[str, Any]]:
    """Every problem type the service can answer with: type URI, title, HTTP status."""
    assert core_errors and service_errors  # both modules define the classes walked here
    entries: dict[str, dict[str, Any]] = {}
    for cls in _all_error_classes():
        entry = {"type": core_errors.PROBLEM_BASE + cls.type_slug, "title": cls.title, "status": cls.status}
        entries.setdefault(cls.type_slug, entry)
    return sorted(entries.values(), key=lambda e: (e["status"], e["type"]))


DETAIL_MAX_CHARS = 500


def bounded(problem: dict[str, Any]) -> dict[str, Any]:
    """``problem`` with its ``detail`` cut to :data:`DETAIL_MAX_CHARS` (a detail may quote a
    client's input: a hostile one must not make the answer large)."""
    detail = problem.get("detail")
    if isinstance(detail, str) and len(detail) > DETAIL_MAX_CHARS:
        return {**problem, "detail": detail[: DETAIL_MAX_CHARS - 1] + "\u2026"}
    return problem


def problem_response(problem: dict[str, Any], *, headers: dict[str, str] | None = None) -> JSONResponse:
    """A problem+json response for a problem object, its detail bounded."""
    return JSONResponse(jsonable_encoder(bounded(problem)), status_code=int(problem["status"]), media_type=PROBLEM_JSON, headers=headers)


def _scsnet_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ScsnetError)
    headers: dict[str, str] = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="scsnet"'
    if isinstance(exc, service_errors.TooManyFailedAttempts):
        headers["Retry-After"] = str(exc.retry_after_s)
    if exc.status == 408:  # RFC 9110 15.5.9: the rest of the body will not be read
        headers["Connection"] = "close"
    return problem_response({**exc.problem(), "instance": request.url.path}, headers=headers or None)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": [str(p)[:100] for p in e.get("loc", ())][:10], "msg": str(e.get("msg", ""))[:200]} for e in exc.errors()[:20]]
    first = errors[0] if errors else {"loc": [], "msg": "invalid"}
    problem = service_errors.InvalidRequest(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}").problem()
    return problem_response({**problem, "instance": request.url.path, "errors": errors})


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def _allowed_methods(request: Request) -> str:
    """Every method the API serves at the request's path, from its OpenAPI document (Starlette
    names only those of the first route whose path matches, and a 405 must list them all)."""
    paths: dict[str, dict[str, Any]] = request.app.openapi().get("paths", {})
    methods = {
        method.upper()
        for template, operations in paths.items()
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), request.url.path)
        for method in operations
        if method in _HTTP_METHODS
    }
    return ", ".join(sorted(methods))


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error: ScsnetError
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        error = service_errors.NotFound("there is nothing at this address")
    elif exc.status_code == 405:
        error = service_errors.MethodNotAllowed(f"{request.method} is not allowed here")
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    else:
        error = service_errors.InvalidRequest(str(exc.detail))
        return problem_response({**error.problem(), "status": exc.status_code, "instance": request.url.path}, headers=headers)
    return problem_response({**error.problem(), "instance": request.url.path}, headers=headers)


def _client_disconnect(request: Request, exc: Exception) -> JSONResponse:
    # The client hung up mid-body: its mistake (nobody reads this answer), not a 500 to log.
    error = service_errors.MalformedUpload("the client closed the connection before the request body ended")
    return problem_response({**error.problem(), "instance": request.url.path})


def _os_error(request: Request, exc: Exception) -> JSONResponse:
    storage = service_errors.storage_error(exc)
    if storage is None:
        return _unexpected(request, exc)
    # the service's own disk is full, read-only or failing: a 503 for the operator, not a bug
    log.error("storage fault on %s %s: %s", request.method, request.url.path, exc)
    return problem_response({**storage.problem(), "instance": request.url.path})


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    error = service_errors.InternalError("an unexpected error occurred; it has been logged")
    # answered outside the app's middleware (Starlette's ServerErrorMiddleware): app.middleware's
    # headers are added here
    return problem_response({**error.problem(), "instance": request.url.path}, headers=dict(NO_STORE_HEADERS))


def install(app: FastAPI) -> None:
    """Register the problem+json handlers on ``app``."""
    app.add_exception_handler(ScsnetError, _scsnet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(OSError, _os_error)
    app.add_exception_handler(Exception, _unexpected)


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
    },
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json answers. An operation that may
    answer 401 may also answer 429 (failed attempts from one address throttled, app.throttle)."""
    if 401 in statuses:
        statuses = tuple(sorted({*statuses, 429}))
    return {s: {"description": "problem", "content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}}} for s in statuses}
