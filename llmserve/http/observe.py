"""Request metrics (a pure ASGI middleware) and the `GET /metrics` route."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmserve.metrics import CONTENT_TYPE, Metrics

router = APIRouter()


def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


MetricsDep = Annotated[Metrics, Depends(_metrics)]


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
        self._paths = paths  # the app's route paths, for requests that never reach the router

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
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        # NOTE: a request the API-key check refused never reached the router.
        raw = scope.get("path", "")
        return raw if raw in self._paths() else "other"
