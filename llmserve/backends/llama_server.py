"""`backend: llama_server`: a llama-server child that llmserve starts on first use,
health-waits, and stops on unload, idle (keep_alive), eviction and shutdown; a crashed child
is started again by the next request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import httpx

from llmserve.backends.base import ProxyBackend
from llmserve.backends.child import ChildProcess, free_port
from llmserve.backends.install import find_llama_server
from llmserve.backends.proxy import Upstream
from llmserve.catalog.spec import ModelSpec
from llmserve.config import Settings
from llmserve.errors import BackendError, BackendUnavailableError, LlmserveError

logger = logging.getLogger(__name__)
_HEALTH_POLL_S = 0.2


class Residency(Protocol):
    """What a child asks of the pool that made it (BackendPool)."""

    loop: asyncio.AbstractEventLoop | None  # the event loop, once started

    async def make_room(self, starting: LlamaServerBackend) -> None:
        """Evict idle models until one more fits (--max_loaded_models)."""
        ...


class LlamaServerBackend(ProxyBackend):
    """A llama-server child that llmserve starts (on first use) and stops."""

    kind = "llama_server"

    def __init__(self, spec: ModelSpec, settings: Settings, pool: Residency):
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
               # NOTE: no --n_ctx: 0, llama-server's "the model's trained context"
               "--ctx-size", str(pick("n_ctx", s.n_ctx) or 0),
               "--n-gpu-layers", str(pick("n_gpu_layers", s.n_gpu_layers)),
               "--batch-size", str(pick("n_batch", s.n_batch)),
               "--parallel", str(load.get("parallel", s.parallel)), "--no-webui"]
        threads = pick("n_threads", s.n_threads)
        if threads:
            cmd += ["--threads", str(threads)]
        # NOTE: only when set (a flag, LLMSERVE_* or `load`): llama-server's defaults are ours
        for key, arg in (("cache_type_k", "-ctk"), ("cache_type_v", "-ctv"), ("flash_attn", "-fa")):
            if key in explicit or key in load:
                cmd += [arg, str(pick(key, getattr(s, key)))]
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
        row = {**super().describe(), "pid": child.pid if child else None,
               "port": self.port if child else None}
        code = child.returncode() if child else None
        if code is not None:  # NOTE: died since its last request; the next one restarts it
            row.update(state="error", error=f"llama-server exited with code {code}")
        return row

    async def close(self) -> None:
        await asyncio.to_thread(self.stop_now)


def missing_executable_message() -> str:
    """How to get a llama-server, in one line."""
    return ("llama-server not found: pass --llama_server PATH, set LLAMA_SERVER, put it on "
            "PATH, or run `llmserve install llama`")
