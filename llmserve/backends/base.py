"""The backend seam: `Backend`, what every backend does, and the backends that serve a model
over OpenAI-compatible HTTP: ProxyBackend (requests in, our events out, users counted for
keep-alive) and OpenAIBackend (a remote server: base_url, the key from $api_key_env,
upstream_model). The in-process engine is in_process.py; llama-server children are
llama_server.py; BackendPool.route (pool.py) picks one for every request."""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from llmserve.backends.proxy import Upstream, payload
from llmserve.catalog.spec import ModelSpec
from llmserve.config import Settings
from llmserve.engine.base import Engine
from llmserve.errors import BackendError, InvalidRequestError
from llmserve.generation import Generation
from llmserve.output import Emit
from llmserve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    RestoreCacheRequest,
)
from llmserve.vectors import Embeddings

logger = logging.getLogger(__name__)
Wrap = Callable[[Emit], Emit]  # how the caller watches a generation's events (metrics)
# NOTE: in-process only: sees the engine and the prompt's tokens on the engine thread before
# they are evaluated and returns the tokens to use (the Anthropic routes' prefill and pins)
OnPrompt = Callable[[Engine, list[int]], list[int]]
Tokens = list[int] | list[dict[str, Any]]  # ids, or llama-server's {"id", "piece"} items


class Backend(Protocol):
    """What every backend does; BackendPool.route(model) gives the one serving a model.

    Requests raise their errors (4xx) before any output exists; generations come back as a
    Generation of our events whoever produced them."""

    kind: str  # llama_cpp (in-process), llama_server, openai, peer

    @property
    def alias(self) -> str | None:
        """BackendPool.active while this backend serves the requests that name no model
        (None: the in-process engine, whose own active model is ModelManager.default_name)."""
        ...

    def served_name(self, model: str) -> str:
        """The name a model is served under (a file name, or the backend's alias); 400/404
        for a bad name."""
        ...

    async def load(self, served: str) -> None:
        """Make the model ready (loaded, or its server started), after the work queued before."""
        ...

    async def chat(self, req: ChatCompletionRequest, wrap: Wrap,
                   on_prompt: OnPrompt | None = None) -> Generation:
        """Start a chat completion."""
        ...

    async def complete(self, req: CompletionRequest, wrap: Wrap) -> Generation:
        """Start a text completion."""
        ...

    async def restore_cache(self, req: RestoreCacheRequest, wrap: Wrap) -> dict[str, Any]:
        """Warm the prompt cache with a conversation's prompt (dry_run: only report)."""
        ...

    async def apply_template(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """The prompt a chat request renders to, its token count and the template used."""
        ...

    async def count_tokens(self, req: ChatCompletionRequest,
                           on_prompt: OnPrompt | None = None) -> int:
        """How many tokens a chat request's prompt takes."""
        ...

    async def tokenize(self, model: str | None, content: str, *, add_special: bool,
                       parse_special: bool, with_pieces: bool) -> Tokens:
        """Text to tokens with the model's tokenizer."""
        ...

    async def detokenize(self, model: str | None, tokens: list[int]) -> str:
        """Token ids to text (special tokens rendered)."""
        ...

    async def embed(self, req: EmbeddingRequest,
                    cancelled: threading.Event | None = None) -> Embeddings:
        """Unit-length vectors for every input; stops between inputs once `cancelled` is set."""
        ...


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

    @property
    def alias(self) -> str | None:
        return self.name

    def served_name(self, model: str) -> str:
        return self.name

    async def load(self, served: str) -> None:
        await self.start()

    async def chat(self, req: ChatCompletionRequest, wrap: Wrap,
                   on_prompt: OnPrompt | None = None) -> Generation:
        """Start a chat completion upstream (on_prompt is the in-process engine's)."""
        return await self._stream("/chat/completions", self._body(req), True, req, wrap)

    async def complete(self, req: CompletionRequest, wrap: Wrap) -> Generation:
        """Start a text completion upstream."""
        return await self._stream("/completions", self._body(req), False, req, wrap)

    def _body(self, req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        # NOTE: the entry's `sampling` defaults fill what the request did not set, as for
        # in-process models
        sent = req.model_fields_set
        defaults = {k: v for k, v in self.spec.sampling.items() if k not in sent}
        return payload(req, self.upstream_model(), {**defaults, **self._extra()})

    def _extra(self) -> dict[str, Any]:
        return {}

    async def _stream(self, path: str, body: dict[str, Any], chat: bool,
                      req: ChatCompletionRequest | CompletionRequest, wrap: Wrap) -> Generation:
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
        return Generation(id_, started, stream, req.n)

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

    async def embed(self, req: EmbeddingRequest,
                    cancelled: threading.Event | None = None) -> Embeddings:
        """OpenAI embeddings upstream (float32, as it sent them; model renamed)."""
        body = req.model_dump(mode="json", exclude_none=True)
        body["encoding_format"] = "float"
        data = await self._call(lambda u: f"{u.api_base}/embeddings",
                                {**body, "model": self.upstream_model() or self.name})
        try:
            rows = sorted(data["data"], key=lambda d: int(d.get("index", 0)))
            vectors = [struct.pack(f"<{len(r['embedding'])}f", *r["embedding"]) for r in rows]
        except (KeyError, TypeError, ValueError, struct.error) as exc:
            raise BackendError(f"backend {self.name}: malformed embeddings answer") from exc
        usage = data.get("usage") or {}
        return Embeddings(self.name, vectors, int(usage.get("prompt_tokens") or 0))

    async def tokenize(self, model: str | None, content: str, *, add_special: bool,
                       parse_special: bool, with_pieces: bool) -> Tokens:
        """llama-server's /tokenize."""
        data = await self._call(lambda u: f"{u.root}/tokenize", {
            "content": content, "add_special": add_special, "parse_special": parse_special,
            "with_pieces": with_pieces})
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise BackendError(f"backend {self.name}: /tokenize answered without tokens")
        return tokens

    async def detokenize(self, model: str | None, tokens: list[int]) -> str:
        """llama-server's /detokenize."""
        data = await self._call(lambda u: f"{u.root}/detokenize", {"tokens": tokens})
        return str(data.get("content", ""))

    def _no_template(self) -> InvalidRequestError:
        return InvalidRequestError(
            f"model {self.name} runs on backend {self.kind}: its template is not available here",
            param="model")

    async def apply_template(self, req: ChatCompletionRequest) -> dict[str, Any]:
        raise self._no_template()

    async def count_tokens(self, req: ChatCompletionRequest,
                           on_prompt: OnPrompt | None = None) -> int:
        raise self._no_template()

    async def restore_cache(self, req: RestoreCacheRequest, wrap: Wrap) -> dict[str, Any]:
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
