"""Backends per model (issue 11) and the pool that routes requests to them.

    BackendPool.route(model) -> a Backend (base.py): chat / complete / restore_cache /
                                apply_template / count_tokens / tokenize / detokenize / embed
      InProcessBackend        the models dir, in this process (in_process.py): every name that
                              is no backend entry's, a file name always
      ProxyBackend            a model served over OpenAI-compatible HTTP (base.py)
        +-- OpenAIBackend       a remote server: base_url, key from $api_key_env,
        |                       upstream_model; kind "peer": a model a LAN peer announces
        +-- LlamaServerBackend  a llama-server child (llama_server.py): started on first use,
                                health-waited, stopped on unload, idle (keep_alive), eviction
                                and shutdown; a crashed child is started again by the next
                                request

Managed children count against --max_loaded_models together with in-process models: the
least recently used idle one of either kind makes room (ModelManager._make_room asks
`idle_lru`/`stop_now`, and a starting child asks the manager the same way).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from llmserve.backends.base import Backend, OpenAIBackend, ProxyBackend, Wrap
from llmserve.backends.llama_server import LlamaServerBackend, missing_executable_message
from llmserve.backends.peers import PeerWatcher
from llmserve.catalog.spec import BackendSpec, ModelSpec
from llmserve.config import Settings
from llmserve.errors import BackendUnavailableError, LlmserveError, ModelNotFoundError

if TYPE_CHECKING:
    from llmserve.catalog.registry import ModelManager
    from llmserve.discovery import Node

__all__ = ["Backend", "BackendPool", "LlamaServerBackend", "OpenAIBackend", "ProxyBackend",
           "Wrap", "missing_executable_message"]

logger = logging.getLogger(__name__)
_REAP_INTERVAL_S = 1.0


class BackendPool:
    """The backends of models.yaml entries, made on first use and kept per alias."""

    def __init__(self, settings: Settings, manager: ModelManager, local: Backend):
        self.settings = settings
        self.manager = manager
        self.local = local  # the in-process engine: every model no entry or peer serves
        self._backends: dict[str, ProxyBackend] = {}
        self.active: str | None = None  # a backend model that requests naming none go to
        self._reaper: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.peers: PeerWatcher | None = None  # --peers auto

    def specs(self) -> dict[str, ModelSpec]:
        """models.yaml entries with a backend other than llama_cpp."""
        return self.manager.library.backend_specs()

    def find(self, model: str) -> ModelSpec | None:
        """The backend entry a request's model names: its alias or an extra alias (exact,
        then case-insensitive). NOTE: never by file name: a file name is the in-process
        engine's, so one GGUF can be served both ways."""
        specs = list(self.specs().values())
        name = model.strip()
        for folded in (False, True):
            for spec in specs:
                if any((n.casefold() == name.casefold()) if folded else n == name
                       for n in spec.names):
                    return spec
        return None

    def route(self, model: str | None) -> Backend:
        """The backend for a request's model (None: the active model's)."""
        if model is None:
            name = self.active
            spec = self.specs().get(name) if name else None
        else:
            spec = self.find(model)
        if spec is not None:
            return self.backend(spec)
        if model is not None and self.peers is not None and not self._local(model):
            node = self.peers.find(model)
            if node is not None:
                return self._peer(node, model)
        return self.local

    async def switch(self, name: str) -> str:
        """Make `name` the model requests naming none go to, once the work queued before it is
        done; returns its file name (in-process) or alias (its backend started if need be)."""
        backend = self.route(name)
        served = backend.served_name(name)  # NOTE: 400/404 before anything changes
        self.manager.switching_to = served
        try:
            await backend.load(served)
        finally:
            self.manager.switching_to = None
        self.active = backend.alias
        self.manager.state, self.manager.error = "ready", None
        return served

    def _local(self, model: str) -> bool:
        """Whether the in-process engine has the model (or must answer for the name)."""
        try:
            self.manager.library.resolve(model)
        except ModelNotFoundError:
            return False
        except LlmserveError:
            return True  # NOTE: a bad name or a refused file is the local 400
        return True

    def _peer(self, node: Node, model: str) -> ProxyBackend:
        """A backend for one model on one peer (kept while the peer's URL holds)."""
        key = f"peer:{node.name}:{model}"
        spec = ModelSpec(alias=model, filename="", sha256=None, size=None,
                         description=f"on peer {node.name}", sources=(), origin="peer",
                         backend=BackendSpec("openai", node.url, None, model))
        current = self._backends.get(key)
        if current is not None and current.spec == spec:
            return current
        made = OpenAIBackend(spec, self.settings, api_key=self.settings.peer_api_key)
        made.kind = "peer"
        self._backends[key] = made
        return made

    def backend(self, spec: ModelSpec) -> ProxyBackend:
        """The backend object of an entry (a changed entry gets a new one)."""
        current = self._backends.get(spec.alias)
        if current is not None and current.spec == spec:
            return current
        if current is not None and self.loop is not None:
            self.loop.create_task(current.close())
        made: ProxyBackend = (OpenAIBackend(spec, self.settings) if spec.backend.kind == "openai"
                              else LlamaServerBackend(spec, self.settings, self))
        self._backends[spec.alias] = made
        return made

    # --- residency (with ModelManager) ---------------------------------------------------------

    def _children(self) -> list[LlamaServerBackend]:
        return [b for b in list(self._backends.values()) if isinstance(b, LlamaServerBackend)]

    def resident_count(self) -> int:
        """Running (or starting) children."""
        return sum(1 for b in self._children() if b.resident)

    def idle_lru(self) -> list[tuple[float, str]]:
        """(last used, alias) of running children no request uses."""
        return [(b.last_used, b.name) for b in self._children() if b.resident and not b.users]

    def stop_now(self, name: str) -> bool:
        """Stop a child now (any thread)."""
        backend = self._backends.get(name)
        return isinstance(backend, LlamaServerBackend) and backend.stop_now()

    async def make_room(self, starting: LlamaServerBackend) -> None:
        """Before a child starts: evict the least recently used idle model (child or
        in-process) while --max_loaded_models would be exceeded; 503 past the timeout."""
        deadline = time.monotonic() + self.settings.backend_start_timeout
        while True:
            count = self.resident_count() + len(self.manager.loaded_names())
            if count < self.settings.max_loaded_models:
                return
            children = [(t, n, True) for t, n in self.idle_lru() if n != starting.name]
            local = [(t, n, False) for t, n in self.manager.idle_residents()]
            if children or local:
                _, victim, is_child = min(children + local)
                logger.info("evicting %s (least recently used) to start %s", victim,
                            starting.name)
                if is_child:
                    await asyncio.to_thread(self.stop_now, victim)
                else:
                    await self.manager.run(functools.partial(self.manager.unload_idle, victim))
                continue
            if time.monotonic() > deadline:
                raise BackendUnavailableError(
                    f"every loaded model is serving (--max_loaded_models "
                    f"{self.settings.max_loaded_models}); {starting.name} cannot start yet")
            await asyncio.sleep(0.2)

    # --- listing ------------------------------------------------------------------------------

    def state_of(self, spec: ModelSpec) -> dict[str, Any]:
        """Backend facts for one entry (made or not)."""
        backend = self._backends.get(spec.alias)
        if backend is not None and backend.spec == spec:
            return backend.describe()
        return {"backend": spec.backend.kind,
                "state": "ready" if spec.backend.kind == "openai" else "stopped", "error": None}

    def remote_entries(self) -> list[dict[str, Any]]:
        """GET /models rows of the backend entries (named by alias)."""
        out = []
        models_dir = self.settings.models_dir
        for spec in self.specs().values():
            row = self.state_of(spec)
            out.append({
                "name": spec.alias, "alias": spec.alias, "aliases": list(spec.aliases),
                "file": spec.filename or None,
                "present": (models_dir / spec.filename).is_file() if spec.filename else True,
                "description": spec.description, "use_cases": list(spec.use_cases),
                "loaded": row["state"] == "ready" and spec.backend.kind == "llama_server",
                "n_ctx": None, "active": self.active == spec.alias, **row,
            })
        return out

    def model_ids(self, *, peers: bool = True) -> list[str]:
        """Names for /v1/models: every backend entry's alias and extra aliases, then the
        models alive peers announce."""
        names = [n for spec in self.specs().values() for n in spec.names]
        if peers and self.peers is not None:
            names += [m for m, _ in self.peers.models() if m not in names]
        return names

    def peer_entries(self) -> list[dict[str, Any]]:
        """GET /models rows of the models peers serve, with their node."""
        if self.peers is None:
            return []
        return [{"name": m, "alias": None, "file": None, "present": True, "loaded": False,
                 "n_ctx": None, "active": False, "backend": "peer", "state": "ready",
                 "error": None, "node": node.name, "url": node.url}
                for m, node in self.peers.models()]

    # --- lifetime -----------------------------------------------------------------------------

    def start(self) -> None:
        """On the event loop at startup: the keep-alive reaper."""
        self.loop = asyncio.get_running_loop()
        self._reaper = self.loop.create_task(self._reap())
        if self.settings.peers == "auto":
            self.peers = PeerWatcher(self.settings.port, self.settings.host)
            self.peers.start()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(_REAP_INTERVAL_S)
            now = time.monotonic()
            for b in self._children():
                if b.resident and not b.users and b.expires_at and b.expires_at <= now:
                    logger.info("%s idle past its keep-alive: stopping it", b.name)
                    child = b.detach()
                    if child is not None:
                        await asyncio.to_thread(child.stop)

    async def close(self) -> None:
        """At shutdown: stop every child, close every connection pool."""
        if self._reaper is not None:
            self._reaper.cancel()
        if self.peers is not None:
            await self.peers.stop()
        for backend in list(self._backends.values()):
            try:
                await backend.close()
            except Exception:
                logger.exception("closing backend %s", backend.name)
        self._backends.clear()
