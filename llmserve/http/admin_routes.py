"""Admin routes of the original design: status, health, the models dir, switching."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse

from llmserve import __version__
from llmserve.errors import error_body
from llmserve.http.deps import CacheDep, ManagerDep, ServiceDep
from llmserve.http.ui_routes import wants_html
from llmserve.schemas import RestoreCacheRequest, SetModelRequest

router = APIRouter()


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


@router.get("/health", response_model=None)
async def health(manager: ManagerDep) -> dict[str, Any] | JSONResponse:
    """200 when a model is ready, 503 while it loads or switches."""
    if manager.state == "ready" and manager.active_name:
        return {"status": "ok", "model": manager.active_name}
    body = error_body(f"model state: {manager.state}", "service_unavailable", code="not_ready")
    body["status"] = manager.state
    return JSONResponse(body, status_code=503)


@router.get("/models")
async def models(manager: ManagerDep) -> dict[str, Any]:
    """Catalog entries and GGUF files: metadata, present, loaded, active."""
    described = await asyncio.to_thread(manager.describe)  # reads GGUF headers
    return {"active": manager.active_name, "loaded": manager.loaded_names(), "models": described}


@router.post("/setModel")
async def set_model(body: SetModelRequest, manager: ManagerDep) -> dict[str, Any]:
    """Switch the active model once in-flight requests finish."""
    name = await manager.switch(body.model_name)
    return {"status": "ok", "model": name}


@router.post("/restore_cache")
async def restore_cache(body: RestoreCacheRequest, service: ServiceDep) -> dict[str, Any]:
    """Evaluate and store a conversation's prompt so its next request starts from cache."""
    return await service.restore_cache(body)


@router.get("/cache")
async def cache_stats(cache: CacheDep) -> dict[str, Any]:
    """Prompt cache entries and bytes per tier, hits, misses, tokens reused."""
    return cache.stats()


@router.delete("/cache")
async def cache_clear(cache: CacheDep, manager: ManagerDep) -> dict[str, Any]:
    """Drop every prompt cache entry (both tiers)."""
    await manager.run(cache.clear)
    return {"status": "ok", **cache.stats()}
