"""Server settings: CLI flags override LLMSERVE_* environment variables override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from llmserve.units import parse_duration, parse_size

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
PromptCache = Literal["tiered", "ram", "llama_disk", "off"]
# auto: split <think>/gpt-oss reasoning from the content when the markup appears (deepseek is
# llama-server's name for the same); none: leave it in the content.
ReasoningFormat = Literal["auto", "deepseek", "none"]
# KV cache element types: the set llama-server's -ctk/-ctv accept (engine/kvtypes.py maps them
# to ggml type ids). The quantized ones (q*, iq4_nl) need flash attention for V.
CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
CACHE_TYPES: tuple[str, ...] = get_args(CacheType)
UNQUANTIZED_CACHE_TYPES = ("f32", "f16", "bf16")
# llama-server's -fa: auto lets llama.cpp enable it where the device supports it.
FlashAttn = Literal["auto", "on", "off"]
Draft = Literal["none", "ngram"]
FLASH_ATTN: tuple[str, ...] = get_args(FlashAttn)


def quantized_v_message(cache_type_v: str) -> str:
    """Why a quantized V cache with flash attention off cannot load."""
    return (f"--cache_type_v {cache_type_v} needs flash attention, but --flash_attn is off: "
            f"use --flash_attn auto (or on), or a V cache of "
            f"{', '.join(UNQUANTIZED_CACHE_TYPES)}")


def kv_setting(value: Any) -> Any:
    """A cache type or flash_attn value as written ("Q8_0", "ON", YAML's bare on/off, which
    PyYAML reads as booleans) in llama-server's lower-case spelling; the rest unchanged."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value.strip().lower() if isinstance(value, str) else value
