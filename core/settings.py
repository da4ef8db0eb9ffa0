"""Configuration of the analysis core, from ``SCSNET_``-prefixed environment variables.

Read once at process start (the command line, a worker) and passed down; nothing else reads the
environment. :class:`IngestSettings` holds the upload limits, which the gateway's settings share
so that the gateway's early checks and the worker's ingest apply the same numbers.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.ingest.rules import DEFAULT_LIMITS, UploadLimits

SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "scsnet"
"""Where the model shipped with scsnet is installed: ``models/scsnet`` beside this package (a
data folder found by its place, not a module imported: the core never imports ``models``)."""


class IngestSettings(BaseSettings):
    """The limits an upload is held to, wherever it is read (gateway or ingest)."""

    model_config = SettingsConfigDict(env_prefix="SCSNET_", extra="ignore", protected_namespaces=())

    max_zip_entries: int = Field(
        default=DEFAULT_LIMITS.max_files, gt=0, description="most files an upload may hold, counting every zip entry"
    )
    max_zip_expanded_bytes: int = Field(
        default=DEFAULT_LIMITS.max_total_bytes, gt=0, description="most bytes an upload may expand to once unpacked"
    )

    @property
    def upload_limits(self) -> UploadLimits:
        """The limits as :mod:`core.ingest.rules` applies them."""
        return UploadLimits(max_files=self.max_zip_entries, max_total_bytes=self.max_zip_expanded_bytes)


class CoreSettings(IngestSettings):
    """Settings of the science core."""

    model_dir: Path = Field(
        default=SHIPPED_MODEL_DIR, description="folder with manifest.json and the .onnx file; default: the shipped model"
    )
    onnx_threads: int = Field(
        default=0,
        ge=0,
        description="CPU threads of one ONNX Runtime session (0: ONNX Runtime's default, all cores)",
    )
