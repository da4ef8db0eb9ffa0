"""Configuration of the HTTP gateway, from ``SCSNET_``-prefixed environment variables: the
shared :class:`~service.settings.ServiceSettings` plus the gateway's own limits. Built once at
start and passed down; nothing else reads the environment.
"""

from __future__ import annotations

from pydantic import Field

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
