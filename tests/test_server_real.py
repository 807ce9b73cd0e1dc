"""End-to-end: `python server.py` on the real SmolLM2 and Gemma GGUFs, the openai SDK as client."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import GEMMA, SMOL, ServerProcess, require_model

pytestmark = pytest.mark.real_model

ASK = [{"role": "user", "content": "Name three colors of the rainbow."}]


def test_models_list(client: openai.OpenAI, smol_server: ServerProcess) -> None:
    ids = [m.id for m in client.models.list()]
    active = httpx.get(f"{smol_server.base_url}/").json()["model"]
    assert ids[0] == active
    assert {SMOL, GEMMA} <= set(ids)


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model=SMOL, messages=ASK, temperature=0, max_tokens=48  # type: ignore[arg-type]
    )
    text = plain.choices[0].message.content
    assert text
    assert plain.model == SMOL
    assert plain.usage is not None and plain.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model=SMOL, messages=ASK, temperature=0, max_tokens=48, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    reasons = [r for r in reasons if r]
    assert reasons == [plain.choices[0].finish_reason]


def test_sdk_stream_helper(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=SMOL, messages=ASK, temperature=0, max_tokens=16  # type: ignore[arg-type]
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content


def test_parallel_requests_get_their_own_output(client: openai.OpenAI) -> None:
    prompts = [f"Write one sentence about the number {n}." for n in (3, 17, 42, 99)]

    def ask(prompt: str) -> str:
        r = client.chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=24,
        )
        return r.choices[0].message.content or ""

    sequential = [ask(p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(ask, prompts))
    assert parallel == sequential
    assert len(set(sequential)) > 1


def test_text_completions(client: openai.OpenAI) -> None:
    plain = client.completions.create(
        model=SMOL, prompt="The sky is", temperature=0, max_tokens=12
    )
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=SMOL, prompt="The sky is", temperature=0, max_tokens=12, stream=True
        )
        if c.choices
    )
    assert plain.choices[0].text
    assert streamed == plain.choices[0].text


def test_sampling_params_and_seed(client: openai.OpenAI) -> None:
    def sample() -> str:
        r = client.chat.completions.create(
            model=SMOL, messages=ASK, temperature=1.0, top_p=0.9, max_tokens=20, seed=1234,  # type: ignore[arg-type]
            presence_penalty=0.5, frequency_penalty=0.5, extra_body={"top_k": 40, "min_p": 0.05},
        )
        return r.choices[0].message.content or ""

    assert sample() == sample()


def test_stop_sequence(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model=SMOL, messages=ASK, temperature=0, max_tokens=48  # type: ignore[arg-type]
    ).choices[0].message.content or ""
    words = full.split()
    assert len(words) > 3
    stop = words[2]
    cut = client.chat.completions.create(
        model=SMOL, messages=ASK, temperature=0, max_tokens=48, stop=[stop]  # type: ignore[arg-type]
    )
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_gemma_switch_by_model_field_and_set_model(
    client: openai.OpenAI, smol_server: ServerProcess
) -> None:
    require_model(GEMMA)
    r = client.chat.completions.create(
        model=GEMMA, messages=ASK, temperature=0, max_tokens=16  # type: ignore[arg-type]
    )
    assert r.model == GEMMA
    assert r.choices[0].message.content
    # <bos><start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n from templates/gemma.jinja
    assert r.usage is not None and r.usage.prompt_tokens > 10
    base = smol_server.base_url
    assert httpx.post(f"{base}/setModel", json={"modelName": SMOL}, timeout=60).status_code == 200
    assert httpx.get(f"{base}/models").json()["active"] == SMOL
    bad = httpx.post(f"{base}/setModel", json={"modelName": "../" + SMOL}, timeout=60)
    assert bad.status_code == 400
    assert httpx.get(f"{base}/models").json()["active"] == SMOL


def test_errors_keep_the_server_serving(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=ASK)  # type: ignore[arg-type]
    huge = [{"role": "user", "content": "word " * 5000}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=SMOL, messages=huge, stream=stream)  # type: ignore[arg-type]
        assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=SMOL, messages=ASK, max_tokens=-1)  # type: ignore[arg-type]
    big = client.chat.completions.create(
        model=SMOL, messages=ASK, max_tokens=10**9, temperature=0  # type: ignore[arg-type]
    )
    assert big.choices[0].message.content


def _finished_tokens(server: ServerProcess, gen_id: str, timeout: float = 300) -> tuple[str, int]:
    """(finish reason, completion tokens) from the server's log line for a generation."""
    pattern = re.compile(re.escape(gen_id) + r" finished \((\w+)\): \d+ prompt \+ (\d+) completion")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = pattern.search(server.log())
        if m:
            return m.group(1), int(m.group(2))
        time.sleep(0.1)
    raise AssertionError(f"no log line for {gen_id}")


LONG = {"model": SMOL, "messages": ASK, "max_tokens": 1500, "ignore_eos": True}


def test_stream_disconnect_stops_generation(smol_server: ServerProcess) -> None:
    gen_id = ""
    with httpx.stream(
        "POST", f"{smol_server.base_url}/v1/chat/completions", json={**LONG, "stream": True},
        timeout=300,
    ) as resp:
        for line in resp.iter_lines():
            m = re.search(r'"id": "(chatcmpl-\w+)"', line)
            if m:
                gen_id = m.group(1)
                break
    reason, produced = _finished_tokens(smol_server, gen_id)
    assert reason == "cancelled"
    assert produced < 300


def test_non_stream_disconnect_stops_generation(smol_server: ServerProcess) -> None:
    before = smol_server.log()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{smol_server.base_url}/v1/chat/completions", json=LONG, timeout=1.0)
    deadline = time.monotonic() + 300  # NOTE: a liveness bound: found, it returns at once
    new = ""
    while time.monotonic() < deadline and "finished (" not in new:
        time.sleep(0.1)
        new = smol_server.log()[len(before) :]
    m = re.search(r"(chatcmpl-\w+) finished \(cancelled\): \d+ prompt \+ (\d+) completion", new)
    assert m, new
    assert int(m.group(2)) < 600


def _delta_text(line: str) -> str:
    choices = json.loads(line[6:]).get("choices") or [{}]
    return str((choices[0].get("delta") or {}).get("content") or "")


def test_health_answers_during_generation(smol_server: ServerProcess) -> None:
    # NOTE: no clock: /health is asked once the stream's first token has arrived, and its body
    # must show the generation still running (1500 tokens; closing the stream cancels it).
    with httpx.stream("POST", f"{smol_server.base_url}/v1/chat/completions",
                      json={**LONG, "stream": True}, timeout=300) as resp:
        # NOTE: the iterator is kept: a dropped one closes the connection (a cancel)
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: {") and _delta_text(line):
                break
        health = httpx.get(f"{smol_server.base_url}/health", timeout=60)
    assert health.status_code == 200
    assert health.json()["engine"]["active_sequences"] >= 1
