"""FastAPI dependencies: components built by create_app, read from app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from llmserve.cache.manager import PrefixCache
from llmserve.catalog.registry import ModelManager
from llmserve.service import ChatService


def _service(request: Request) -> ChatService:
    service: ChatService = request.app.state.service
    return service


def _manager(request: Request) -> ModelManager:
    manager: ModelManager = request.app.state.manager
    return manager


def _cache(request: Request) -> PrefixCache:
    cache: PrefixCache = request.app.state.cache
    return cache


CacheDep = Annotated[PrefixCache, Depends(_cache)]
ServiceDep = Annotated[ChatService, Depends(_service)]
ManagerDep = Annotated[ModelManager, Depends(_manager)]
