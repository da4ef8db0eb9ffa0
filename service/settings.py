"""Configuration shared by the service processes (gateway, worker, service commands), from
``SCSNET_``-prefixed environment variables: where the data lives, the job store, the broker and
the upload limits (:class:`core.settings.IngestSettings`, the same numbers for the gateway's
early checks and the worker's ingest). Each process builds its own settings class once at
start and passes it down; nothing else reads the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from core.settings import IngestSettings


class ServiceSettings(IngestSettings):
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
    public_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="the gateway's public base URL (https://scsnet.example.org); webhook links are made absolute "
        "with it; unset: they stay relative to the gateway",
    )
    queue_name: str = Field(
        default="scsnet",
        description="the broker queue analyses go through; webhook and DICOMweb deliveries go through '<queue_name>-deliveries'",
    )
    allow_private_networks: bool = Field(
        default=False,
        description="let webhooks and DICOMweb destinations be loopback, private, link-local or multicast addresses "
        "(a one-machine install, tests); false: such URLs are refused at submission and again at delivery",
    )
    delivery_deadline_s: float = Field(
        default=30.0, gt=0, description="total time one webhook or DICOMweb delivery attempt may take (connect, send, answer)"
    )
    retention_days: float | None = Field(
        default=None,
        gt=0,
        description="days after a job ends (succeeded, failed or cancelled) that its files (uploaded inputs and "
        "outputs) are deleted; the job record stays, marked with files_deleted_at, and downloads answer 410 Gone; "
        "unset: files are kept until the job is deleted",
    )
    keep_inputs: bool = Field(
        default=True,
        description="keep a job's uploaded inputs after it succeeded; false: they are deleted as soon as the "
        "analysis succeeded (the outputs and the inputs' digests stay)",
    )

    @property
    def data_root(self) -> Path:
        """The data dir as an absolute path."""
        return self.data_dir.expanduser().absolute()

    @property
    def deliveries_queue(self) -> str:
        """The broker queue of webhook and DICOMweb deliveries, apart from the analyses so that a
        slow receiver never delays another tenant's analysis."""
        from service.queue import (
            deliveries_queue,  # the queue contract's rule; celery only when asked
        )

        return deliveries_queue(self.queue_name)

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
