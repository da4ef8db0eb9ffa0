"""How the gateway is served: uvicorn configured from :class:`GatewaySettings`, with a bound on
the time a client may take to send its request headers.

uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``) but not a fresh one: a
client that connects and sends nothing, or one header line a second, holds its connection (and
a slot of ``limit_concurrency``) for ever. :class:`HeaderTimeout` adds a total deadline of
``header_timeout_s`` from the moment the connection opens, and again from the end of each
answer, for the next request's headers to be complete; past it the connection is closed without
an answer. The request body is bounded by ``app.middleware.BodyTimeoutMiddleware``
(``body_timeout_s`` between two pieces), the number of connections by ``max_connections``
(uvicorn answers 503 beyond it), and X-Forwarded-For is believed only from
``forwarded_allow_ips``.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.settings import GatewaySettings


class GatewayConfig(uvicorn.Config):
    """A uvicorn configuration that also carries the header deadline for :class:`HeaderTimeout`."""

    def __init__(self, app: Any, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s


class HeaderTimeout(asyncio.Protocol):
    """Mixed into a uvicorn HTTP protocol class: close the connection when no request has its
    headers complete within ``header_timeout_s`` of the connection opening or of the last
    answer's end. Once a request's headers are complete the timer no longer matters: the
    body has its own bound and the answer takes what it takes."""

    config: uvicorn.Config
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any
    _header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        timeout_s = getattr(self.config, "header_timeout_s", None)
        if timeout_s:
            self._header_timer = self.loop.call_later(timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        request_in_progress = self.cycle is not None and not self.cycle.response_complete
        if not request_in_progress and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[safe-super]
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


class H11HeaderTimeoutProtocol(HeaderTimeout, H11Protocol):
    """uvicorn's pure-Python HTTP/1.1 protocol (h11) with the header deadline."""


if importlib.util.find_spec("httptools") is not None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HttpToolsHeaderTimeoutProtocol(HeaderTimeout, HttpToolsProtocol):
        """uvicorn's httptools protocol (its own choice when httptools is installed, as here)
        with the header deadline."""

    DEFAULT_PROTOCOL: type[asyncio.Protocol] = HttpToolsHeaderTimeoutProtocol
else:  # pragma: no cover - httptools is a dependency of the gateway
    DEFAULT_PROTOCOL = H11HeaderTimeoutProtocol


def uvicorn_config(
    app: Any, settings: GatewaySettings, *, host: str, port: int, protocol: type[asyncio.Protocol] | None = None, **kwargs: Any
) -> GatewayConfig:
    """The uvicorn configuration of the gateway ``app`` (``scsnet serve`` and the tests use it);
    ``kwargs`` go to uvicorn as they are (log_level, access_log)."""
    trusted = [a.strip() for a in (settings.forwarded_allow_ips or "").split(",") if a.strip()]
    return GatewayConfig(
        app,
        host=host,
        port=port,
        http=protocol or DEFAULT_PROTOCOL,
        header_timeout_s=settings.header_timeout_s,
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        # uvicorn believes X-Forwarded-* from 127.0.0.1 by default: here only from the proxy named
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
        server_header=False,  # no advertising of the server's make and version
        **kwargs,
    )
