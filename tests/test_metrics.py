"""Prometheus metrics: per-app registries, request counting, generation hooks (fake engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmserve.config import Settings
from llmserve.engine.fake import FakeEngine
from llmserve.http.app import create_app
from llmserve.metrics import Metrics
from tests.conftest import app_client

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse the exposition into {(sample name, labels): value}."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


async def test_metrics_change_after_a_request(fake_client: Any) -> None:
    async with fake_client() as client:
        before = await client.get("/metrics")
        chat = await client.post("/v1/chat/completions", json=CHAT)
        missing = await client.get("/v1/nope")
        after = (await client.get("/metrics")).text
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    assert chat.status_code == 200
    prompt = chat.json()["usage"]["prompt_tokens"]
    route = {"route": "/v1/chat/completions", "status": "200"}
    assert value(before.text, "llmserve_requests_total", **route) == 0
    assert value(after, "llmserve_requests_total", **route) == 1
    assert value(after, "llmserve_requests_total", route="other", status="404") == 1
    assert missing.status_code == 404
    model = {"model": "alpha.gguf"}
    assert value(after, "llmserve_prompt_tokens_total", **model) == prompt
    assert value(after, "llmserve_completion_tokens_total", **model) == 4
    assert value(after, "llmserve_time_to_first_token_seconds_count", **model) == 1
    assert value(after, "llmserve_generation_tokens_per_second_count", **model) == 1
    assert value(after, "llmserve_request_duration_seconds_count",
                 route="/v1/chat/completions") == 1
    assert value(after, "llmserve_model_loaded", model="alpha.gguf", mode="chat") == 1
    assert ("llmserve_model_load_seconds", frozenset(model.items())) in samples(after)
    assert ("llmserve_queue_depth", frozenset()) in samples(after)
    # the fake engine has no KV state: every prompt is a cache miss
    assert value(after, "llmserve_prompt_cache_hits_total") == 0
    assert value(after, "llmserve_prompt_cache_tokens_reused_total") == 0
    assert value(after, "llmserve_prompt_cache_misses_total") == 1


async def test_streamed_and_refused_requests_are_counted(fake_models_dir: Path) -> None:
    settings = Settings(model_name="alpha.gguf", models_dir=fake_models_dir, no_announce=True,
                        api_key=["k"])
    app = create_app(settings, engine_factory=lambda p, _: FakeEngine(p))
    key = {"X-API-Key": "k"}
    async with app_client(app) as client:
        refused = await client.post("/v1/chat/completions", json=CHAT)
        streamed = await client.post(
            "/v1/chat/completions", json={**CHAT, "stream": True}, headers=key
        )
        text = (await client.get("/metrics", headers=key)).text
    assert refused.status_code == 401 and streamed.status_code == 200
    assert value(text, "llmserve_requests_total",
                 route="/v1/chat/completions", status="401") == 1
    assert value(text, "llmserve_requests_total",
                 route="/v1/chat/completions", status="200") == 1
    assert value(text, "llmserve_completion_tokens_total", model="alpha.gguf") == 4


async def test_cache_hooks_and_embedding_mode(fake_client: Any) -> None:
    async with fake_client() as client:
        metrics: Metrics = client.app.state.metrics
        metrics.cache_hit(12)
        metrics.cache_hit(3)
        metrics.cache_miss()
        await client.post("/v1/embeddings", json={"input": "abc"})
        text = (await client.get("/metrics")).text
    assert value(text, "llmserve_prompt_cache_hits_total") == 2
    assert value(text, "llmserve_prompt_cache_misses_total") == 1
    assert value(text, "llmserve_prompt_cache_tokens_reused_total") == 15
    assert value(text, "llmserve_embedding_tokens_total", model="alpha.gguf") == 3
    assert value(text, "llmserve_model_loaded", model="alpha.gguf", mode="embedding") == 1


async def test_two_apps_do_not_share_metrics(fake_models_dir: Path) -> None:
    def make() -> Any:
        s = Settings(model_name="alpha.gguf", models_dir=fake_models_dir, no_announce=True)
        return create_app(s, engine_factory=lambda p, _: FakeEngine(p))

    first, second = make(), make()
    first.state.metrics.cache_miss()
    first.state.metrics.request("/x", 200, 0.1)
    assert value(first.state.metrics.render().decode(), "llmserve_prompt_cache_misses_total") == 1
    assert value(second.state.metrics.render().decode(), "llmserve_prompt_cache_misses_total") == 0
    assert value(second.state.metrics.render().decode(), "llmserve_requests_total",
                 route="/x", status="200") == 0


def test_tokens_per_second_needs_two_tokens() -> None:
    m = Metrics()
    m.generation_finished("m", 1, 0.5)
    m.generation_finished("m", 11, 0.5)
    text = m.render().decode()
    assert value(text, "llmserve_generation_tokens_per_second_count", model="m") == 1
    assert value(text, "llmserve_generation_tokens_per_second_sum", model="m") == 20
    assert value(text, "llmserve_completion_tokens_total", model="m") == 12
