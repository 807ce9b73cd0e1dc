"""Admin routes of the original design: status, health, the models dir, switching."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse

from llmserve.cache.manager import PrefixCache
from llmserve.catalog.listing import describe_models, loaded_contexts
from llmserve.errors import error_body
from llmserve.http.deps import (
    BackendsDep,
    CacheDep,
    ManagerDep,
    ServiceDep,
    SettingsDep,
    WorkerDep,
)
from llmserve.http.openapi import API, errors
from llmserve.http.ui_routes import wants_html
from llmserve.schemas import RestoreCacheRequest, SetModelRequest
from llmserve.version import __version__

router = APIRouter(responses=errors(401))


@router.get("/", response_model=None)
async def status(request: Request, manager: ManagerDep) -> dict[str, Any] | RedirectResponse:
    """Version, active model and state; a browser (Accept: text/html) goes to the chat page."""
    if wants_html(request.headers.get("accept")):
        return RedirectResponse(request.url_for("ui_page").path, status_code=303)
    return {
        "name": "llmserve",
        "version": __version__,
        "model": manager.active_name,
        "state": manager.state,
        "error": manager.error,
        "queued": manager.worker_queued,
    }


@router.get("/health", response_model=None, responses=errors(503))
async def health(
    manager: ManagerDep, cache: CacheDep, settings: SettingsDep, worker: WorkerDep
) -> Any:
    """200 while the server can serve (a model is loaded, or one was and another is loading);
    503 before the first model is ready, or when the engine thread is dead or wedged (busy
    with no progress for --health_stall_seconds). The body says which, and the cache state."""
    engine = worker.liveness()
    loaded = manager.loaded_names()
    contexts = loaded_contexts(manager)
    active = next((c for c in contexts if c["model"] == manager.active_name), None)
    body: dict[str, Any] = {
        "status": "ok", "model": manager.active_name, "state": manager.state,
        "loaded": loaded, "load_error": manager.error, "engine": engine,
        "cache": _cache_state(cache),
        # the active model's context, then every resident model's n_ctx / threads / parallel
        "n_ctx": active["n_ctx"] if active else None, "loaded_models": contexts,
    }
    stalled = engine["seconds_since_progress"]
    reason = None
    if not engine["alive"]:
        reason, body["status"] = "the engine thread has stopped", "dead"
    elif stalled > settings.health_stall_seconds and manager.state != "loading":
        reason = f"the engine made no progress for {stalled:.0f} s while busy"
        body["status"] = "wedged"
    elif not loaded and manager.active_name is None:
        reason, body["status"] = f"model state: {manager.state}", manager.state
    if reason is None:
        return body
    return JSONResponse(
        {**body, **error_body(reason, "service_unavailable", code="not_ready")}, 503
    )


def _cache_state(cache: PrefixCache) -> dict[str, Any]:
    # NOTE: RAM figures only: the disk tier's counts are sqlite queries, too slow for probes
    return {
        "mode": cache.mode,
        "ram_entries": len(cache.ram) if cache.ram is not None else None,
        "ram_bytes": cache.ram.bytes if cache.ram is not None else None,
        "disk": cache.mode == "tiered", "hits": cache.hits, "misses": cache.misses,
    }


@router.get("/models")
async def models(manager: ManagerDep) -> dict[str, Any]:
    """Catalog entries and GGUF files: metadata, present, loaded, active."""
    described = await asyncio.to_thread(describe_models, manager)  # reads GGUF headers
    return {"active": manager.active_name, "loaded": manager.loaded_names(), "models": described}


@router.post("/setModel", responses=errors(*API))
async def set_model(body: SetModelRequest, backends: BackendsDep) -> dict[str, Any]:
    """Switch the active model once in-flight requests finish."""
    name = await backends.switch(body.model_name)
    return {"status": "ok", "model": name}


@router.post("/restore_cache", responses=errors(*API))
async def restore_cache(body: RestoreCacheRequest, service: ServiceDep) -> dict[str, Any]:
    """Evaluate and store a conversation's prompt so its next request starts from cache."""
    return await service.restore_cache(body)


@router.get("/cache")
async def cache_stats(cache: CacheDep, manager: ManagerDep) -> dict[str, Any]:
    """Prompt cache entries and bytes per tier, hits, misses, tokens reused."""
    await manager.run(manager.flush_all)  # NOTE: finished sequences not stored yet count
    return cache.stats()


@router.delete("/cache")
async def cache_clear(cache: CacheDep, manager: ManagerDep) -> dict[str, Any]:
    """Drop every prompt cache entry (both tiers)."""
    def clear() -> None:
        manager.flush_all()  # NOTE: or an idle engine would store them after the clear
        cache.clear()

    await manager.run(clear)
    return {"status": "ok", **cache.stats()}
