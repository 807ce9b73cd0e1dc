"""Prometheus metrics for one app: a private CollectorRegistry and the hooks that feed it.

Every app builds its own `Metrics` (no module-level registry), so several apps in one
process never clash. The hook methods are thread-safe: the service calls them from the
engine thread.

Hooks for other components (all counters start at 0):
  metrics.cache_hit(tokens_reused)   a prompt reused `tokens_reused` cached KV tokens
  metrics.cache_miss()               a prompt found nothing to reuse
The prompt cache reaches the object as `ChatService.metrics` (or `app.state.metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes

# NOTE: local models on CPU are slow next to hosted APIs: buckets reach minutes.
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_RATES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)


@dataclass(frozen=True)
class LoadedModel:
    """A model held in memory: `mode` is `chat` or `embedding` (a second context)."""

    name: str
    mode: str
    load_seconds: float = 0.0


class _ModelCollector(Collector):
    """Reads the loaded models at scrape time, so no hook is needed for them."""

    def __init__(self, loaded: Callable[[], Iterable[LoadedModel]]):
        self._loaded = loaded

    def collect(self) -> Iterator[Metric]:
        models = list(self._loaded())
        up = GaugeMetricFamily(
            "llmserve_model_loaded", "Models in memory (1 per model and mode)",
            labels=["model", "mode"],
        )
        load = GaugeMetricFamily(
            "llmserve_model_load_seconds", "Seconds the loaded model took to load",
            labels=["model"],
        )
        for m in models:
            up.add_metric([m.name, m.mode], 1.0)
            if m.mode == "chat":
                load.add_metric([m.name], m.load_seconds)
        yield up
        yield load


class Metrics:
    """The server's instruments, registered in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "llmserve_requests", "HTTP requests by route and status", ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "llmserve_request_duration_seconds", "HTTP request duration (to the last byte)",
            ["route"], buckets=_SECONDS, registry=r,
        )
        self.prompt_tokens = Counter(
            "llmserve_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "llmserve_completion_tokens", "Completion tokens generated", ["model"], registry=r
        )
        self.embedding_tokens = Counter(
            "llmserve_embedding_tokens", "Tokens embedded by /v1/embeddings", ["model"],
            registry=r,
        )
        self.ttft = Histogram(
            "llmserve_time_to_first_token_seconds",
            "From a generation request reaching the service to its first text (queue included)",
            ["model"], buckets=_SECONDS, registry=r,
        )
        self.tokens_per_second = Histogram(
            "llmserve_generation_tokens_per_second",
            "Decode speed of each generation (after the first token)",
            ["model"], buckets=_RATES, registry=r,
        )
        self.queue_depth = Gauge(
            "llmserve_queue_depth", "Jobs waiting for or running on the engine thread",
            registry=r,
        )
        self.active_sequences = Gauge(
            "llmserve_active_sequences", "Sequences in the batch now (all models)", registry=r
        )
        self.batch_tokens = Histogram(
            "llmserve_batch_tokens", "Tokens in each llama_decode step (decode + prompt)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048), registry=r,
        )
        self.queue_wait = Histogram(
            "llmserve_queue_wait_seconds", "From a request's arrival to its admission",
            buckets=_SECONDS, registry=r,
        )
        self.preemptions = Counter(
            "llmserve_preemptions",
            "Requests paused because the KV cache could not hold every running sequence "
            "(their KV swapped out to the prompt cache; they resume when there is room)",
            registry=r,
        )
        self.draft_proposed = Counter(
            "llmserve_draft_tokens_proposed",
            "Speculative decoding: drafted tokens verified, by source (prediction, ngram, model)",
            ["source"], registry=r,
        )
        self.draft_accepted = Counter(
            "llmserve_draft_tokens_accepted",
            "Speculative decoding: drafted tokens the output kept, by source", ["source"],
            registry=r,
        )
        self.cache_hits = Counter(
            "llmserve_prompt_cache_hits", "Prompts that reused cached KV state", registry=r
        )
        self.cache_misses = Counter(
            "llmserve_prompt_cache_misses", "Prompts that found nothing to reuse", registry=r
        )
        self.cache_tokens_reused = Counter(
            "llmserve_prompt_cache_tokens_reused", "Prompt tokens served from the cache",
            registry=r,
        )

    def track(
        self, *, queue_depth: Callable[[], float], loaded: Callable[[], Iterable[LoadedModel]],
        active_sequences: Callable[[], float] | None = None,
    ) -> None:
        """Read queue depth and loaded models from their owners at scrape time."""
        self.queue_depth.set_function(queue_depth)
        if active_sequences is not None:
            self.active_sequences.set_function(active_sequences)
        self.registry.register(_ModelCollector(loaded))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    # --- hooks -----------------------------------------------------------------------

    def request(self, route: str, status: int, seconds: float) -> None:
        """One HTTP request finished."""
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def generation_started(self, model: str, prompt_tokens: int) -> None:
        """A prompt was accepted for generation."""
        self.prompt_tokens.labels(model).inc(prompt_tokens)

    def first_token(self, model: str, seconds: float) -> None:
        """The first text of a generation, `seconds` after its request reached the service."""
        self.ttft.labels(model).observe(seconds)

    def generation_finished(
        self, model: str, completion_tokens: int, decode_seconds: float
    ) -> None:
        """A generation ended; decode_seconds runs from the first text to the end."""
        self.completion_tokens.labels(model).inc(completion_tokens)
        if completion_tokens > 1 and decode_seconds > 0:
            self.tokens_per_second.labels(model).observe((completion_tokens - 1) / decode_seconds)

    def scheduled(self, kind: str, value: float) -> None:
        """Scheduler hook (engine thread): batch tokens per step, queue wait seconds."""
        if kind == "batch_tokens":
            self.batch_tokens.observe(value)
        elif kind == "queue_wait":
            self.queue_wait.observe(value)
        elif kind == "preempted":
            self.preemptions.inc(value)
        elif kind.startswith("draft_proposed:"):
            self.draft_proposed.labels(kind.partition(":")[2]).inc(value)
        elif kind.startswith("draft_accepted:"):
            self.draft_accepted.labels(kind.partition(":")[2]).inc(value)

    def embedded(self, model: str, tokens: int) -> None:
        """Inputs totalling `tokens` tokens were embedded."""
        self.embedding_tokens.labels(model).inc(tokens)

    def cache_hit(self, tokens_reused: int) -> None:
        """Prompt cache hook: a prompt reused `tokens_reused` tokens of cached state."""
        self.cache_hits.inc()
        self.cache_tokens_reused.inc(tokens_reused)

    def cache_miss(self) -> None:
        """Prompt cache hook: a prompt found nothing to reuse."""
        self.cache_misses.inc()
