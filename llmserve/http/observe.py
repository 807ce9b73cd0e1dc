"""Request metrics (a pure ASGI middleware) and the `GET /metrics` route."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmserve.http.deps import MetricsDep
from llmserve.http.openapi import errors
from llmserve.metrics import CONTENT_TYPE, Metrics

logger = logging.getLogger(__name__)
router = APIRouter(responses=errors(401))


@router.get("/metrics", response_class=Response)
async def metrics_text(metrics: MetricsDep) -> Response:
    """Every metric in the Prometheus text format."""
    return Response(metrics.render(), media_type=CONTENT_TYPE)


class RequestMetricsMiddleware:
    """Counts HTTP requests by route template and status, and times them to the last byte.

    NOTE: the label is the matched route's path template (`/v1/chat/completions`), never the
    raw URL, so unknown paths cannot blow up the number of series; they count as `other`.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: Callable[[], Collection[str]]):
        self.app = app
        self.metrics = metrics
        self._paths = paths  # the app's route paths (read once, at the first request)
        self._known_paths: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request(self._label(scope), status, time.perf_counter() - start)

    def _label(self, scope: Scope) -> str:
        # NOTE: the raw path first: a router included under two prefixes (`/chat/completions`
        # and `/v1/chat/completions`) reports the same route object for both.
        raw = scope.get("path", "")
        if raw in self._known():
            return str(raw)
        path = getattr(scope.get("route"), "path", None)
        return path if isinstance(path, str) else "other"

    def _known(self) -> frozenset[str]:
        if self._known_paths is None:
            try:
                self._known_paths = frozenset(self._paths())
            except Exception:  # NOTE: metrics must never break a request
                logger.exception("cannot list the app's routes for metrics labels")
                self._known_paths = frozenset()
        return self._known_paths
