"""The models directory and the active model: listing, name resolution, loading, switching."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from llmserve.config import Settings
from llmserve.engine.base import Engine
from llmserve.errors import (
    InvalidModelNameError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from llmserve.scheduler import Worker

logger = logging.getLogger(__name__)

T = TypeVar("T")
EngineFactory = Callable[[Path, Settings], Engine]
State = Literal["starting", "loading", "ready", "error"]


@dataclass(frozen=True)
class ModelFile:
    """A GGUF file in the models directory."""

    name: str
    size: int


def list_model_files(models_dir: Path) -> list[ModelFile]:
    """Every GGUF in the models dir, sorted by name."""
    if not models_dir.is_dir():
        return []
    return [
        ModelFile(p.name, p.stat().st_size)
        for p in sorted(models_dir.iterdir())
        if p.suffix == ".gguf" and p.is_file() and not p.name.startswith(".")
    ]


def resolve_model_name(models_dir: Path, name: str) -> str:
    """Map a request's model name to a file name in the models dir, or raise 400/404."""
    if not name or any(c in name for c in "/\\\0") or name.startswith(".") or ".." in name:
        raise InvalidModelNameError(
            f"invalid model name {name!r}: use a file name from the models directory",
            param="model",
        )
    available = [m.name for m in list_model_files(models_dir)]
    for candidate in (name, f"{name}.gguf"):
        if candidate in available:
            return candidate
    raise ModelNotFoundError(
        f"model {name!r} not found; available: {', '.join(available) or 'none'}", param="model"
    )


class ModelManager:
    """Owns the active engine; every load and use happens on the worker thread."""

    def __init__(self, settings: Settings, factory: EngineFactory, worker: Worker):
        self.settings = settings
        self.models_dir = settings.models_dir
        self._factory = factory
        self._worker = worker
        self.engine: Engine | None = None
        self.state: State = "starting"
        self.error: str | None = None
        self.load_seconds = 0.0

    @property
    def worker_queued(self) -> int:
        """Jobs waiting for or running on the engine thread."""
        return self._worker.queued

    @property
    def active_name(self) -> str | None:
        """File name of the loaded model."""
        return self.engine.info.name if self.engine else None

    def resolve(self, name: str) -> str:
        """A request's model name to a file name (400/404 on bad names)."""
        return resolve_model_name(self.models_dir, name)

    def files(self) -> list[ModelFile]:
        """GGUF files in the models dir."""
        return list_model_files(self.models_dir)

    async def run(self, fn: Callable[[], T]) -> T:
        """Run fn on the engine thread, after the work queued before it."""
        return await self._worker.call(fn)

    async def switch(self, name: str) -> str:
        """Make `name` the active model once in-flight work is done; returns its file name."""
        filename = self.resolve(name)
        await self._worker.call(self.ensure, filename)
        return filename

    def ensure(self, filename: str | None) -> Engine:
        """On the worker thread: the engine for filename (None: the active one), loading it."""
        if self.engine is not None and filename in (None, self.engine.info.name):
            return self.engine
        if filename is None:
            raise ModelNotReadyError(f"no model is loaded ({self.error or 'still starting'})")
        previous = self.engine.info.name if self.engine else None
        self.state = "loading"
        # NOTE: unload before loading so two large models never need memory at once;
        # on failure the previous model is loaded again so the active model is unchanged.
        self._unload()
        try:
            engine = self._load(filename)
        except Exception as exc:
            self.error = f"loading {filename} failed: {exc}"
            logger.error("%s", self.error)
            if previous is not None:
                try:
                    self._load(previous)
                except Exception:
                    logger.exception("reloading %s failed", previous)
            self.state = "ready" if self.engine else "error"
            raise ModelLoadError(self.error) from exc
        self.state = "ready"
        self.error = None
        return engine

    def _load(self, filename: str) -> Engine:
        start = time.perf_counter()
        engine = self.engine = self._factory(self.models_dir / filename, self.settings)
        self.load_seconds = time.perf_counter() - start
        logger.info("loaded %s in %.2f s", filename, self.load_seconds)
        return engine

    def _unload(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.close()

    def close(self) -> None:
        """On the worker thread at shutdown: free the model."""
        self._unload()
