"""Backends per model (issue 11) and the pool that routes requests to them.

    BackendPool.route(model) -> None (the in-process engine) | ProxyBackend
    ProxyBackend.chat / complete / embed / tokenize / detokenize / restore_cache
      +-- OpenAIBackend       a remote server: base_url, key from $api_key_env, upstream_model
      +-- LlamaServerBackend  a llama-server child: started on first use, health-waited,
                              stopped on unload, idle (keep_alive), eviction and shutdown;
                              a crashed child is started again by the next request

Managed children count against --max_loaded_models together with in-process models: the
least recently used idle one of either kind makes room (ModelManager._make_room asks
`idle_lru`/`stop_now`, and a starting child asks the manager the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from llmserve.backends.child import ChildProcess, free_port
from llmserve.backends.install import find_llama_server
from llmserve.backends.peers import PeerWatcher
from llmserve.backends.proxy import Upstream, payload
from llmserve.catalog.spec import BackendSpec, ModelSpec
from llmserve.config import Settings
from llmserve.errors import (
    BackendError,
    BackendUnavailableError,
    InvalidRequestError,
    LlmserveError,
    ModelNotFoundError,
)
from llmserve.output import Emit, Started
from llmserve.schemas import ChatCompletionRequest, CompletionRequest, RestoreCacheRequest

if TYPE_CHECKING:
    from llmserve.catalog.registry import ModelManager
    from llmserve.discovery import Node
    from llmserve.scheduler import EventStream

logger = logging.getLogger(__name__)
Wrap = Callable[[Emit], Emit]
_REAP_INTERVAL_S = 1.0
_HEALTH_POLL_S = 0.2


class Gen:
    """What ChatService needs to build a Generation: (id, Started, stream)."""

    def __init__(self, id_: str, started: Started, stream: EventStream):
        self.id, self.started, self.stream = id_, started, stream


class ProxyBackend:
    """A model served over OpenAI-compatible HTTP; subclasses say where and when."""

    kind = ""

    def __init__(self, spec: ModelSpec, settings: Settings):
        self.spec = spec
        self.name = spec.alias
        self.settings = settings
        self.state = "ready"
        self.error: str | None = None
        self.users = 0
        self.last_used = time.monotonic()
        self.expires_at: float | None = None

    # --- subclass hooks ----------------------------------------------------------------------

    async def upstream(self) -> Upstream:
        """The server to talk to, started or reached first if need be."""
        raise NotImplementedError

    def upstream_model(self) -> str | None:
        """The `model` sent upstream."""
        return None

    async def start(self) -> None:
        """Make it ready to serve (a child is started and health-waited)."""
        await self.upstream()

    def acquire(self) -> None:
        """A request starts using the backend."""
        self.users += 1
        self.last_used = time.monotonic()

    def release(self, keep_alive: float | None) -> None:
        """A request ended; apply its keep_alive (resident backends only)."""
        self.users = max(0, self.users - 1)
        self.last_used = time.monotonic()

    @property
    def resident(self) -> bool:
        """Whether it holds a model in memory here (counts against --max_loaded_models)."""
        return False

    def describe(self) -> dict[str, Any]:
        """Backend facts for GET /models (never the key)."""
        return {"backend": self.kind, "state": self.state, "error": self.error}

    async def close(self) -> None:
        """Free what it holds."""

    # --- requests -----------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, wrap: Wrap) -> Gen:
        """Start a chat completion upstream."""
        return await self._stream("/chat/completions", payload(req, self.upstream_model(),
                                                               self._extra()), True, req, wrap)

    async def complete(self, req: CompletionRequest, wrap: Wrap) -> Gen:
        """Start a text completion upstream."""
        return await self._stream("/completions", payload(req, self.upstream_model(),
                                                          self._extra()), False, req, wrap)

    def _extra(self) -> dict[str, Any]:
        return {}

    async def _stream(self, path: str, body: dict[str, Any], chat: bool,
                      req: ChatCompletionRequest | CompletionRequest, wrap: Wrap) -> Gen:
        upstream = await self._use()
        released = False

        def on_end() -> None:
            nonlocal released
            if not released:
                released = True
                self._after(req.keep_alive)

        try:
            id_, started, stream = await upstream.stream(
                path, body, chat=chat, model=self.name, n=req.n, wrap=wrap, on_end=on_end)
        except BaseException:
            on_end()
            raise
        return Gen(id_, started, stream)

    async def _use(self) -> Upstream:
        self.acquire()
        try:
            return await self.upstream()
        except BaseException:
            self.release(None)
            raise

    def _after(self, keep_alive: float | None) -> None:
        self.release(keep_alive)
        self._check_crash()

    def _check_crash(self) -> None:
        """After a request: note a child that died under it."""

    async def _call(self, url_of: Callable[[Upstream], str], body: dict[str, Any],
                    keep_alive: float | None = None) -> dict[str, Any]:
        upstream = await self._use()
        try:
            return await upstream.post_json(url_of(upstream), body)
        finally:
            self._after(keep_alive)

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        """OpenAI embeddings upstream (the answer as it came, model renamed)."""
        data = await self._call(lambda u: f"{u.api_base}/embeddings",
                                {**body, "model": self.upstream_model() or self.name})
        data["model"] = self.name
        return data

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """llama-server's /tokenize."""
        return await self._call(lambda u: f"{u.root}/tokenize", body)

    async def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """llama-server's /detokenize."""
        return await self._call(lambda u: f"{u.root}/detokenize", body)

    async def restore_cache(self, req: RestoreCacheRequest) -> dict[str, Any]:
        """Warm the server's prompt cache: the conversation with max_tokens 1 (llama-server
        keeps prompts with cache_prompt; vLLM and SGLang cache prefixes on their own)."""
        if req.dry_run:
            raise InvalidRequestError(f"dry_run is not available for backend {self.kind}",
                                      param="dry_run")
        body: dict[str, Any] = {
            "messages": [m.model_dump(mode="json", exclude_none=True) for m in req.messages],
            "max_tokens": 1, "stream": False, **self._extra(),
        }
        if req.tools:
            body["tools"] = [t.model_dump(mode="json", exclude_none=True) for t in req.tools]
        if self.upstream_model():
            body["model"] = self.upstream_model()
        start = time.perf_counter()
        data = await self._call(lambda u: f"{u.api_base}/chat/completions", body)
        usage = data.get("usage") or {}
        prompt = int(usage.get("prompt_tokens") or 0)
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        return {"model": self.name, "prompt_tokens": prompt, "cached_tokens": cached,
                "evaluated_tokens": prompt - cached,
                "seconds": round(time.perf_counter() - start, 4)}


