"""create_app(): builds every component, hangs them on app.state, maps errors once.

The lifespan loads the first model, runs the keep-alive reaper and the LAN announcement, and
on shutdown stops them and the engine thread. Middleware order, outermost first:
RequestMetricsMiddleware -> APIKeyMiddleware -> BodyGuard -> the routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmserve.anthropic.service import MessagesService
from llmserve.backends.in_process import InProcessBackend
from llmserve.backends.pool import BackendPool
from llmserve.cache.manager import PrefixCache
from llmserve.catalog.registry import EngineFactory, ModelManager
from llmserve.config import Settings
from llmserve.discovery import Announcer, txt_records
from llmserve.embeddings import EmbeddingService
from llmserve.errors import LlmserveError, QueueFullError, error_body
from llmserve.http import (
    admin_routes,
    anthropic_routes,
    embedding_routes,
    observe,
    openai_routes,
    plain_chat_routes,
    responses_routes,
    token_routes,
    ui_routes,
)
from llmserve.http.auth import APIKeyMiddleware, is_loopback_host
from llmserve.http.deps import whole_body_message
from llmserve.http.guard import BodyGuard
from llmserve.http.openapi import tidy
from llmserve.metrics import LoadedModel, Metrics
from llmserve.private import restrict_umask, tighten
from llmserve.responses.service import ResponsesService
from llmserve.responses.store import ResponseStore
from llmserve.scheduler import Scheduler
from llmserve.service import ChatService
from llmserve.tokens import TokenService
from llmserve.version import __version__

logger = logging.getLogger(__name__)
ENGINE_STOP_WAIT = 3.0  # seconds shutdown waits for the engine thread's current work


def _llama_factory() -> EngineFactory:
    from llmserve.engine.llama import LlamaEngine  # NOTE: the only path to llama_cpp

    return LlamaEngine.load


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    whole = whole_body_message(first)
    if whole is not None:
        return whole, None
    # NOTE: pydantic puts union members in loc ("literal['none','auto']", "NamedToolChoice");
    # the OpenAI param is the field path without them.
    loc = [str(p) for p in first.get("loc", ())
           if p != "body" and not re.search(r"[\[\]()',]|^[A-Z]", str(p))]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return f"missing required parameter: {param!r}", param
    return f"invalid parameter {param!r}: {first.get('msg', 'invalid value')}", param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LlmserveError)
    async def _ours(_: Request, exc: LlmserveError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFullError) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(
            error_body(message, "invalid_request_error", param=param, code="invalid_request"),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        if exc.status_code >= 500:
            kind = "server_error"
        return JSONResponse(
            error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"), 500)


def create_app(settings: Settings, engine_factory: EngineFactory | None = None) -> FastAPI:
    """The ASGI app; engine_factory defaults to llama.cpp (tests pass a fake)."""
    _private_files(settings)
    worker = Scheduler(settings.max_queue, settings.n_batch)
    manager = ModelManager(
        settings, engine_factory or _llama_factory(), worker, check_files=engine_factory is None
    )
    cache = PrefixCache(
        settings.prompt_cache, settings.cache_dir, settings.cache_ram_bytes,
        settings.cache_disk_bytes, settings.cache_block_tokens,
    )
    metrics = Metrics()
    metrics.track(
        queue_depth=lambda: worker.queued, loaded=lambda: _loaded_models(manager),
        active_sequences=lambda: worker.active_sequences,
    )
    worker.observers.append(metrics.scheduled)
    worker.idle_hooks.append(manager.flush_idle)
    # NOTE: every model goes through a backend: the in-process engine, or (issue 11) a
    # llama-server child, a remote server, a LAN peer
    local = InProcessBackend(settings, manager, worker, cache, metrics)
    manager.backends = backends = BackendPool(settings, manager, local)
    service = ChatService(settings, backends, metrics)
    keys = settings.api_keys()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backends.start()
        loading = asyncio.create_task(_initial_load(backends, settings.model_name))
        reaper = asyncio.create_task(manager.run_reaper())  # keep_alive / idle unloading
        announcer = app.state.announcer = _announce(settings, manager, keys)
        try:
            yield
        finally:
            if announcer is not None:
                await announcer.stop()
            loading.cancel()
            reaper.cancel()
            await _stop_engine(worker, manager)
            await backends.close()  # stops every llama-server child
            cache.close()

    app = FastAPI(title="llmserve", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.worker = worker
    app.state.manager = manager
    app.state.service = service
    app.state.cache = cache
    app.state.metrics = metrics
    app.state.backends = backends
    app.state.tokens = TokenService(backends)
    app.state.embeddings = EmbeddingService(backends)
    app.state.responses = ResponsesService(  # /v1/responses (issue 10)
        service, ResponseStore(settings.cache_dir / "responses", settings.responses_max)
    )
    app.state.messages = MessagesService(service, local)
    app.state.announcer = None  # set by the lifespan unless --no_announce
    _install_error_handlers(app)
    app.include_router(admin_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(openai_routes.router, prefix="/v1")
    app.include_router(openai_routes.v1_router)
    app.include_router(responses_routes.router)
    app.include_router(anthropic_routes.router)  # Anthropic-shaped errors on its routes
    app.include_router(ui_routes.router)
    app.include_router(token_routes.router)
    app.include_router(embedding_routes.router)
    app.include_router(plain_chat_routes.router)
    app.include_router(observe.router)
    # NOTE: the last middleware added runs first: the body guard runs after the API key
    # check, and the metrics also count refused requests.
    app.openapi = tidy(app)  # type: ignore[method-assign]
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes,
                       timeout_body=settings.timeout_body)
    app.add_middleware(APIKeyMiddleware, keys=keys)
    app.add_middleware(
        observe.RequestMetricsMiddleware, metrics=metrics,
        paths=lambda: app.openapi()["paths"].keys(),
    )
    return app


def _private_files(settings: Settings) -> None:
    """Owner-only files from here on (umask 0o077: this is the server process); files and
    folders older versions left readable under the cache dir are tightened, in one log line."""
    restrict_umask()
    tightened = tighten(settings.cache_dir)
    if tightened:
        logger.info("made %d files and folders under %s owner-only (chmod go-rwx)",
                    tightened, settings.cache_dir)


def _loaded_models(manager: ModelManager) -> list[LoadedModel]:
    """What is in memory now: the active model, and its embedding context if made."""
    engine = manager.engine
    if engine is None:
        return []
    out = [LoadedModel(engine.info.name, "chat", manager.load_seconds)]
    if engine.embedding_loaded:
        out.append(LoadedModel(engine.info.name, "embedding"))
    return out


def _announce(settings: Settings, manager: ModelManager, keys: list[str]) -> Announcer | None:
    """Warn about an open server; start the LAN announcement unless --no_announce."""
    if not keys and not is_loopback_host(settings.host):
        logger.warning(
            "serving on %s without an API key: anyone who can reach this address can use "
            "the server (set --api_key or LLMSERVE_API_KEY)", settings.host,
        )
    if settings.no_announce:
        return None

    def txt() -> dict[str, str]:
        return txt_records(
            version=__version__, model=manager.active_name,
            models=[m.name for m in manager.files()] + manager.announced_aliases(),
            state=manager.state, auth=bool(keys),
        )

    announcer = Announcer(settings.host, settings.port, txt)
    announcer.start()
    return announcer


async def _stop_engine(worker: Scheduler, manager: ModelManager) -> None:
    """End every request, free the models, stop the engine thread; never wait on a wedged one.

    NOTE: a call that is stuck inside llama.cpp (one slow grammar mask, a huge decode) cannot
    be interrupted; after ENGINE_STOP_WAIT seconds shutdown goes on without it (the thread is a
    daemon, and the process's exit frees the models) so SIGTERM always ends the server."""
    worker.cancel_streams()
    try:
        await asyncio.wait_for(worker.call(worker.cancel_all), ENGINE_STOP_WAIT)
        await asyncio.wait_for(worker.call(manager.close), ENGINE_STOP_WAIT)
    except TimeoutError:
        logger.warning("the engine thread is still busy after %g s; exiting without freeing "
                       "the models", ENGINE_STOP_WAIT)
        worker.shutdown(timeout=0.1)
    else:
        worker.shutdown()


async def _initial_load(backends: BackendPool, name: str) -> None:
    manager = backends.manager
    manager.state = "loading"
    try:
        await backends.switch(name)
    except LlmserveError as exc:
        manager.state = "error"
        manager.error = exc.message
        logger.error("could not load %s: %s", name, exc.message)


def app_factory() -> Any:
    """For `uvicorn --factory llmserve.http.app:app_factory` (settings from LLMSERVE_* env)."""
    return create_app(Settings())


def __getattr__(name: str) -> Any:
    """`uvicorn llmserve.http.app:app`: a new app from LLMSERVE_* env on each access (PEP 562).

    NOTE: built on access, not at import, so importing this module has no side effects.
    """
    if name == "app":
        return app_factory()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
