"""Resident models: loading, LRU eviction, keep-alive unloading; all on the engine thread.

Several models may be resident at once (--max_loaded_models, --memory_budget). They share the
one engine thread (scheduler.Scheduler): llama.cpp contexts are not thread-safe and a 2-core box
gains nothing from running two models at once, so one FIFO thread stays the simplest correct
design; a resident model only saves the reload. The "active" model is the most recently used
one: requests that name no model go to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from llmserve.catalog.context import LoadPlan, kv_bytes, kv_label, plan_load
from llmserve.catalog.library import ModelFile, ModelLibrary, list_model_files
from llmserve.catalog.manifest import template_text
from llmserve.catalog.spec import LOAD_PARAMS, SAMPLING_PARAMS
from llmserve.config import Settings
from llmserve.engine.base import Engine
from llmserve.errors import LlmserveError, ModelLoadError, ModelNotReadyError
from llmserve.hardware import machine_available_memory, machine_threads
from llmserve.scheduler import Busy, Scheduler

__all__ = ["EngineFactory", "ModelFile", "ModelManager", "list_model_files", "resolve_model_name"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
EngineFactory = Callable[[Path, Settings], Engine]
State = Literal["starting", "loading", "ready", "error"]
_REAP_INTERVAL_S = 1.0


def resolve_model_name(models_dir: Path, name: str) -> str:
    """Map a model name (alias or file name) to a file in models_dir, or raise 400/404."""
    return ModelLibrary(models_dir, strict=False).resolve(name)


class OtherBackends(Protocol):
    """What the manager and the listings ask of the models served by other backends
    (backends/pool.py BackendPool): names, residency (llama-server children count against
    --max_loaded_models), the active one."""

    active: str | None  # a backend alias that requests naming no model go to

    def model_ids(self, *, peers: bool = True) -> list[str]: ...

    def resident_count(self) -> int: ...

    def idle_lru(self) -> list[tuple[float, str]]: ...

    def stop_now(self, name: str) -> bool: ...

    def remote_entries(self) -> list[dict[str, Any]]: ...

    def peer_entries(self) -> list[dict[str, Any]]: ...


@dataclass
class _Resident:
    engine: Engine
    footprint: int  # estimated bytes: file + KV cache
    settings: Settings  # what it was loaded with (n_ctx, threads decided)
    last_used: float
    expires_at: float | None = None  # monotonic time to unload at; None = never


class ModelManager:
    """Owns the resident engines; every load, use and unload happens on the worker thread."""

    def __init__(
        self,
        settings: Settings,
        factory: EngineFactory,
        worker: Scheduler,
        library: ModelLibrary | None = None,
        *,
        check_files: bool = False,
    ):
        self.settings = settings
        self.models_dir = settings.models_dir
        self.library = library or ModelLibrary(
            settings.models_dir, settings.manifest, templates_dir=settings.templates_dir,
            strict=False, allow_symlinks=settings.allow_symlinks,
        )  # fmt: skip
        # NOTE: check a file's GGUF header before evicting anything for it (the llama.cpp
        # factory; the tests' fake engines load placeholder files).
        self.check_files = check_files
        self._factory = factory
        self._worker = worker
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU first
        self._lock = threading.Lock()  # NOTE: readers on the event loop snapshot under it
        self._in_use: str | None = None
        self._keep_alive: float | None = None
        self.default_name: str | None = None
        # NOTE: the model a switch is loading; /v1/models lists it first (it is the model
        # requests naming none will get) before the load finishes.
        self.switching_to: str | None = None
        self.state: State = "starting"
        self.error: str | None = None
        self.load_seconds = 0.0
        self.loads = 0  # models loaded since start (a resident switch does not count)
        self._users: dict[str, int] = {}  # live requests per model (engine thread only)
        # NOTE: models.yaml entries on other backends (issue 11), set by create_app; their
        # llama-server children count against --max_loaded_models with these engines.
        self.backends: OtherBackends | None = None
        worker.after_each_job(self._job_done)

    # --- read side (any thread) ---------------------------------------------------------------

    @property
    def worker_queued(self) -> int:
        """Jobs waiting for or running on the engine thread."""
        return self._worker.queued

    @property
    def active_name(self) -> str | None:
        """File name (or backend alias) of the model that requests naming no model go to."""
        if self.backends is not None and self.backends.active is not None:
            return self.backends.active
        return self.default_name

    @property
    def engine(self) -> Engine | None:
        """The active model's engine when resident."""
        with self._lock:
            r = self._resident.get(self.default_name or "")
        return r.engine if r else None

    @property
    def listed_first(self) -> str | None:
        """The model /v1/models lists first: the one being switched to, else the active one."""
        return self.switching_to or self.active_name

    def loaded_names(self) -> list[str]:
        """Resident models, least recently used first."""
        with self._lock:
            return list(self._resident)

    def resident_settings(self) -> dict[str, tuple[int, Settings]]:
        """Resident models' (actual n_ctx, load settings), least recently used first."""
        with self._lock:
            return {n: (r.engine.info.n_ctx, r.settings) for n, r in self._resident.items()}

    def resolve(self, name: str) -> str:
        """A request's model name (alias or file name) to a file name (400/404 on bad names)."""
        return self.library.resolve(name)

    def files(self) -> list[ModelFile]:
        """GGUF files in the models dir."""
        return self.library.files()

    def announced_aliases(self) -> list[str]:
        """Names beyond file names that peers may send: models.yaml aliases of present files
        and the aliases of entries on other backends (peers excluded)."""
        names = [a for a, _ in self.library.served_aliases()]
        if self.backends is not None:
            names += [n for n in self.backends.model_ids(peers=False) if n not in names]
        return names

    def sampling_defaults(self, filename: str | None) -> Mapping[str, float]:
        """The catalog's default sampling parameters for a model (empty if none)."""
        spec = self.library.spec_for_file(filename or self.default_name or "")
        return {k: v for k, v in spec.sampling.items() if k in SAMPLING_PARAMS} if spec else {}

    def suggest_model(self, use_case: str, *, present_only: bool = True) -> str | None:
        """The best catalog model for a use-case tag (downloaded first, then smallest)."""
        for entry in self.library.suggest(use_case):
            if entry.present or not present_only:
                return entry.alias or entry.filename
        return None

    # --- engine-thread work ----------------------------------------------------------------------

    async def run(self, fn: Callable[[], T]) -> T:
        """Run fn on the engine thread, after the work queued before it."""
        return await self._worker.call(fn)

    def ensure(self, filename: str | None, keep_alive: float | None = None) -> Engine:
        """On the worker thread: the engine for filename (None: the active one), loading it.

        keep_alive (seconds, math.inf = forever) applies once the current job ends; None means
        --idle_unload_seconds.
        """
        name = filename or self.default_name
        if name is None:
            raise ModelNotReadyError(f"no model is loaded ({self.error or 'still starting'})")
        self._in_use, self._keep_alive = name, keep_alive
        with self._lock:
            resident = self._resident.get(name)
            if resident is not None:
                self._resident.move_to_end(name)
        if resident is not None:
            self.default_name = name
            return resident.engine
        return self._load_evicting(name)

    def acquire(self, filename: str | None) -> Engine:
        """On the engine thread, for a request: the engine, loaded if need be; the model
        stays resident until release()."""
        name = filename or self.default_name
        if name is None:
            raise ModelNotReadyError(f"no model is loaded ({self.error or 'still starting'})")
        saved = self._in_use, self._keep_alive
        try:
            engine = self.ensure(name)
        finally:
            self._in_use, self._keep_alive = saved
        self._users[name] = self._users.get(name, 0) + 1
        return engine

    def release(self, name: str, keep_alive: float | None, *, stamp: bool = True) -> None:
        """A request on `name` ended (stamp it and apply its keep_alive) or never started."""
        left = self._users.get(name, 1) - 1
        if left > 0:
            self._users[name] = left
        else:
            self._users.pop(name, None)
        if stamp:
            self._stamp(name, keep_alive)

    def busy(self, name: str) -> bool:
        """Whether requests are running on the model."""
        return self._users.get(name, 0) > 0

    def _load_evicting(self, name: str) -> Engine:
        previous = self.default_name
        if self.check_files:
            self.library.check_loadable(name)  # 400 before the active model is touched
        elif not self.library.allow_symlinks:
            self.library.check_inside(name)
        # NOTE: evict before loading so the models never need more than the budget at once;
        # if the load fails, the active model is loaded again when it was evicted for it.
        evicted = self._make_room(self._footprint(name, self.plan(name)))  # Busy: victims serve
        self.state = "loading"
        try:
            engine = self._load(name)  # planned again: the evictions freed memory
        except Exception as exc:
            # NOTE: llama.cpp's messages carry the server's absolute path; clients see names.
            detail = str(exc).replace(str((self.models_dir / name).resolve()), name)
            detail = detail.replace(str(self.models_dir / name), name)
            self.error = f"loading {name} failed: {detail}"
            logger.error("%s", self.error)
            self._in_use = None
            if previous in evicted:
                try:
                    self._load(previous)
                except Exception:
                    logger.exception("reloading %s failed", previous)
            self.state = "ready" if self._resident else "error"
            raise ModelLoadError(self.error) from exc
        self.state = "ready"
        self.error = None
        self.default_name = name
        return engine

    def idle_residents(self) -> list[tuple[float, str]]:
        """(last used, file) of resident models no request uses (any thread; a snapshot)."""
        with self._lock:
            return [(r.last_used, n) for n, r in self._resident.items() if not self.busy(n)]

    def unload_idle(self, name: str) -> bool:
        """On the engine thread: unload name unless a request uses it."""
        return not self.busy(name) and self.unload(name)

    def _make_room(self, footprint: int) -> list[str]:
        budget = self.settings.memory_budget
        evicted: list[str] = []
        pool = self.backends
        while self._resident or (pool is not None and pool.resident_count()):
            used = sum(r.footprint for r in self._resident.values())
            children = pool.resident_count() if pool is not None else 0
            over_count = len(self._resident) + children >= self.settings.max_loaded_models
            if not over_count and (budget is None or used + footprint <= budget):
                break
            # NOTE: in-process models in LRU order (the OrderedDict's), children by last use
            idle = [(r.last_used, n, False) for n, r in self._resident.items()
                    if not self.busy(n)][:1]
            if pool is not None and over_count:
                idle += sorted((t, n, True) for t, n in pool.idle_lru())[:1]
            if not idle:
                raise Busy(f"every resident model is serving; {footprint} bytes must wait")
            _, victim, is_child = min(idle)
            logger.info("evicting %s (least recently used) to make room", victim)
            if is_child and pool is not None:
                pool.stop_now(victim)
                continue
            self.unload(victim)
            evicted.append(victim)
        if budget is not None and footprint > budget:
            logger.warning(
                "%d MiB estimated exceeds --memory_budget %d MiB; loading it alone",
                footprint >> 20, budget >> 20,
            )  # fmt: skip
        return evicted

    def _load_settings(self, name: str) -> Settings:
        """The server settings with the catalog's per-model load defaults under explicit flags."""
        spec = self.library.spec_for_file(name)
        if spec is None:
            return self.settings
        explicit = self.settings.model_fields_set
        update = {k: v for k, v in spec.load.items() if k in LOAD_PARAMS and k not in explicit}
        return self.settings.model_copy(update=update) if update else self.settings

    def _with_draft_path(self, settings: Settings) -> Settings:
        """settings with draft_model (a file name or alias) as the file's absolute path;
        ModelLoadError naming it when it names no file in the models dir."""
        name = settings.draft_model
        if name is None:
            return settings
        try:
            filename = self.library.resolve(name)
        except LlmserveError as exc:
            raise ModelLoadError(f"draft model {name!r}: {exc.message}") from None
        path = (self.models_dir / filename).resolve()
        return settings.model_copy(update={"draft_model": str(path)})

    def plan(self, name: str) -> LoadPlan:
        """The settings name would be loaded with now: n_ctx and threads decided (any thread;
        reads the GGUF header and the machine's available memory)."""
        settings = self._load_settings(name)
        explicit = self.settings.model_fields_set
        sources = {k: f"--{k}" if k in explicit else f"models.yaml load.{k}"
                   for k in ("n_ctx", "n_threads")}  # fmt: skip
        return plan_load(settings, sources=sources, info=self.library.gguf(name),
                         model_bytes=self._file_size(name),
                         available=machine_available_memory(), machine_threads=machine_threads())

    def _file_size(self, name: str) -> int:
        path = self.models_dir / name
        return path.stat().st_size if path.is_file() else 0

    def _footprint(self, name: str, plan: LoadPlan) -> int:
        """Estimated resident bytes: the file (weights) plus the KV cache for n_ctx at the
        planned cache types."""
        info = self.library.gguf(name)
        layout = info.kv_layout() if info else None
        s = plan.settings
        return self._file_size(name) + (kv_bytes(layout, s, s.n_ctx or 0) if layout else 0)

    def _load(self, name: str) -> Engine:
        plan = self.plan(name)
        logger.info("loading %s", plan.summary(name))
        start = time.perf_counter()
        engine = self._factory(self.models_dir / name, self._with_draft_path(plan.settings))
        spec = self.library.spec_for_file(name)
        override = template_text(spec) if spec is not None else None
        if override:
            engine.info = dataclasses.replace(engine.info, template_override=override)
        # NOTE: what it runs with: flash_attn auto as llama.cpp resolved it (engines that
        # cannot tell keep the request)
        settings = plan.settings
        resolved = engine.info.flash_attn
        if resolved in ("on", "off") and resolved != settings.flash_attn:
            settings = settings.model_copy(update={"flash_attn": resolved})
        with self._lock:
            self._resident[name] = _Resident(
                engine, self._footprint(name, plan), settings, time.monotonic())
        self.load_seconds = time.perf_counter() - start
        self.loads += 1
        kv = engine.info.kv_bytes
        logger.info("loaded %s in %.2f s (KV %s %s, flash_attn %s)", name, self.load_seconds,
                    kv_label(settings.cache_type_k, settings.cache_type_v),
                    f"{kv / (1 << 20):.1f} MiB" if kv is not None else "size unknown",
                    settings.flash_attn)
        return engine

    # --- unloading ----------------------------------------------------------------------------

    def unload(self, name: str) -> bool:
        """On the worker thread: free a resident model; False if it was not loaded."""
        with self._lock:
            resident = self._resident.pop(name, None)
        if resident is None:
            return False
        resident.engine.close()
        logger.info("unloaded %s", name)
        return True

    def _job_done(self) -> None:
        """Scheduler hook after every call: stamp the model it used and apply its keep-alive."""
        name, keep_alive = self._in_use, self._keep_alive
        self._in_use = self._keep_alive = None
        if name is not None:
            self._stamp(name, keep_alive)

    def _stamp(self, name: str, keep_alive: float | None) -> None:
        resident = self._resident.get(name)
        if resident is None:
            return
        ttl = keep_alive if keep_alive is not None else self.settings.idle_unload_seconds
        now = time.monotonic()
        resident.last_used = now
        resident.expires_at = None if ttl is None or math.isinf(ttl) else now + ttl
        if ttl == 0 and not self.busy(name):
            self.unload(name)

    def unload_expired(self) -> list[str]:
        """On the worker thread: unload every model whose keep-alive ran out."""
        now = time.monotonic()
        with self._lock:
            due = [n for n, r in self._resident.items()
                   if r.expires_at and r.expires_at <= now and not self.busy(n)]
        return [n for n in due if self.unload(n)]

    def _next_expiry(self) -> float | None:
        with self._lock:
            times = [r.expires_at for r in self._resident.values() if r.expires_at is not None]
        return min(times) if times else None

    async def run_reaper(self) -> None:
        """Unload idle models when their keep-alive runs out (a task for the app's lifetime)."""
        while True:
            due = self._next_expiry()
            wait = _REAP_INTERVAL_S if due is None else due - time.monotonic()
            await asyncio.sleep(min(max(wait, 0.0), _REAP_INTERVAL_S))
            due = self._next_expiry()
            if due is not None and due <= time.monotonic():
                # NOTE: queued behind in-flight work; unload_expired re-checks on the thread.
                await self._worker.call(self.unload_expired)

    def flush_idle(self) -> bool:
        """On the worker thread: one resident engine stores one idle sequence's KV in the
        prompt cache tiers; False when none has any left (the scheduler's idle hook)."""
        for resident in list(self._resident.values()):
            flush = getattr(resident.engine, "flush_idle", None)
            if flush is not None and flush():
                return True
        return False

    def flush_all(self) -> None:
        """On the worker thread: store every idle sequence's KV that the tiers lack."""
        while self.flush_idle():
            pass

    def close(self) -> None:
        """On the worker thread at shutdown: free every model."""
        for name in self.loaded_names():
            self.unload(name)
