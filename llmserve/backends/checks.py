"""Start-up checks of backend entries: problems reported as manifest errors with their line."""

from __future__ import annotations

from llmserve.backends.install import find_llama_server
from llmserve.backends.pool import missing_executable_message
from llmserve.catalog.library import ModelLibrary
from llmserve.catalog.manifest import ManifestError, Problem
from llmserve.config import Settings


def check_backends(library: ModelLibrary, settings: Settings) -> None:
    """ManifestError when a llama_server entry has no llama-server to run."""
    specs = library.backend_specs()
    children = [s for s in specs.values() if s.backend.kind == "llama_server"]
    if not children or find_llama_server(settings.llama_server) is not None:
        return
    why = missing_executable_message()
    if settings.llama_server is not None:
        why = f"--llama_server {settings.llama_server} is not a file"
    raise ManifestError(library.manifest_path, [
        Problem(s.backend.line, f"models.{s.alias}.backend", why) for s in children
    ])


def backend_names(library: ModelLibrary) -> set[str]:
    """Every name a backend entry answers to (for --model_name)."""
    return {n for s in library.backend_specs().values() for n in (*s.names, s.filename) if n}