DEFAULT_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Settings(BaseSettings):
    """Everything the server needs to start; one field per CLI flag."""

    # NOTE: hide_input_in_errors keeps API keys out of validation messages.
    model_config = SettingsConfigDict(
        env_prefix="LLMSERVE_", extra="ignore", hide_input_in_errors=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model_name: str = DEFAULT_MODEL
    models_dir: Path = Path("models")
    cache_dir: Path = Path("cache")
    templates_dir: Path = Path("templates")
    chat_template: str | None = None
    # None: the model's trained context, lowered to fit memory (catalog/context.py); 0: the
    # trained context as is.
    n_ctx: int | None = Field(default=None, ge=0)
    n_gpu_layers: int = 0
    # None: the machine's physical cores (prompt batches: n_threads).
    n_threads: int | None = Field(default=None, ge=1)
    n_threads_batch: int | None = Field(default=None, ge=1)
    n_batch: int = Field(default=512, ge=1)
    # KV cache types and flash attention (llama-server's -ctk, -ctv, -fa); models.yaml `load`
    # may set them per model. q8_0 holds about twice the tokens of f16 in the same memory.
    cache_type_k: CacheType = "f16"
    cache_type_v: CacheType = "f16"
    flash_attn: FlashAttn = "auto"
    # Speculative decoding (engine/drafting.py): a draft source proposes tokens that one decode
    # step verifies. ngram: prompt lookup (the sequence's own prompt and output); draft_model:
    # a smaller GGUF with the same vocabulary (a file in the models dir or an alias). A
    # request's `prediction` drafts too. draft_max caps a draft; one shorter than draft_min is
    # not used. models.yaml `load` may set each per model.
    draft: Draft = "none"
    draft_model: str | None = Field(default=None, min_length=1)
    draft_max: int = Field(default=16, ge=0, le=64)
    draft_min: int = Field(default=0, ge=0, le=64)
    # Continuous batching: sequences decoded together (llama-server's -np) and the wait queue.
    parallel: int = Field(default=4, ge=1, le=256)
    max_queue: int = Field(default=256, ge=0)
    prompt_cache: PromptCache = "tiered"
    cache_ram_bytes: int = Field(default=2 << 30, ge=0)
    cache_disk_bytes: int = Field(default=10 << 30, ge=0)
    cache_block_tokens: int = Field(default=64, ge=8, le=4096)
    stream_interval_ms: float = Field(default=20.0, ge=0.0, le=1000.0)
    reasoning_format: ReasoningFormat = "auto"
    log_level: LogLevel = "info"
    # OpenAI Responses (issue 10): stored responses kept in <cache_dir>/responses, oldest dropped.
    responses_max: int = Field(default=1000, ge=0)
    # Request limits and timeouts (issue 14): every one has a default that a local server
    # never hits in normal use and that bounds what one client can make the server do.
    max_body_bytes: int = Field(default=32 << 20, ge=1024)
    max_header_bytes: int = Field(default=64 << 10, ge=1024)
    max_messages: int = Field(default=2048, ge=1)
    # Output limit of a request that sets none (llama-server's -n, Ollama's num_predict);
    # None: until the context ends. Codex CLI sends no limit at all.
    max_tokens: int | None = Field(default=None, ge=1)
    timeout_keep_alive: float = Field(default=5.0, gt=0)
    timeout_headers: float = Field(default=10.0, gt=0)
    timeout_body: float = Field(default=60.0, gt=0)
    timeout_graceful_shutdown: float = Field(default=5.0, ge=0)
    health_stall_seconds: float = Field(default=60.0, gt=0)

    @field_validator("cache_type_k", "cache_type_v", "flash_attn", mode="before")
    @classmethod
    def _kv_spelling(cls, value: Any) -> Any:
        return kv_setting(value)

    @model_validator(mode="after")
    def _quantized_v_needs_flash_attn(self) -> Settings:
        # NOTE: llama.cpp refuses the context; models.yaml `load` cannot change flags that
        # were given, so every model would fail to load (the engine says so too, per model)
        if self.flash_attn == "off" and self.cache_type_v not in UNQUANTIZED_CACHE_TYPES:
            raise ValueError(quantized_v_message(self.cache_type_v))
        return self

    @field_validator("max_body_bytes", "max_header_bytes", mode="before")
    @classmethod
    def _limit_sizes(cls, value: str | int) -> int:
        return parse_size(value)

    @field_validator("cache_ram_bytes", "cache_disk_bytes", mode="before")
    @classmethod
    def _sizes(cls, value: str | int) -> int:
        return parse_size(value)

    # Model management (issue 5): several resident models, LRU eviction, idle unloading.
    manifest: Path | None = None  # models.yaml; default <models_dir>/models.yaml
    max_loaded_models: int = Field(default=1, ge=1)
    memory_budget: int | None = None  # bytes; "4GB" etc. accepted
    idle_unload_seconds: float | None = None  # None: never; "5m" etc. accepted
    # Serve symlinks in the models dir whose real path is elsewhere (off: refused with a 400).
    allow_symlinks: bool = False

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _size(cls, v: object) -> int | None:
        if v is None or v == "":
            return None
        if isinstance(v, str | int):
            return parse_size(v)
        raise ValueError("must be a byte count or a size like '4GB'")

    @field_validator("idle_unload_seconds", mode="before")
    @classmethod
    def _duration(cls, v: object) -> float | None:
        if v is None or v == "":
            return None
        if isinstance(v, str | int | float):
            seconds = parse_duration(v)
            return None if seconds == float("inf") else seconds
        raise ValueError("must be seconds or a duration like '5m'")

    # API keys (issue 6): --api_key (repeatable), LLMSERVE_API_KEY (comma-separated), a file.
    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_key_file: Path | None = None
    # Tenancy (issue 22): with keys, each key's requests reuse only their own prompt-cache
    # entries (llmserve/tenancy.py) unless this is set.
    share_prompt_cache: bool = False
    # LAN discovery: announce the server over mDNS/zeroconf unless this is set.
    no_announce: bool = False
    # Backends (issue 11): the llama-server for `backend: llama_server` entries (else
    # $LLAMA_SERVER, PATH, or the one `llmserve install llama` built), how long a child may
    # take to become healthy, and the timeouts of proxied requests.
    llama_server: Path | None = None
    backend_start_timeout: float = Field(default=120.0, gt=0)
    backend_connect_timeout: float = Field(default=10.0, gt=0)
    backend_read_timeout: float = Field(default=600.0, gt=0)
    # Peers (issue 11): "auto" routes models no local backend has to LAN peers found over
    # mDNS, sending them this key.
    peers: Literal["auto"] | None = None
    peer_api_key: str | None = None

    _file_keys: list[str] = PrivateAttr(default_factory=list)

    @field_validator("api_key", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        # NOTE: the env var holds one key or several separated by commas.
        return v.split(",") if isinstance(v, str) else v

    @field_validator("api_key")
    @classmethod
    def _strip_keys(cls, v: list[str]) -> list[str]:
        return [k.strip() for k in v if k.strip()]

    @model_validator(mode="after")
    def _read_key_file(self) -> Settings:
        if self.api_key_file is not None:
            try:
                text = self.api_key_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read api_key_file {self.api_key_file}: {exc}") from exc
            keys = [
                line.strip() for line in text.splitlines()
                if line.strip() and not line.strip().startswith("#")
            ]
            if not keys:
                raise ValueError(f"api_key_file {self.api_key_file} holds no keys")
            self._file_keys = keys
        return self

    def api_keys(self) -> list[str]:
        """Every accepted API key (flags/env first, then the key file); empty means no auth."""
        return list(dict.fromkeys([*self.api_key, *self._file_keys]))
