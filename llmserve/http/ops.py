"""Operations glue for create_app: API keys, metrics, LAN announcement, the extra routes."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from llmserve import __version__
from llmserve.catalog.registry import ModelManager
from llmserve.config import Settings
from llmserve.discovery import Announcer, txt_records
from llmserve.extra_service import ExtraService
from llmserve.http import extra_routes, observe
from llmserve.http.auth import APIKeyMiddleware, is_loopback_host
from llmserve.metrics import LoadedModel, Metrics
from llmserve.scheduler import Scheduler
from llmserve.service import ChatService

logger = logging.getLogger(__name__)


def loaded_models(manager: ModelManager) -> list[LoadedModel]:
    """What is in memory now: the active model, and its embedding context if made."""
    engine = manager.engine
    if engine is None:
        return []
    out = [LoadedModel(engine.info.name, "chat", manager.load_seconds)]
    if engine.embedding_loaded:
        out.append(LoadedModel(engine.info.name, "embedding"))
    return out


class Ops:
    """Installs the operations pieces on an app; `start`/`stop` run in its lifespan."""

    def __init__(
        self, app: FastAPI, settings: Settings, manager: ModelManager, worker: Scheduler,
        service: ChatService,
    ):
        self.settings = settings
        self.manager = manager
        self.keys = settings.api_keys()
        self.metrics = Metrics()
        self.metrics.track(
            queue_depth=lambda: worker.queued, loaded=lambda: loaded_models(manager),
            active_sequences=lambda: worker.active_sequences,
        )
        worker.observers.append(self.metrics.scheduled)
        service.metrics = self.metrics
        self.announcer: Announcer | None = None
        app.state.metrics = self.metrics
        app.state.extra_service = ExtraService(manager, worker, self.metrics)
        app.state.ops = self
        app.include_router(extra_routes.router)
        app.include_router(observe.router)
        # NOTE: the last middleware added runs first: metrics also count refused requests.
        app.add_middleware(APIKeyMiddleware, keys=self.keys)
        app.add_middleware(
            observe.RequestMetricsMiddleware, metrics=self.metrics,
            paths=lambda: app.openapi()["paths"].keys(),
        )

    def txt(self) -> dict[str, str]:
        """The announcement's TXT records, from the current state."""
        return txt_records(
            version=__version__, model=self.manager.active_name,
            models=[m.name for m in self.manager.files()] + self.manager.announced_aliases(),
            state=self.manager.state,
            auth=bool(self.keys),
        )

    def start(self) -> None:
        """Warn about an open server; start the LAN announcement unless --no_announce."""
        if not self.keys and not is_loopback_host(self.settings.host):
            logger.warning(
                "serving on %s without an API key: anyone who can reach this address can use "
                "the server (set --api_key or LLMSERVE_API_KEY)", self.settings.host,
            )
        if not self.settings.no_announce:
            self.announcer = Announcer(self.settings.host, self.settings.port, self.txt)
            self.announcer.start()

    async def stop(self) -> None:
        """Withdraw the announcement."""
        if self.announcer is not None:
            await self.announcer.stop()
