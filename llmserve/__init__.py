"""llmserve: a local OpenAI-compatible server for GGUF models, in-process via llama.cpp."""

from llmserve.config import Settings

__version__ = "0.1.0"
Config = Settings


def create_app(settings: Settings | None = None):  # type: ignore[no-untyped-def]
    """Build the ASGI app (imported lazily so `import llmserve` stays light)."""
    from llmserve.http.app import create_app as _create_app

    return _create_app(settings or Settings())


__all__ = ["Config", "Settings", "__version__", "create_app"]