class OpenAIBackend(ProxyBackend):
    """A remote OpenAI-compatible server (vLLM, SGLang, llama-server, OpenAI itself)."""

    kind = "openai"

    def __init__(self, spec: ModelSpec, settings: Settings, *, api_key: str | None = None):
        super().__init__(spec, settings)
        b = spec.backend
        key = os.environ.get(b.api_key_env) if b.api_key_env else api_key
        if b.api_key_env and not key:
            logger.warning("backend %s: $%s is not set; sending no key", self.name,
                           b.api_key_env)
        self._upstream = Upstream(self.name, b.base_url or "", key,
                                  connect_timeout=settings.backend_connect_timeout,
                                  read_timeout=settings.backend_read_timeout)

    async def upstream(self) -> Upstream:
        return self._upstream

    def upstream_model(self) -> str | None:
        return self.spec.backend.upstream_model or self.name

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "base_url": self.spec.backend.base_url,
                "upstream_model": self.upstream_model()}

    async def close(self) -> None:
        await self._upstream.close()


class LlamaServerBackend(ProxyBackend):
    """A llama-server child that llmserve starts (on first use) and stops."""

    kind = "llama_server"

    def __init__(self, spec: ModelSpec, settings: Settings, pool: BackendPool):
        super().__init__(spec, settings)
        self.state = "stopped"
        self.pool = pool
        self.child: ChildProcess | None = None
        self._upstream: Upstream | None = None
        self._start_lock: asyncio.Lock | None = None
        self._guard = threading.Lock()  # NOTE: the engine thread may stop it (eviction)
        self.restarts = 0
        self.port: int | None = None

    @property
    def resident(self) -> bool:
        return self.child is not None

    def _extra(self) -> dict[str, Any]:
        return {"cache_prompt": True}

    def command(self, exe: Path, port: int) -> list[str]:
        """llama-server's arguments: the entry's load settings over the server's flags."""
        load, s = self.spec.load, self.settings
        explicit = s.model_fields_set

        def pick(key: str, default: Any) -> Any:
            return default if key in explicit or key not in load else load[key]

        cmd = [str(exe), "--model", str(s.models_dir / self.spec.filename), "--host",
               "127.0.0.1", "--port", str(port), "--alias", self.name,
               "--ctx-size", str(pick("n_ctx", s.n_ctx)),
               "--n-gpu-layers", str(pick("n_gpu_layers", s.n_gpu_layers)),
               "--batch-size", str(pick("n_batch", s.n_batch)),
               "--parallel", str(load.get("parallel", s.parallel)), "--no-webui"]
        threads = pick("n_threads", s.n_threads)
        if threads:
            cmd += ["--threads", str(threads)]
        return cmd + list(self.spec.backend.args)

    async def upstream(self) -> Upstream:
        if self.state == "ready" and self._alive():
            assert self._upstream is not None
            return self._upstream
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        timeout = self.settings.backend_start_timeout
        try:
            await asyncio.wait_for(self._start_lock.acquire(), timeout)
        except TimeoutError:
            raise BackendUnavailableError(
                f"backend {self.name} is still starting after {timeout:g} s "
                "(--backend_start_timeout)") from None
        try:
            if self.state == "ready" and self._alive():
                assert self._upstream is not None
                return self._upstream
            self._check_crash()
            return await self._start()
        finally:
            self._start_lock.release()

    def _alive(self) -> bool:
        child = self.child
        return child is not None and child.returncode() is None

    def _check_crash(self) -> None:
        child = self.child
        if child is not None and child.returncode() is not None:
            self.error = (f"llama-server for {self.name} exited with code {child.returncode()}"
                          f" (pid {child.pid}); it starts again on the next request")
            logger.error("%s; last log lines:\n%s", self.error, child.tail())
            self.state = "error"
            self._forget()

    def _forget(self) -> None:
        with self._guard:
            self.child = None
            upstream, self._upstream = self._upstream, None
        if upstream is not None:
            asyncio.get_running_loop().create_task(upstream.close())

    async def _start(self) -> Upstream:
        exe = find_llama_server(self.settings.llama_server)
        if exe is None:
            self.state, self.error = "error", missing_executable_message()
            raise BackendError(self.error, code="backend_start_failed")
        await self.pool.make_room(self)
        self.state, self.error = "starting", None
        port, key = free_port(), secrets.token_urlsafe(24)
        self.port = port
        # NOTE: the key goes in the environment (LLAMA_API_KEY), not on the command line
        # where every local user could read it.
        env = {**os.environ, "LLAMA_API_KEY": key}
        try:
            child = ChildProcess(self.name, self.command(exe, port), env)
        except OSError as exc:
            self.state, self.error = "error", f"cannot run {exe}: {exc}"
            raise BackendError(self.error, code="backend_start_failed") from exc
        upstream = Upstream(self.name, f"http://127.0.0.1:{port}/v1", key,
                            connect_timeout=self.settings.backend_connect_timeout,
                            read_timeout=self.settings.backend_read_timeout)
        with self._guard:
            self.child, self._upstream = child, upstream
        try:
            await self._wait_healthy(child, upstream)
        except BaseException as exc:
            await asyncio.to_thread(child.stop)
            with self._guard:
                if self.child is child:
                    self.child, self._upstream = None, None
            await upstream.close()
            self.state = "error"
            if isinstance(exc, LlmserveError):
                self.error = exc.message
            raise
        self.state = "ready"
        self.restarts += 1
        self.last_used = time.monotonic()
        return upstream

    async def _wait_healthy(self, child: ChildProcess, upstream: Upstream) -> None:
        timeout = self.settings.backend_start_timeout
        deadline = time.monotonic() + timeout
        url = f"{upstream.root}/health"
        while True:
            code = child.returncode()
            if code is not None:
                await asyncio.sleep(0.1)  # NOTE: let the log reader take the last lines
                raise BackendError(
                    f"llama-server for {self.name} exited with code {code} while starting; "
                    f"last log lines:\n{child.tail()}", code="backend_start_failed")
            with contextlib.suppress(httpx.HTTPError):
                if (await upstream.client.get(url, timeout=2.0)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise BackendUnavailableError(
                    f"llama-server for {self.name} did not become healthy within {timeout:g} s "
                    "(--backend_start_timeout)", code="backend_start_timeout")
            await asyncio.sleep(_HEALTH_POLL_S)

    def release(self, keep_alive: float | None) -> None:
        super().release(keep_alive)
        ttl = keep_alive if keep_alive is not None else self.settings.idle_unload_seconds
        self.expires_at = None if ttl is None or math.isinf(ttl) else time.monotonic() + ttl
        if ttl == 0 and self.users == 0 and self.child is not None:
            # NOTE: detached at once, so the next request starts a new child rather than
            # using one that is being stopped
            child = self.detach()
            if child is not None:
                asyncio.get_running_loop().run_in_executor(None, child.stop)

    def detach(self) -> ChildProcess | None:
        """Take the child out of service (any thread): state stopped, its client closed;
        the caller stops the process it returns."""
        with self._guard:
            child, self.child = self.child, None
            upstream, self._upstream = self._upstream, None
            if child is not None:
                self.state, self.expires_at = "stopped", None
        loop = self.pool.loop
        if upstream is not None and loop is not None and not loop.is_closed():
            # NOTE: its connections point at a dead port; closed on the event loop
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(upstream.close(), loop)
        return child

    def stop_now(self) -> bool:
        """Stop the child (any thread; waits for it); False if none ran."""
        child = self.detach()
        if child is None:
            return False
        child.stop()
        return True

    def describe(self) -> dict[str, Any]:
        child = self.child
        return {**super().describe(), "pid": child.pid if child else None,
                "port": self.port if child else None}

    async def close(self) -> None:
        await asyncio.to_thread(self.stop_now)


def missing_executable_message() -> str:
    """How to get a llama-server, in one line."""
    return ("llama-server not found: pass --llama_server PATH, set LLAMA_SERVER, put it on "
            "PATH, or run `llmserve install llama`")


class BackendPool:
    """The backends of models.yaml entries, made on first use and kept per alias."""

    def __init__(self, settings: Settings, manager: ModelManager):
        self.settings = settings
        self.manager = manager
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

    def route(self, model: str | None) -> ProxyBackend | None:
        """The backend for a request's model; None: the in-process engine serves it."""
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
        return None

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
            self.peers = PeerWatcher(self.settings.port)
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
