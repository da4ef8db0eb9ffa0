"""Configuration of the service processes, from ``SCSNET_``-prefixed environment variables.

:class:`ServiceSettings` holds what the gateway and the worker share (data dir, job store,
broker); :class:`GatewaySettings` adds the gateway's own limits. Each process builds its class
once at start and passes it down; nothing else reads the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1024**3


class ServiceSettings(BaseSettings):
    """Settings shared by the gateway, the worker and the service commands."""

    model_config = SettingsConfigDict(env_prefix="SCSNET_", extra="ignore", protected_namespaces=())

    data_dir: Path = Field(default=Path("var"), description="job inputs and outputs, the SQLite file, embedded Redis")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the job store; default: a SQLite file in the data dir"
    )
    redis_url: str | None = Field(
        default=None,
        description="broker URL (redis://host:6379/0); unset: the embedded Redis on a Unix socket in the data dir",
    )
    queue_name: str = Field(default="scsnet", description="the broker queue analysis and webhook tasks go through")

    @property
    def data_root(self) -> Path:
        """The data dir as an absolute path."""
        return self.data_dir.expanduser().absolute()

    @property
    def store_url(self) -> str:
        """The job store's SQLAlchemy URL."""
        return self.database_url or f"sqlite:///{self.data_root / 'scsnet.db'}"

    @property
    def embedded_redis_socket(self) -> Path:
        """Where the embedded Redis listens when ``redis_url`` is unset."""
        return self.data_root / "redis" / "redis.sock"

    @property
    def broker_url(self) -> str:
        """The Celery broker URL (kombu spelling)."""
        return self.redis_url or f"redis+socket://{self.embedded_redis_socket}"


class GatewaySettings(ServiceSettings):
    """Settings of the HTTP gateway."""

    max_upload_bytes: int = Field(default=2 * GIB, gt=0, description="largest accepted request body")
    max_zip_entries: int = Field(default=20_000, gt=0, description="most entries a zip upload may hold")
    max_zip_expanded_bytes: int = Field(default=4 * GIB, gt=0, description="most bytes a zip upload may declare unpacked")
    retry_after_s: int = Field(default=5, gt=0, description="polling interval suggested to clients")
    requeue_interval_s: float = Field(default=60.0, gt=0, description="how often queued jobs lost by the broker are re-sent")
    requeue_grace_s: float = Field(default=30.0, ge=0, description="a queued job younger than this is never re-sent")
    orphan_grace_s: float = Field(
        default=3600.0,
        ge=0,
        description="a job folder with no job record, untouched this long (the upload of a gateway killed mid-request), is removed",
    )
    worker_stale_after_s: float = Field(default=60.0, gt=0, description="/readyz wants a worker heartbeat this recent")
    allow_http_callbacks: bool = Field(default=True, description="accept http:// callback URLs (not only https://)")
