"""Configuration of the HTTP gateway, from ``SCSNET_``-prefixed environment variables: the
shared :class:`~service.settings.ServiceSettings` plus the gateway's own limits. Built once at
start and passed down; nothing else reads the environment.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr

from core.ingest.rules import GIB
from service.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    """Settings of the HTTP gateway."""

    max_upload_bytes: int = Field(default=2 * GIB, gt=0, description="largest accepted request body")
    retry_after_s: int = Field(default=5, gt=0, description="polling interval suggested to clients")
    requeue_interval_s: float = Field(default=60.0, gt=0, description="how often queued jobs lost by the broker are re-sent")
    requeue_grace_s: float = Field(default=30.0, ge=0, description="a queued job younger than this is never re-sent")
    orphan_grace_s: float = Field(
        default=3600.0,
        ge=0,
        description="a job folder with no job record, untouched this long (the upload of a gateway killed mid-request), is removed",
    )
    worker_stale_after_s: float = Field(default=60.0, gt=0, description="/readyz wants a worker heartbeat this recent")
    idempotency_window_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="how long an Idempotency-Key is remembered; after it the key is forgotten and starts a new job",
    )
    allow_http_callbacks: bool = Field(default=True, description="accept http:// callback URLs (not only https://)")
    stow_settle_s: float = Field(
        default=30.0,
        ge=0,
        description="a job starts on the instances of a study sent by STOW-RS once none has arrived for this many seconds",
    )

    # Slow and abusive clients (app.server, app.middleware, app.throttle). A reverse proxy in
    # front (docker/nginx.conf) applies the same numbers; these hold when it is absent.
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="a connection whose request headers are not complete this long after it opened (or after its last answer) is closed"
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="most seconds between two pieces of a request body; a stalled upload is answered 408 and removed"
    )
    keep_alive_s: int = Field(default=5, ge=1, description="an idle keep-alive connection is closed after this many seconds")
    max_connections: int = Field(
        default=200, ge=1, description="open connections this gateway process serves at once; a request beyond them is answered 503"
    )
    forwarded_allow_ips: str | None = Field(
        default=None,
        description="addresses or networks (comma-separated) of the reverse proxy whose X-Forwarded-For and "
        "X-Forwarded-Proto are believed; unset: those headers are ignored and the peer address is the client",
    )
    auth_failures_max: int = Field(
        default=10, ge=0, description="failed API-key attempts one client address may make per window before 429; 0: no throttling"
    )
    auth_failure_window_s: float = Field(default=60.0, gt=0, description="the window of auth_failures_max, in seconds")
    auth_throttle_addresses: int = Field(
        default=10_000, ge=1, description="client addresses whose failed attempts are remembered (the least recent are forgotten first)"
    )
    signing_key: SecretStr | None = Field(
        default=None,
        description="key signing list cursors; unset: one is generated once into signing.key in the data dir (owner-only), "
        "shared by the gateways on that data dir",
    )
    metrics_token: SecretStr | None = Field(
        default=None, description="when set, /metrics wants 'Authorization: Bearer <token>'; unset: /metrics is open"
    )
    docs_enabled: bool = Field(
        default=True,
        validation_alias=AliasChoices("SCSNET_DOCS", "docs_enabled"),
        description="serve /docs, /redoc and /openapi.json (env SCSNET_DOCS); false: they are 404",
    )
