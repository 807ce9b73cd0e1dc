"""llmserve: a local OpenAI-compatible server for GGUF models, in-process via llama.cpp."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmserve.config import Settings

if TYPE_CHECKING:
    from llmserve.discovery import Node

__version__ = "0.1.0"
Config = Settings


def create_app(settings: Settings | None = None):  # type: ignore[no-untyped-def]
    """Build the ASGI app (imported lazily so `import llmserve` stays light)."""
    from llmserve.http.app import create_app as _create_app

    return _create_app(settings or Settings())


def discover(timeout: float = 3.0) -> list[Node]:
    """llmserve servers announcing themselves on the LAN (listens `timeout` seconds)."""
    from llmserve.discovery import discover as _discover

    return _discover(timeout)


__all__ = ["Config", "Settings", "__version__", "create_app", "discover"]
