"""What Claude Code sends to /v1/messages (tests/fixtures/agents/claude_code_*.json): accepted on
the fake engine (conversion, Warning headers, the system-turn fallback) and replayed on SmolLM2
with the official anthropic SDK (prefix cache across turns, count_tokens, overflow errors)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import Message, MessageTokensCount

from tests.conftest import (
    AGENT_MODEL,
    SMOL,
    FakeFactory,
    ServerProcess,
)
from tests.test_messages import sse_events
from tests.test_system_turns import STRICT

AGENTS = Path(__file__).parent / "fixtures" / "agents"
CLAUDE_CODE = sorted(p.stem for p in AGENTS.glob("claude_code_*.json"))
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
BASH = {"type": "bash_20250124", "name": "bash"}
WARNING = ('299 llmserve "tools.{} ({}) is a server tool llmserve cannot run; left out of the '
           'prompt"')
BILLING = re.compile(r"x-anthropic-billing-header: [^\n]*")


def captured(name: str) -> dict[str, Any]:
    return dict(json.loads((AGENTS / f"{name}.json").read_text()))


def replay_headers(request: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in request["headers"].items() if k != "content-length"}


# --- the fake engine: our conversion and routes -------------------------------------------

@pytest.mark.anyio
@pytest.mark.parametrize("name", CLAUDE_CODE)
async def test_captured_requests_are_accepted(fake_client: FakeFactory, name: str) -> None:
    request = captured(name)
    assert request["path"] == "/v1/messages?beta=true"
    async with fake_client({"stream_interval_ms": 0}, n_ctx=400_000) as client:
        r = await client.post(request["path"], json={**request["body"], "model": "alpha.gguf"},
                              headers=replay_headers(request))
        assert r.status_code == 200, r.text
        assert "warning" not in r.headers
        events = sse_events(r.text)
        assert [n for n, _ in events][-1] == "message_stop"
        prompt = client.engines[0].prompts[-1]  # type: ignore[attr-defined]
    assert "x-anthropic-billing-header" not in prompt
    assert prompt.startswith("<|im_start|>system\nYou are a Claude agent")
    for m in request["body"]["messages"]:
        if m["role"] == "system":  # rendered as a system turn where it stands
            text = m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
            assert f"<|im_end|>\n<|im_start|>system\n{text[:40]}" in prompt


@pytest.mark.anyio
async def test_server_tools_are_dropped_with_a_warning_header(fake_client: FakeFactory) -> None:
    tool = {"name": "f", "input_schema": {"type": "object"}, "defer_loading": True}
    payload = {"model": "alpha.gguf", "max_tokens": 8, "tools": [WEB_SEARCH, tool, BASH],
               "messages": [{"role": "user", "content": "Hi"}]}
    expected = ", ".join([WARNING.format(0, "web_search_20250305"),
                          WARNING.format(2, "bash_20250124")])
    async with fake_client({"stream_interval_ms": 0}) as client:
        plain = await client.post("/v1/messages", json=payload)
        stream = await client.post("/v1/messages", json={**payload, "stream": True})
        count = await client.post("/v1/messages/count_tokens",
                                  json={k: v for k, v in payload.items() if k != "max_tokens"})
        prompt = client.engines[0].prompts[-1]  # type: ignore[attr-defined]
        custom_only = await client.post("/v1/messages", json={**payload, "tools": [tool]})
    assert plain.status_code == stream.status_code == count.status_code == 200
    Message.model_validate(plain.json())
    assert plain.headers["warning"] == stream.headers["warning"] == expected
    assert count.headers["warning"] == expected
    assert MessageTokensCount.model_validate(count.json()).input_tokens == len(prompt)
    assert '"name": "f"' in prompt and "web_search" not in prompt and "bash" not in prompt
    assert custom_only.status_code == 200 and "warning" not in custom_only.headers


@pytest.mark.anyio
async def test_a_template_refusing_late_system_turns_gets_them_merged(
    fake_client: FakeFactory
) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "system", "content": "env"}]
    async with fake_client(chat_template=STRICT) as client:
        r = await client.post("/v1/messages", json={
            "model": "alpha.gguf", "max_tokens": 8, "system": "S", "messages": messages})
        assert r.status_code == 200, r.text
        messages_prompt = client.engines[0].prompts[-1]  # type: ignore[attr-defined]
        r = await client.post("/v1/chat/completions", json={
            "model": "alpha.gguf", "max_tokens": 8,
            "messages": [{"role": "system", "content": "S"}, *messages]})
        assert r.status_code == 200, r.text
        chat_prompt = client.engines[0].prompts[-1]  # type: ignore[attr-defined]
    assert messages_prompt == chat_prompt == "[SYS]S\n[user]hi\n\nenv\n[assistant]"


# --- SmolLM2: the captured requests replayed with the anthropic SDK -------------------------

def sdk(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="dummy", max_retries=0,
                               timeout=1800)


def sdk_args(name: str, **changes: Any) -> dict[str, Any]:
    """A captured request as beta.messages arguments: the served model, max_tokens 8, its
    betas and user agent, sent to /v1/messages?beta=true as Claude Code does."""
    request = captured(name)
    body = copy.deepcopy(request["body"])
    body.update(model=AGENT_MODEL, max_tokens=8, **changes)
    body.pop("stream")
    headers = request["headers"]
    # NOTE: this SDK version's beta client sends no `?beta=true`; Claude Code does.
    return {**body, "betas": headers["anthropic-beta"].split(","),
            "extra_headers": {"user-agent": headers["user-agent"]},
            "extra_query": {"beta": "true"}}


def count_args(name: str) -> dict[str, Any]:
    """sdk_args for beta.messages.count_tokens (which takes no max_tokens or metadata)."""
    args = sdk_args(name)
    del args["max_tokens"], args["metadata"]
    return args


def prompt_total(usage: Any) -> int:
    return int(usage.input_tokens + (usage.cache_read_input_tokens or 0)
               + (usage.cache_creation_input_tokens or 0))


@pytest.mark.real_model
def test_claude_code_turns_replay_and_keep_their_prefix(agent_server: ServerProcess) -> None:
    with sdk(agent_server) as client:
        first = client.beta.messages.create(**sdk_args("claude_code_json_1"))
        second = client.beta.messages.create(**sdk_args("claude_code_json_2"))
        counted = client.beta.messages.count_tokens(**count_args("claude_code_json_2"))
    assert first.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert first.usage.output_tokens > 0
    one, two = prompt_total(first.usage), prompt_total(second.usage)
    assert 8_000 < one < two < 32_768
    # the system entry stands after the first user turn in both: the second turn reads the
    # whole first prompt (all but its last cache block and generation prompt) from the cache
    assert (second.usage.cache_read_input_tokens or 0) >= one - 128
    assert counted.input_tokens == two
    assert '"POST /v1/messages?beta=true HTTP/1.1" 200' in agent_server.log()


@pytest.mark.real_model
def test_claude_code_streams_replay(agent_server: ServerProcess) -> None:
    with sdk(agent_server) as client:
        for name in ("claude_code_stream_1", "claude_code_stream_2"):
            with client.beta.messages.stream(**sdk_args(name)) as stream:
                final = stream.get_final_message()
            assert final.stop_reason in ("end_turn", "max_tokens", "tool_use")
            assert final.usage.output_tokens > 0 and prompt_total(final.usage) > 8_000


@pytest.mark.real_model
def test_claude_model_name_requests_with_server_tools(agent_server: ServerProcess) -> None:
    args = sdk_args("claude_code_named_2")
    args["tools"] = [WEB_SEARCH, *args["tools"], BASH]
    with sdk(agent_server) as client:
        raw = client.beta.messages.with_raw_response.create(**sdk_args("claude_code_named_1"))
        assert "warning" not in raw.headers
        first = raw.parse()
        raw = client.beta.messages.with_raw_response.create(**args)
        second = raw.parse()
        counted = client.beta.messages.count_tokens(**count_args("claude_code_named_2"))
    assert raw.headers["warning"] == ", ".join([
        WARNING.format(0, "web_search_20250305"), WARNING.format(13, "bash_20250124")])
    assert first.usage.output_tokens > 0 and second.usage.output_tokens > 0
    # the server tools cost no prompt tokens
    assert counted.input_tokens == prompt_total(second.usage)


@pytest.mark.real_model
def test_billing_nonces_count_the_same(agent_server: ServerProcess) -> None:
    def count(billing: str) -> int:
        args = count_args("claude_code_json_2")
        args["system"][0]["text"] = billing
        with sdk(agent_server) as client:
            return client.beta.messages.count_tokens(**args).input_tokens

    line = captured("claude_code_json_2")["body"]["system"][0]["text"]
    assert BILLING.fullmatch(line)
    plain = count(line)
    assert plain == count(line + " cch=0a1b2;") == count(line + " cch=fe93c;")
    assert plain == count("x-anthropic-billing-header: cc_version=9.9.9; cc_entrypoint=cli;")


@pytest.mark.real_model
@pytest.mark.parametrize("stream", [False, True])
def test_overflow_in_anthropics_words(small_server: ServerProcess, stream: bool) -> None:
    words = " ".join(f"word{i}" for i in range(400))
    messages = [{"role": "user", "content": f"Repeat: {words}"}]
    with sdk(small_server) as client:
        counted = client.messages.count_tokens(model=SMOL, messages=messages).input_tokens
        assert counted > 512
        with pytest.raises(anthropic.BadRequestError) as err:
            if stream:
                with client.messages.stream(model=SMOL, max_tokens=8, messages=messages) as s:
                    s.get_final_message()
            else:
                client.messages.create(model=SMOL, max_tokens=8, messages=messages)
    # NOTE: the overflow is found at admission, before the 200: a stream gets the 400 too.
    assert err.value.status_code == 400
    assert err.value.body == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": f"prompt is too long: {counted} tokens > 512 maximum"}}


@pytest.mark.real_model
def test_a_captured_request_overflowing_a_small_context(small_server: ServerProcess) -> None:
    request = captured("claude_code_stream_1")
    body = {**request["body"], "model": SMOL, "max_tokens": 8}
    r = httpx.post(small_server.base_url + request["path"], json=body,
                   headers=replay_headers(request), timeout=120)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    match = re.fullmatch(r"prompt is too long: (\d+) tokens > 512 maximum", error["message"])
    assert match and int(match.group(1)) > 512
