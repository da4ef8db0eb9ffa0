"""Two small pure-ASGI middlewares of the gateway (pure ASGI: neither buffers a streamed upload
or download, unlike Starlette's ``BaseHTTPMiddleware``).

- :class:`BodyTimeoutMiddleware`: a request body that stalls longer than ``body_timeout_s``
  between two pieces is answered 408 ``request-timeout`` with ``Connection: close``; the upload
  route removes what it had written (``app.routers.jobs._create``), as for a client that hangs up.
  Header reads are bounded one level down, in the HTTP protocol (``app.server``).
- :class:`NoStoreMiddleware`: every answer under ``/v1`` (errors, 304s and downloads included)
  carries ``Cache-Control: no-store`` and ``X-Content-Type-Options: nosniff``: the API's answers
  are a tenant's patient data, to be kept by no shared or browser cache, and never sniffed into
  another media type. ETags still work: a client may keep its own copy and ask If-None-Match.
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import RequestTimeout

NO_STORE_HEADERS: dict[str, str] = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
_RAW = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in NO_STORE_HEADERS.items()]
_NAMES = frozenset(name for name, _ in _RAW)


class BodyTimeoutMiddleware:
    """Raise :class:`RequestTimeout` (408) in the app when no piece of the request body arrives
    for ``timeout_s`` while the app waits for one; once the body is complete, ``receive`` is
    passed through untouched (a streaming response waits on it for the disconnect)."""

    def __init__(self, app: ASGIApp, *, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            message: Message | None = None
            with anyio.move_on_after(self.timeout_s):
                message = await receive()
            if message is None:
                raise RequestTimeout(
                    f"no part of the request body arrived for {self.timeout_s:g} s; the upload was dropped, send it again"
                )
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, timed_receive, send)


def under_v1(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class NoStoreMiddleware:
    """Set ``Cache-Control: no-store`` and ``X-Content-Type-Options: nosniff`` on every answer
    under ``/v1``, replacing whatever the route set."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not under_v1(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _NAMES]
                message = {**message, "headers": kept + _RAW}
            await send(message)

        await self.app(scope, receive, send_with_headers)
