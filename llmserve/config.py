"""Server settings: CLI flags override LLMSERVE_* environment variables override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
DEFAULT_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Settings(BaseSettings):
    """Everything the server needs to start; one field per CLI flag."""

    model_config = SettingsConfigDict(env_prefix="LLMSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model_name: str = DEFAULT_MODEL
    models_dir: Path = Path("models")
    cache_dir: Path = Path("cache")
    templates_dir: Path = Path("templates")
    chat_template: str | None = None
    n_ctx: int = Field(default=4096, ge=0)
    n_gpu_layers: int = 0
    n_threads: int | None = Field(default=None, ge=1)
    n_batch: int = Field(default=512, ge=1)
    stream_interval_ms: float = Field(default=20.0, ge=0.0, le=1000.0)
    log_level: LogLevel = "info"
