"""Continuous batching on the real GGUFs: batched output equals solo output, prefixes shared
across sequences, n choices, cancellation and model switches under batched load."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.config import Settings
from llmserve.engine.base import SamplingParams
from llmserve.scheduler import plan_step
from tests.conftest import GEMMA, SMOL, ServerProcess, require_model

pytestmark = pytest.mark.real_model

QUESTIONS = ["Tell me about cats.", "What is 2+2?", "Write a poem about the sea.",
             "Explain gravity to a child."]
TOKENS = 40
SYSTEM = "You are a careful agent. " + " ".join(
    f"Rule {i}: use tool_{i} for questions about topic {i}." for i in range(40)
)


@pytest.fixture(params=[SMOL, GEMMA])
def engine(request: pytest.FixtureRequest) -> Iterator[Any]:
    from llmserve.engine.llama import LlamaEngine

    engine = LlamaEngine.load(require_model(request.param),
                              Settings(n_ctx=4096, n_threads=2, parallel=4))
    try:
        yield engine
    finally:
        engine.close()


def _prompt(engine: Any, question: str, system: str | None = None) -> list[int]:
    from llmserve.chat.plan import plan_chat, render_chat
    from llmserve.schemas import ChatCompletionRequest

    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]
    plan = plan_chat(ChatCompletionRequest(messages=messages))
    text = render_chat(engine.info, plan, Path("templates"), None).text
    tokens = engine.tokenize(text, add_special=False, parse_special=True)
    bos = engine.info.bos_token_id
    if engine.info.add_bos and bos is not None and tokens[:1] != [bos]:
        tokens.insert(0, bos)
    return list(tokens)


def _solo(engine: Any, prompt: list[int]) -> list[int]:
    out = engine.generate(prompt, SamplingParams(temperature=0))
    tokens = [tok for _, (tok, _piece) in zip(range(TOKENS), out, strict=False)]
    out.close()
    engine.reset()  # NOTE: no slot reuse between the solo runs
    return tokens


def _batched(engine: Any, prompts: list[list[int]]) -> list[list[int]]:
    seqs = [engine.open_seq(p, SamplingParams(temperature=0)) for p in prompts]
    return _drain(engine, seqs, lambda live: live)


def _drain(engine: Any, seqs: list[Any], ready: Callable[[list[Any]], list[Any]]
           ) -> list[list[int]]:
    """Step the sequences that ready(live) picks until each has TOKENS tokens or ends."""
    outs: dict[int, list[int]] = {id(s): [] for s in seqs}
    live = list(seqs)
    while live:
        for seq, token in engine.execute(plan_step(ready(live), 512)):
            if engine.is_eog(token) or len(outs[id(seq)]) >= TOKENS:
                live.remove(seq)
                engine.close_seq(seq)
            else:
                outs[id(seq)].append(token)
    return [outs[id(s)] for s in seqs]


def test_batched_greedy_equals_solo(engine: Any) -> None:
    """4 different prompts decoded together, against each alone (the README's measured rule):
    Gemma 3 (Q4_K_M) gives identical tokens; SmolLM2 (Q4_1) gives the same first token (the
    prompt's logits) and drifts later, because llama.cpp's CPU matmul for its quant type
    rounds differently with the number of rows in the batch. A batch replays exactly."""
    prompts = [_prompt(engine, q) for q in QUESTIONS]
    solo = [_solo(engine, p) for p in prompts]
    engine.reset()
    batched = _batched(engine, prompts)
    engine.reset()
    assert _batched(engine, prompts) == batched  # deterministic for the same batch
    assert len({tuple(s) for s in solo}) == 4  # four different outputs, not one
    _assert_rule(engine, batched, solo)


def _assert_rule(engine: Any, got: list[list[int]], solo: list[list[int]]) -> None:
    if engine.info.architecture.startswith("gemma"):
        assert got == solo
    else:
        assert [b[0] for b in got] == [s[0] for s in solo]


def test_forked_prefix_equals_evaluated(engine: Any) -> None:
    """A sequence that forks a shared system prompt from a sibling (seq_cp) answers as one
    that evaluated it, on both models (Gemma's sliding window included)."""
    from llmserve.sharing import resolve, setup

    prompts = [_prompt(engine, q, SYSTEM) for q in QUESTIONS[:3]]
    solo = [_solo(engine, p) for p in prompts]
    engine.reset()
    from llmserve.cache.manager import PrefixCache

    cache = PrefixCache("off", Path("unused"), 0, 0)
    cache.mode = "ram"  # the RAM tier stays empty: every prefix comes from a sibling
    seqs, waits = [], []
    for p in prompts:  # one at a time, as the scheduler admits them
        seqs.append(engine.open_seq(p, SamplingParams(temperature=0)))
        waits.append(setup(engine, seqs[-1], cache))
    assert waits[0] is None and waits[1] is not None and waits[2] is not None

    def ready(live: list[Any]) -> list[Any]:
        picked = [s for s, w in zip(seqs, waits, strict=True)
                  if s in live and (w is None or resolve(engine, s, w, cache))]
        for i, s in enumerate(seqs):
            if s in picked:
                waits[i] = None
        return picked

    outs = _drain(engine, seqs, ready)
    shared = min(len(p) for p in prompts) - 40
    assert all(s.reused >= shared for s in seqs[1:])  # forked, not evaluated
    _assert_rule(engine, outs, solo)


def _stream(base: str, body: dict[str, Any], stop_after: int | None = None) -> dict[str, Any]:
    """A streamed chat: its text per choice, finish reasons and usage."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage: dict[str, Any] = {}
    chunks = 0
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=300) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                i = choice["index"]
                texts[i] = texts.get(i, "") + (choice["delta"].get("content") or "")
                if choice["finish_reason"]:
                    reasons[i] = choice["finish_reason"]
            chunks += 1
            if stop_after is not None and chunks >= stop_after:
                break
    return {"texts": texts, "reasons": reasons, "usage": usage}


def _chat(question: str, system: str | None = None, **kw: Any) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]
    return {"messages": messages, "temperature": 0, "max_tokens": 24, **kw}


def _together(base: str, bodies: list[dict[str, Any]],
              stop_after: list[int | None] | None = None) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = [{} for _ in bodies]

    def run(i: int) -> None:
        results[i] = _stream(base, bodies[i], (stop_after or [None] * len(bodies))[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    require_model(SMOL)
    require_model(GEMMA)
    # NOTE: Gemma 3's batched greedy output equals its solo output (the measured rule), so
    # neighbours can be compared token for token.
    srv = ServerProcess(tmp_path / "server.log", "--model_name", GEMMA, "--n_ctx", "4096",
                        "--n_threads", "2", "--parallel", "4",
                        "--cache_dir", str(tmp_path / "cache"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_shared_system_prompt_is_evaluated_once(server: ServerProcess) -> None:
    base = server.base_url
    bodies = [_chat(q, SYSTEM) for q in QUESTIONS]
    results = _together(base, bodies)
    stats = httpx.get(f"{base}/cache", timeout=10).json()
    prompts = [r["usage"]["prompt_tokens"] for r in results]
    cached = sorted(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in results)
    shared = min(prompts) - 40
    assert cached[0] == 0 and all(c >= shared for c in cached[1:])  # one computed it
    assert stats["tokens_evaluated"] < max(prompts) + 3 * 64  # the prefix once, not 4 times
    assert all(r["reasons"] == {0: "length"} or r["reasons"] == {0: "stop"} for r in results)


def test_n_choices_fork_the_prompt(server: ServerProcess) -> None:
    base = server.base_url
    one = _stream(base, _chat(QUESTIONS[2]))["texts"][0]
    greedy = httpx.post(f"{base}/v1/chat/completions", json=_chat(QUESTIONS[2], n=3),
                        timeout=300).json()
    assert [c["message"]["content"] for c in greedy["choices"]] == [one] * 3
    assert greedy["usage"]["completion_tokens"] == 3 * 24
    sampled = _stream(base, _chat(QUESTIONS[0], n=3, temperature=1.0, seed=7, max_tokens=16))
    assert set(sampled["texts"]) == {0, 1, 2} and len(set(sampled["texts"].values())) > 1


def test_cancelled_stream_leaves_neighbours_alone(server: ServerProcess) -> None:
    base = server.base_url
    bodies = [_chat(q, max_tokens=48, ignore_eos=True) for q in QUESTIONS[:3]]
    alone = [_stream(base, b)["texts"][0] for b in bodies]
    results = _together(base, bodies, stop_after=[None, 3, None])
    assert [results[0]["texts"][0], results[2]["texts"][0]] == [alone[0], alone[2]]
    assert results[1]["texts"][0] != alone[1]  # it was cut short
    for _ in range(50):
        if "(cancelled)" in server.log():
            break
        threading.Event().wait(0.1)
    assert "finished (cancelled)" in server.log()


def test_model_switch_waits_for_batched_work(server: ServerProcess) -> None:
    base = server.base_url
    bodies = [_chat(q, max_tokens=32, ignore_eos=True) for q in QUESTIONS[:2]]
    other: dict[str, Any] = {}

    def ask_gemma() -> None:
        threading.Event().wait(0.3)
        other["r"] = httpx.post(f"{base}/v1/chat/completions", timeout=300,
                                json={**_chat("Say hi."), "model": SMOL})

    t = threading.Thread(target=ask_gemma)
    t.start()
    results = _together(base, bodies)
    t.join(timeout=300)
    assert all(r["reasons"] == {0: "length"} and r["usage"]["completion_tokens"] == 32
               for r in results)
    assert other["r"].status_code == 200 and other["r"].json()["model"] == SMOL
    assert httpx.get(f"{base}/health", timeout=5).json()["model"] == SMOL
