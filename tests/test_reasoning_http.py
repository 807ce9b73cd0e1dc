"""Reasoning and logit_bias over HTTP against the scripted fake engine: reasoning_content in
messages and stream deltas, --reasoning_format, template variables, logit_bias 400s."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmserve.cli import _settings, build_parser
from tests.test_http import CHAT, assert_error, sse_events
from tests.test_tools_http import ASK, WEATHER

pytestmark = pytest.mark.anyio

FAST = {"stream_interval_ms": 0}
# A reply whose tags are cut inside: every token boundary the splitter must hold across.
THINK_SCRIPT = ["<th", "ink", ">\nThe user", " says hi. <", "/", "thi", "nk", ">", "\n\nHel",
                "lo!"]
# Opens <think> in the generation prompt when the request enables thinking.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}[{{ m.reasoning_content }}]{% endif %}{{ m.content }}"
    "<|im_end|>\n{% endfor %}effort={{ reasoning_effort | default('unset') }}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking | default(false) %}<think>\n{% endif %}{% endif %}"
)
JSON_TOOLS_TEMPLATE = (
    "{{ tools | tojson }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)


def deltas(text: str) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in sse_events(text)[:-1] if c["choices"]]


async def test_reasoning_content_non_stream_and_stream_agree(fake_client: Any) -> None:
    async with fake_client(FAST, script=THINK_SCRIPT) as client:
        plain = (await client.post("/v1/chat/completions", json=CHAT)).json()
        resp = await client.post("/v1/chat/completions", json={
            **CHAT, "stream": True, "stream_options": {"include_usage": True}})
    message = plain["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hello!",
                       "reasoning_content": "The user says hi."}
    assert plain["usage"]["completion_tokens_details"] == {
        "reasoning_tokens": 8, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    got = deltas(resp.text)
    reasoning = [d["reasoning_content"] for d in got if "reasoning_content" in d]
    content = "".join(d.get("content") or "" for d in got)
    assert len(reasoning) > 1  # streamed as it came, not held to the end
    assert "".join(reasoning) == message["reasoning_content"] and content == "Hello!"
    assert all("content" not in d for d in got if "reasoning_content" in d)
    usage = sse_events(resp.text)[-2]["usage"]
    assert usage["completion_tokens_details"] == {
        "reasoning_tokens": 8, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}


async def test_no_reasoning_no_field(fake_client: Any) -> None:
    async with fake_client(script=["Plain", " reply"]) as client:
        body = (await client.post("/v1/chat/completions", json=CHAT)).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Plain reply"}
    assert body["usage"]["completion_tokens_details"] == {
        "reasoning_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}


@pytest.mark.parametrize("where", ["flag", "request"])
async def test_format_none_leaves_the_markup(fake_client: Any, where: str) -> None:
    settings = {**FAST, "reasoning_format": "none"} if where == "flag" else FAST
    extra = {"reasoning_format": "none"} if where == "request" else {}
    async with fake_client(settings, script=THINK_SCRIPT) as client:
        body = (await client.post("/v1/chat/completions", json={**CHAT, **extra})).json()
        resp = await client.post("/v1/chat/completions", json={**CHAT, **extra, "stream": True})
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "".join(THINK_SCRIPT)}
    assert "".join(d.get("content") or "" for d in deltas(resp.text)) == "".join(THINK_SCRIPT)


async def test_text_completions_are_not_split(fake_client: Any) -> None:
    async with fake_client(script=THINK_SCRIPT) as client:
        body = (await client.post("/v1/completions", json={"prompt": "x"})).json()
    assert body["choices"][0]["text"] == "".join(THINK_SCRIPT)


async def test_template_opens_thinking_and_reads_variables(fake_client: Any) -> None:
    script = ["Hmm, ", "a greeting.", "</think>", "Hi there."]
    history = {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "greet back"},
        {"role": "user", "content": "again"}]}
    async with fake_client(FAST, script=script, chat_template=THINKING_TEMPLATE) as client:
        on = await client.post("/v1/chat/completions", json={
            **history, "chat_template_kwargs": {"enable_thinking": True},
            "reasoning_effort": "low"})
        streamed = await client.post("/v1/chat/completions", json={
            **history, "thinking": {"type": "enabled"}, "stream": True})
        off = await client.post("/v1/chat/completions", json={**history, "thinking": False})
        prompts = client.engines[0].prompts
    assert on.json()["choices"][0]["message"]["reasoning_content"] == "Hmm, a greeting."
    assert on.json()["choices"][0]["message"]["content"] == "Hi there."
    got = deltas(streamed.text)
    assert "".join(d.get("reasoning_content", "") for d in got) == "Hmm, a greeting."
    assert "".join(d.get("content") or "" for d in got) == "Hi there."
    assert prompts[0].endswith("<think>\n") and "effort=low" in prompts[0]
    assert "[greet back]Hello" in prompts[0]
    assert prompts[1].endswith("<think>\n") and "effort=unset" in prompts[1]
    # not opened: the reply is read from its start, and "</think>" is just text
    assert not prompts[2].endswith("<think>\n")
    assert off.json()["choices"][0]["message"] == {
        "role": "assistant", "content": "".join(script)}


async def test_tool_call_after_thinking(fake_client: Any) -> None:
    script = ["<think>", "I should call", " the tool.", "</think>\n", "<tool_call>\n",
              '{"name": "get_weather", "arguments": {"city": "Paris"}}', "\n</tool_call>"]
    async with fake_client(FAST, script=script) as client:
        body = (await client.post("/v1/chat/completions", json=ASK)).json()
        resp = await client.post("/v1/chat/completions", json={**ASK, "stream": True})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["reasoning_content"] == "I should call the tool."
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    got = deltas(resp.text)
    assert "".join(d.get("reasoning_content", "") for d in got) == "I should call the tool."
    assert not "".join(d.get("content") or "" for d in got)
    assert [tc["function"]["name"] for d in got for tc in d.get("tool_calls", [])
            if "id" in tc] == ["get_weather"]


async def test_gpt_oss_channels_and_tool_call(fake_client: Any) -> None:
    script = ["<|channel|>", "analysis", "<|message|>", "Need the", " weather.", "<|end|>",
              "<|start|>", "assistant", "<|channel|>", "commentary to=functions.get_weather",
              " <|constrain|>json", "<|message|>", '{"city": ', '"Paris"}']
    ask = {**ASK, "tools": [WEATHER]}
    async with fake_client(FAST, script=script, chat_template=JSON_TOOLS_TEMPLATE) as client:
        body = (await client.post("/v1/chat/completions", json=ask)).json()
    choice = body["choices"][0]
    assert choice["message"]["reasoning_content"] == "Need the weather."
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


async def test_reasoning_request_errors(fake_client: Any) -> None:
    async with fake_client() as client:
        reserved = await client.post("/v1/chat/completions", json={
            **CHAT, "chat_template_kwargs": {"add_generation_prompt": False}})
        effort = await client.post("/v1/chat/completions", json={
            **CHAT, "reasoning_effort": "maximal"})
        fmt = await client.post("/v1/chat/completions", json={**CHAT, "reasoning_format": "x"})
    assert assert_error(reserved, 400)["param"] == "chat_template_kwargs"
    assert assert_error(effort, 400)["param"] == "reasoning_effort"
    assert assert_error(fmt, 400)["param"] == "reasoning_format"


def test_reasoning_format_flag() -> None:
    args = build_parser().parse_args(["serve", "--reasoning-format", "none"])
    assert _settings(args).reasoning_format == "none"
    args = build_parser().parse_args(["serve", "--reasoning_format", "deepseek"])
    assert _settings(args).reasoning_format == "deepseek"
    assert _settings(build_parser().parse_args(["serve"])).reasoning_format == "auto"


# -- logit_bias (the sampler itself: tests/test_logit_bias_real.py) ---------------------------

async def test_logit_bias_reaches_the_engine(fake_client: Any) -> None:
    async with fake_client() as client:
        await client.post("/v1/chat/completions", json={
            **CHAT, "logit_bias": {"65": -100, "66": 2.5}})
        await client.post("/v1/completions", json={"prompt": "x", "logit_bias": {"7": 100}})
        params = client.engines[0].params
    assert params[0].logit_bias == ((65, -100.0), (66, 2.5))
    assert params[1].logit_bias == ((7, 100.0),)


@pytest.mark.parametrize("bias", [
    {"abc": 1}, {"-1": 1}, {"1.5": 1}, {"1": 101}, {"1": -100.5}, {"1": "x"}, {"1": True},
    {str(0x110000): 1},  # the fake vocabulary is every code point
])
async def test_logit_bias_400(fake_client: Any, bias: dict[str, Any]) -> None:
    async with fake_client() as client:
        chat = await client.post("/v1/chat/completions", json={**CHAT, "logit_bias": bias})
        text = await client.post("/v1/completions", json={"prompt": "x", "logit_bias": bias})
    for resp in (chat, text):
        assert assert_error(resp, 400)["param"].startswith("logit_bias")


async def test_logit_bias_not_finite_400(fake_client: Any) -> None:
    async with fake_client() as client:
        resp = await client.post(
            "/v1/completions", content='{"prompt": "x", "logit_bias": {"1": NaN}}',
            headers={"content-type": "application/json"})
    assert assert_error(resp, 400)["param"].startswith("logit_bias")


async def test_answer_grammar_closes_opened_thinking(fake_client: Any) -> None:
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    as_json = {**CHAT, **thinking, "response_format": {"type": "json_object"}}
    async with fake_client(script=['{"a": ', "1}"], chat_template=THINKING_TEMPLATE) as client:
        constrained = await client.post("/v1/chat/completions", json=as_json)
        shown = await client.post("/apply-template", json=as_json)
        raw = await client.post("/v1/chat/completions", json={
            **CHAT, **thinking, "grammar": 'root ::= "{" [^}]* "}"'})
        prompts = client.engines[0].prompts
    # the grammar constrains the answer: the thinking the template opened is closed first
    assert prompts[0].endswith("<think>\n</think>\n\n")
    assert shown.json()["prompt"] == prompts[0]
    assert constrained.json()["choices"][0]["message"] == {"role": "assistant",
                                                           "content": '{"a": 1}'}
    # a raw grammar is the client's: it applies from inside the opened thinking
    assert prompts[1].endswith("<think>\n")
    assert raw.json()["choices"][0]["message"]["reasoning_content"] == '{"a": 1}'


async def test_reasoning_reaches_responses_and_messages(fake_client: Any) -> None:
    """The same thinking reply as a Responses `reasoning` item and a Messages `thinking`
    block, in JSON and in their streams."""
    ask = {"model": "alpha.gguf", "input": "hi"}
    msg = {"model": "alpha.gguf", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    async with fake_client(FAST, script=THINK_SCRIPT) as client:
        resp = (await client.post("/v1/responses", json=ask)).json()
        resp_stream = await client.post("/v1/responses", json={**ask, "stream": True})
        message = (await client.post("/v1/messages", json=msg)).json()
        msg_stream = await client.post("/v1/messages", json={**msg, "stream": True})
    kinds = [item["type"] for item in resp["output"]]
    assert kinds == ["reasoning", "message"]
    assert resp["output"][0]["content"][0]["text"] == "The user says hi."
    assert resp["output"][1]["content"][0]["text"] == "Hello!"
    assert resp["usage"]["output_tokens_details"]["reasoning_tokens"] == 8
    assert '"response.reasoning_text.delta"' in resp_stream.text
    assert [b["type"] for b in message["content"]] == ["thinking", "text"]
    assert message["content"][0]["thinking"] == "The user says hi."
    assert message["content"][1]["text"] == "Hello!"
    events = [json.loads(line[6:]) for line in msg_stream.text.splitlines()
              if line.startswith("data: ")]
    thinking = "".join(e["delta"]["thinking"] for e in events
                       if e["type"] == "content_block_delta"
                       and e["delta"]["type"] == "thinking_delta")
    assert thinking == "The user says hi."
