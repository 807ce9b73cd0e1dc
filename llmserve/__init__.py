"""llmserve: a local OpenAI-compatible server for GGUF models, in-process via llama.cpp."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmserve.config import Settings
from llmserve.version import __version__

if TYPE_CHECKING:
    from fastapi import FastAPI

    from llmserve.discovery import Node

Config = Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the ASGI app (imported lazily so `import llmserve` stays light)."""
    from llmserve.http.app import create_app as _create_app

    return _create_app(settings or Settings())


def discover(timeout: float = 3.0) -> list[Node]:
    """llmserve servers announcing themselves on the LAN (listens `timeout` seconds)."""
    from llmserve.discovery import discover as _discover

    return _discover(timeout)


__all__ = ["Config", "Settings", "__version__", "create_app", "discover"]
