"""Shared fixtures: a fake-engine app for HTTP tests, real models for integration tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmserve.config import Settings
from llmserve.engine.fake import FakeEngine

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("LLMSERVE_TEST_MODELS_DIR", ROOT / "models"))
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake_models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("alpha.gguf", "beta.gguf"):
        (d / name).write_bytes(b"GGUF fake")
    return d


FakeFactory = Callable[..., "contextlib.AbstractAsyncContextManager[httpx.AsyncClient]"]


@contextlib.asynccontextmanager
async def app_client(app: Any, *, ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client for app with its lifespan running (and, if ready, a model loaded)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            deadline = time.monotonic() + 60  # NOTE: a liveness bound, not a timing
            while ready and time.monotonic() < deadline:
                if (await client.get("/health")).status_code == 200:
                    break
                await _sleep(0.01)
            yield client


@pytest.fixture
def fake_client(fake_models_dir: Path, tmp_path: Path) -> FakeFactory:
    """Factory: `async with fake_client(script=[...], n_ctx=..) as (client)`.

    `settings_kw` overrides server settings (e.g. {"stream_interval_ms": 0}).
    """
    from llmserve.http.app import create_app

    @contextlib.asynccontextmanager
    async def make(
        settings_kw: dict[str, Any] | None = None, **engine_kw: Any
    ) -> AsyncIterator[httpx.AsyncClient]:
        engines: list[FakeEngine] = []

        def factory(path: Path, settings: Settings) -> FakeEngine:
            engine = FakeEngine(path, **{"n_parallel": settings.parallel, **engine_kw})
            engines.append(engine)
            return engine

        settings = Settings(
            model_name="alpha.gguf", models_dir=fake_models_dir, cache_dir=tmp_path / "cache",
            templates_dir=tmp_path / "templates", no_announce=True, **(settings_kw or {}),
        )
        app = create_app(settings, engine_factory=factory)
        async with app_client(app) as client:
            client.engines = engines  # type: ignore[attr-defined]
            client.app = app  # type: ignore[attr-defined]
            yield client

    return make


async def _sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_model(name: str) -> Path:
    path = MODELS_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} missing: run `make test` (it fetches the test models)")
    return path


class ServerProcess:
    """`python server.py` on a free 127.0.0.1 port; its log goes to a file we can read."""

    def __init__(self, log_path: Path, *args: str):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.args = args
        self._log = log_path.open("wb")
        cmd = [sys.executable, str(ROOT / "server.py"), "--port", str(self.port),
               "--models_dir", str(MODELS_DIR), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def started_server(log_path: Path, *args: str) -> ServerProcess:
    """A ServerProcess that is ready (stopped again if it never gets there)."""
    server = ServerProcess(log_path, *args)
    try:
        server.wait_ready()
    except Exception:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def smol_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server on SmolLM2 for the integration tests (Gemma is switched to)."""
    require_model(SMOL)
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = ServerProcess(log, "--model_name", SMOL, "--n_ctx", "2048", "--n_threads", "2")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


AGENT_MODEL = GEMMA


@pytest.fixture(scope="session")
def agent_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server for the agent replay tests, on Gemma 3 with the defaults a new user
    gets (its trained 32k context; Gemma also prefills about 3x faster than SmolLM2 here),
    shared so that what one replay prefilled the next reads from the prompt cache."""
    require_model(AGENT_MODEL)
    log = tmp_path_factory.mktemp("agents") / "server.log"
    server = started_server(log, "--model_name", AGENT_MODEL,
                            "--cache_dir", str(tmp_path_factory.mktemp("agents-cache")))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """SmolLM2 with a 512-token context: where prompts overflow (the overflow tests)."""
    require_model(SMOL)
    tmp = tmp_path_factory.mktemp("small")
    server = started_server(tmp / "server.log", "--model_name", SMOL, "--n_ctx", "512",
                            "--n_threads", "2", "--cache_dir", str(tmp / "cache"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(smol_server: ServerProcess) -> Iterator[openai.OpenAI]:
    """The openai SDK on the shared SmolLM2 server (closed after the test: no leaked socket)."""
    with openai.OpenAI(base_url=f"{smol_server.base_url}/v1", api_key="unused",
                       max_retries=0) as sdk:
        yield sdk


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # NOTE: llama_cpp._utils opens /dev/null twice at import and never closes it; tests that
    # load an engine in-process would otherwise end with ResourceWarnings at interpreter exit.
    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        handle = getattr(utils, name, None)
        if handle is not None:
            handle.close()
