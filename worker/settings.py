"""Configuration of a Celery worker process: the shared service settings plus the core's
(model dir) and the worker's own limits. Built once when ``worker.celery_app`` is imported."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from core.settings import CoreSettings
from service.settings import ServiceSettings


class WorkerSettings(ServiceSettings, CoreSettings):
    """Settings of the analysis worker."""

    model_config = SettingsConfigDict(env_prefix="SCSNET_", extra="ignore", protected_namespaces=())

    soft_time_limit_s: int = Field(default=900, gt=0, description="an analysis is asked to stop after this")
    time_limit_s: int = Field(default=1200, gt=0, description="an analysis process is killed after this")
    heartbeat_s: float = Field(default=10.0, gt=0, description="how often the worker records that it is alive")
    destination_max_retries: int = Field(default=5, ge=0, description="re-tries of a failed DICOMweb (STOW-RS) delivery")
    destination_backoff_s: float = Field(default=30.0, gt=0, description="first DICOMweb delivery retry delay; doubles each time")
    worker_queues: Literal["analyses", "deliveries", "all"] = Field(
        default="all",
        description="what this worker runs (scsnet worker --queues): analyses, deliveries (webhooks and DICOMweb; the "
        "science stack is not even imported) or all",
    )
    webhook_max_retries: int = Field(default=8, ge=0, description="re-tries of a failed webhook delivery")
    webhook_backoff_s: float = Field(default=5.0, gt=0, description="first retry delay; doubles each time")
    visibility_timeout_s: int | None = Field(
        default=None,
        gt=0,
        description=(
            "seconds after which Redis hands a job taken by a worker that died to another worker; "
            "must exceed time_limit_s (default: twice time_limit_s)"
        ),
    )

    @model_validator(mode="after")
    def _redelivery_after_the_hard_limit(self) -> WorkerSettings:
        # A message redelivered while its first run may still be going would run the job twice
        # at once; the hard time limit guarantees the first run is dead by then.
        if self.visibility_timeout_s is not None and self.visibility_timeout_s <= self.time_limit_s:
            raise ValueError(
                f"SCSNET_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must exceed SCSNET_TIME_LIMIT_S ({self.time_limit_s})"
            )
        return self

    @property
    def redelivery_after_s(self) -> int:
        """The broker's visibility timeout for unacknowledged analysis messages."""
        return self.visibility_timeout_s or 2 * self.time_limit_s
