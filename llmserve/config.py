"""Server settings: CLI flags override LLMSERVE_* environment variables override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
PromptCache = Literal["tiered", "ram", "llama_disk", "off"]
DEFAULT_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_size(value: str | int) -> int:
    """Bytes from 512M, 2G, 1.5GiB or a plain number."""
    if isinstance(value, int):
        return value
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


class Settings(BaseSettings):
    """Everything the server needs to start; one field per CLI flag."""

    model_config = SettingsConfigDict(env_prefix="LLMSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model_name: str = DEFAULT_MODEL
    models_dir: Path = Path("models")
    cache_dir: Path = Path("cache")
    templates_dir: Path = Path("templates")
    n_ctx: int = Field(default=4096, ge=0)
    n_gpu_layers: int = 0
    n_threads: int | None = Field(default=None, ge=1)
    n_batch: int = Field(default=512, ge=1)
    prompt_cache: PromptCache = "tiered"
    cache_ram_bytes: int = Field(default=2 << 30, ge=0)
    cache_disk_bytes: int = Field(default=10 << 30, ge=0)
    cache_block_tokens: int = Field(default=64, ge=8, le=4096)
    stream_interval_ms: float = Field(default=20.0, ge=0.0, le=1000.0)
    log_level: LogLevel = "info"

    @field_validator("cache_ram_bytes", "cache_disk_bytes", mode="before")
    @classmethod
    def _sizes(cls, value: str | int) -> int:
        return parse_size(value)
