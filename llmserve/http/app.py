"""create_app(): builds every component, hangs them on app.state, maps errors once."""

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

from llmserve import __version__
from llmserve.backends.pool import BackendPool
from llmserve.cache.manager import PrefixCache
from llmserve.catalog.registry import EngineFactory, ModelManager
from llmserve.config import Settings
from llmserve.errors import LlmserveError, QueueFullError, error_body
from llmserve.http import (
    admin_routes,
    anthropic_routes,
    openai_routes,
    responses_routes,
    ui_routes,
)
from llmserve.http.guard import BodyGuard
from llmserve.http.ops import Ops
from llmserve.scheduler import Scheduler
from llmserve.service import ChatService

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
    # NOTE: pydantic puts union members in loc ("literal['none','auto']", "NamedToolChoice");
    # the OpenAI param is the field path without them.
    loc = [str(p) for p in first.get("loc", ())
           if p != "body" and not re.search(r"[\[\]()',]|^[A-Z]", str(p))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
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
    worker = Scheduler(settings.max_queue, settings.n_batch)
    manager = ModelManager(
        settings, engine_factory or _llama_factory(), worker, check_files=engine_factory is None
    )
    cache = PrefixCache(
        settings.prompt_cache, settings.cache_dir, settings.cache_ram_bytes,
        settings.cache_disk_bytes, settings.cache_block_tokens,
    )
    manager.backends = backends = BackendPool(settings, manager)  # issue 11
    service = ChatService(settings, manager, worker, cache)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        backends.start()
        loading = asyncio.create_task(_initial_load(manager, settings.model_name))
        reaper = asyncio.create_task(manager.run_reaper())  # keep_alive / idle unloading
        ops.start()
        try:
            yield
        finally:
            await ops.stop()
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
    _install_error_handlers(app)
    app.include_router(admin_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(openai_routes.router, prefix="/v1")
    app.include_router(openai_routes.v1_router)
    responses_routes.install(app, settings, service)  # /v1/responses (issue 10)
    app.include_router(anthropic_routes.router)  # Anthropic-shaped errors on its routes
    app.include_router(ui_routes.router)
    # NOTE: added before Ops' middlewares, so it runs inside them: after the API key check.
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes,
                       timeout_body=settings.timeout_body)
    ops = Ops(app, settings, manager, worker, service)  # keys, metrics, discovery, extra routes
    return app


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


async def _initial_load(manager: ModelManager, name: str) -> None:
    manager.state = "loading"
    try:
        await manager.switch(name)
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
