"""Configuration of the analysis core, from ``SCSNET_``-prefixed environment variables.

Read once at process start (CLI or worker) and passed down; nothing else reads the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CoreSettings(BaseSettings):
    """Settings of the science core."""

    model_config = SettingsConfigDict(env_prefix="SCSNET_", extra="ignore", protected_namespaces=())

    model_dir: Path | None = Field(
        default=None, description="folder with manifest.json and the .onnx file; default: the shipped model"
    )
    onnx_threads: int = Field(
        default=0,
        ge=0,
        description="CPU threads of one ONNX Runtime session (0: ONNX Runtime's default, all cores)",
    )
