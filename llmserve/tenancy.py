"""Who a request belongs to, for the data the server keeps between requests.

With API keys, the auth middleware (http/auth.py) records the id of the key a request came with
(`key_` + sha256 of the key, never the key) in the request's scope and in `current_key` for the
code that runs on its behalf. Stored Responses belong to that key (responses/service.py).

The prompt cache is split into partitions: KV that one partition stored (or holds live in a
slot) is never reused for, nor counted in `cached_tokens` of, a request of another partition.
A request's partition is its key's id (unless --share_prompt_cache) and its `cache_salt`
(vLLM's field, on every API); without either it is the shared partition "". The cost: clients
with different keys or salts evaluate a common system prompt once each instead of once.
"""

from __future__ import annotations

import hashlib
from contextvars import ContextVar

# NOTE: set by APIKeyMiddleware for the task serving one HTTP request; tasks and threads
# started from it (asyncio.create_task, asyncio.to_thread) inherit it.
current_key: ContextVar[str | None] = ContextVar("llmserve_api_key_id", default=None)

MAX_SALT_CHARS = 1024


def partition(key_id: str | None, salt: str | None) -> str:
    """The prompt-cache partition of a request made with key_id (None: no keys, or shared
    across keys) and cache_salt; "" is the shared partition."""
    if not key_id and not salt:
        return ""
    h = hashlib.sha256()
    h.update((key_id or "").encode())
    h.update(b"\0")
    h.update((salt or "").encode())
    return h.hexdigest()[:32]


def request_partition(salt: str | None, share_across_keys: bool) -> str:
    """The partition of the request being served now (its key from current_key)."""
    return partition(None if share_across_keys else current_key.get(), salt)


def salted(fingerprint: str, part: str) -> str:
    """The root of a partition's prompt-cache keys for a model: its fingerprint, salted."""
    return f"{fingerprint}~{part}" if part and fingerprint else fingerprint
