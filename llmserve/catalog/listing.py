"""What the listing routes say about models: GET /models, GET /v1/models, /health's contexts.

Each model's context is shown the way peers show it: `context_length` is the n_ctx it runs
with (loaded) or would run with (not loaded: the same choice a load would make now), and
`meta.n_ctx_train` is the trained context from the GGUF header (llama-server's name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmserve.catalog.registry import ModelManager


def describe_models(manager: ModelManager) -> list[dict[str, Any]]:
    """Every known model (catalog and files) with loaded/active flags, backend and state,
    then the models.yaml entries on other backends, for GET /models (reads GGUF headers)."""
    loaded = {n: n_ctx for n, (n_ctx, _) in manager.resident_settings().items()}
    out = []
    for entry in manager.library.entries():
        d = manager.library.describe(entry)
        d["loaded"] = entry.filename in loaded
        d["n_ctx"] = loaded.get(entry.filename)
        d["active"] = entry.filename == manager.active_name
        d.update(backend="llama_cpp", state="ready" if d["loaded"] else "stopped", error=None)
        out.append(d)
    pool = manager.backends
    if pool is not None:
        out += pool.remote_entries() + pool.peer_entries()
    return out


def loaded_contexts(manager: ModelManager) -> list[dict[str, Any]]:
    """For /health: each resident model's n_ctx, threads, --parallel (the sequences that
    share its n_ctx cells), KV cache types and flash attention (as llama.cpp resolved auto,
    when it said) and speculative decoding, least recently used first."""
    return [
        {"model": name, "n_ctx": n_ctx, "n_threads": s.n_threads,
         "n_threads_batch": s.n_threads_batch, "parallel": s.parallel,
         "cache_type_k": s.cache_type_k, "cache_type_v": s.cache_type_v,
         "flash_attn": s.flash_attn,
         "draft": "model" if s.draft_model else s.draft, "draft_model": s.draft_model,
         "draft_max": s.draft_max, "draft_min": s.draft_min}
        for name, (n_ctx, s) in manager.resident_settings().items()
    ]  # fmt: skip


def openai_models(manager: ModelManager) -> list[dict[str, Any]]:
    """GET /v1/models entries: the active model (or the one a switch is loading) first, then
    the rest of the models dir, then aliases (models.yaml's, and those of entries on other
    backends). Reads GGUF headers: call it off the event loop."""
    first = manager.listed_first
    names = [m.name for m in manager.files()]
    ordered = ([first] if first in names else []) + [n for n in names if n != first]
    # NOTE: models.yaml `aliases` (e.g. gpt-4o-mini) are names clients may pick from here.
    served = [(a, f) for a, f in manager.library.served_aliases() if a not in names]
    other: list[str] = []
    if manager.backends is not None:  # models on other backends (issue 11), by alias
        taken = {*names, *(a for a, _ in served)}
        other = [a for a in manager.backends.model_ids() if a not in taken]
    if first in other:
        other.remove(first)
        ordered.insert(0, first)  # a backend entry that is (becoming) active
    loaded = manager.resident_settings()
    facts = {n: _context_facts(manager, n, loaded.get(n)) for n in names}
    rows = [(n, facts.get(n, {})) for n in ordered]
    rows += [(a, facts.get(f, {})) for a, f in served] + [(a, {}) for a in other]
    return [{"id": n, "object": "model", "created": 0, "owned_by": "llmserve", **extra}
            for n, extra in rows]


def _context_facts(
    manager: ModelManager, name: str, loaded: tuple[int, Any] | None
) -> dict[str, Any]:
    info = manager.library.gguf(name)
    n_ctx = loaded[0] if loaded is not None else manager.plan(name).settings.n_ctx
    meta = {
        "n_ctx_train": info.context_length if info else None,
        "n_params": info.parameters if info else None,
        "n_embd": info.arch_value("embedding_length") if info else None,
        "size": info.file_size if info else None,
    }
    return {"context_length": n_ctx, "loaded": loaded is not None, "meta": meta}
