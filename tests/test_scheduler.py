"""The batch loop's own logic on the fake engine: interleaving, n choices, queue limit, and
requests whose client left while they waited (no llama.cpp here)."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def sse(text: str) -> list[Any]:
    return [json.loads(line[5:]) for line in text.splitlines()
            if line.startswith("data:") and line[5:].strip() != "[DONE]"]


async def test_concurrent_requests_interleave(fake_client: Any) -> None:
    """Two requests on a 2-sequence server: each step advances both."""
    async with fake_client({"parallel": 2}, token_delay=0.002, script=["x"] * 30) as client:
        results = await asyncio.gather(*(client.post("/v1/chat/completions", json=CHAT)
                                         for _ in range(2)))
        trace = client.engines[0].trace
    assert [r.json()["choices"][0]["message"]["content"] for r in results] == ["x" * 30] * 2
    assert sorted(trace) == [0] * 30 + [1] * 30
    switches = sum(1 for a, b in itertools.pairwise(trace) if a != b)
    assert switches > 20  # one token of each per step, not one request after the other


async def test_one_sequence_serialises(fake_client: Any) -> None:
    async with fake_client({"parallel": 1}, token_delay=0.002, script=["y"] * 10) as client:
        results = await asyncio.gather(*(client.post("/v1/chat/completions", json=CHAT)
                                         for _ in range(3)))
        trace = client.engines[0].trace
    assert [r.json()["choices"][0]["message"]["content"] for r in results] == ["y" * 10] * 3
    assert trace == [0] * 10 + [1] * 10 + [2] * 10


async def test_n_choices(fake_client: Any) -> None:
    async with fake_client() as client:
        resp = await client.post("/v1/chat/completions", json={**CHAT, "n": 3})
        stream = await client.post("/v1/chat/completions", json={**CHAT, "n": 2, "stream": True})
        text = await client.post("/v1/completions", json={"prompt": "a", "n": 2})
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in body["choices"]} == {"Hello, world!"}
    assert body["usage"]["completion_tokens"] == 12
    chunks = sse(stream.text)
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["delta"].get("content", "") for c in mine) == "Hello, world!"
        assert mine[-1]["finish_reason"] == "stop"
    assert [c["index"] for c in text.json()["choices"]] == [0, 1]


async def test_n_above_parallel_is_400(fake_client: Any) -> None:
    async with fake_client({"parallel": 2}) as client:
        resp = await client.post("/v1/chat/completions", json={**CHAT, "n": 3})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "n"


async def test_n_choices_that_cannot_fit_together_are_400_before_any_output(
        fake_client: Any) -> None:
    """n choices share the prompt's KV and split the rest of the context: a max_tokens that
    cannot fit n times is refused up front (never cut short mid-reply); without one each
    choice may use an even share."""
    async with fake_client(script=["w"] * 1500) as client:  # the fake's n_ctx is 2048
        refused = await client.post("/v1/chat/completions",
                                    json={**CHAT, "n": 2, "max_tokens": 1100})
        fits = await client.post("/v1/chat/completions", json={**CHAT, "n": 2, "max_tokens": 900})
        shared = await client.post("/v1/chat/completions", json={**CHAT, "n": 2})
        alone = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1100})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "max_tokens"
    assert "lower n or max_tokens" in refused.json()["error"]["message"]
    assert [c["finish_reason"] for c in fits.json()["choices"]] == ["length"] * 2
    assert fits.json()["usage"]["completion_tokens"] == 1800
    prompt = shared.json()["usage"]["prompt_tokens"]
    share = (2048 - prompt) // 2
    assert [len(c["message"]["content"]) for c in shared.json()["choices"]] == [share] * 2
    assert alone.json()["usage"]["completion_tokens"] == 1100  # n = 1: its max_tokens


async def test_priority_field_orders_waiting_requests(fake_client: Any) -> None:
    """The API's `priority` reaches the scheduler: with one sequence busy, a waiting request
    of priority -1 is served before one of priority 1 that arrived first."""
    async with fake_client({"parallel": 1}, token_delay=0.002, script=["p"] * 400) as client:
        worker = client.app.state.worker

        async def queued(n: int) -> None:
            for _ in range(2000):  # NOTE: a liveness bound, not a timing
                if worker.waiting_requests >= n:
                    return
                await asyncio.sleep(0.001)

        head = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        for _ in range(2000):
            if client.engines and client.engines[0].trace:
                break
            await asyncio.sleep(0.001)
        done: list[str] = []

        async def send(name: str, priority: int) -> None:
            r = await client.post("/v1/chat/completions", json={**CHAT, "priority": priority})
            assert r.status_code == 200, r.text
            done.append(name)

        low = asyncio.create_task(send("low", 1))
        await queued(1)
        high = asyncio.create_task(send("high", -1))
        await queued(2)
        assert not head.done(), "the head request ended before both waited: lengthen it"
        await asyncio.gather(head, low, high)
        bad = await client.post("/v1/chat/completions", json={**CHAT, "priority": "soon"})
    assert done == ["high", "low"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"


async def test_queue_limit_is_503_with_retry_after(fake_client: Any) -> None:
    async with fake_client({"parallel": 1, "max_queue": 1}, token_delay=0.01,
                           script=["z"] * 100) as client:
        running = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await asyncio.sleep(0.2)
        waiting = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await asyncio.sleep(0.2)
        refused = await client.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        health = await client.get("/health")
        assert health.status_code == 200
        results = await asyncio.gather(running, waiting)
    assert [r.status_code for r in results] == [200, 200]


async def test_request_cancelled_while_waiting_never_starts(fake_client: Any) -> None:
    async with fake_client({"parallel": 1}, token_delay=0.01, script=["w"] * 60) as client:
        engine = client.engines[0]
        first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await asyncio.sleep(0.1)
        body = {"messages": [{"role": "user", "content": "never"}], "stream": True}
        late = asyncio.create_task(client.post("/v1/chat/completions", json=body))
        await asyncio.sleep(0.1)
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        assert (await first).status_code == 200
        after = await client.post("/v1/chat/completions", json=CHAT)
    assert after.status_code == 200
    assert not any("never" in p for p in engine.prompts)


async def test_metrics_show_batching(fake_client: Any) -> None:
    async with fake_client() as client:
        await client.post("/v1/chat/completions", json=CHAT)
        text = (await client.get("/metrics")).text
    assert "llmserve_active_sequences 0.0" in text
    assert "llmserve_batch_tokens_count" in text and "llmserve_queue_wait_seconds_count 1.0" in text


async def test_switch_waits_for_running_sequences(fake_client: Any) -> None:
    async with fake_client({"parallel": 2}, token_delay=0.005, script=["s"] * 40) as client:
        running = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await asyncio.sleep(0.05)
        switched = await client.post("/setModel", json={"model_name": "beta.gguf"})
        done = await running
    assert switched.status_code == 200
    assert done.json()["choices"][0]["message"]["content"] == "s" * 40
    assert isinstance(client, httpx.AsyncClient)
