"""Reasoning end to end on the real SmolLM2: `python server.py` with a chat template that opens
`<think>` when the request enables thinking, GBNF grammars that force the markup (no small
reasoning GGUF exists), the openai SDK as the client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import SMOL, ServerProcess, require_model

pytestmark = pytest.mark.real_model

THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking | default(false) %}<think>\n{% endif %}{% endif %}"
)
ASK: Any = [{"role": "user", "content": "What colour is the sky?"}]
# The prompt opened <think>: the reply starts inside the thinking.
OPENED = 'root ::= [a-z ]{4,30} "</think>" [A-Za-z ]{2,30}'
WHOLE = 'root ::= "<think>" [a-z ]{4,30} "</think>" [A-Za-z ]{2,30}'
CALL = ('root ::= "<think>" [a-z ]{4,40} "</think>\\n<tool_call>\\n{\\"name\\": '
        '\\"get_weather\\", \\"arguments\\": {\\"city\\": \\"" [A-Z] [a-z]{1,12} '
        '"\\"}}\\n</tool_call>"')
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    require_model(SMOL)
    folder = tmp_path_factory.mktemp("reasoning")
    template = folder / "think.jinja"
    template.write_text(THINK_TEMPLATE, encoding="utf-8")
    server = ServerProcess(folder / "server.log", "--model_name", SMOL, "--n_ctx", "2048",
                           "--n_threads", "2", "--chat_template", str(template), "--no_announce")
    try:
        server.wait_ready()
        with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused",
                           max_retries=0) as sdk:
            yield sdk
    finally:
        server.stop()


def ask(client: openai.OpenAI, **kw: Any) -> tuple[Any, str, str, list[Any]]:
    """(non-stream choice, streamed reasoning, streamed content, streamed tool-call deltas)."""
    args: dict[str, Any] = {"model": SMOL, "messages": ASK, "temperature": 0, "max_tokens": 60,
                            **kw}
    choice = client.chat.completions.create(**args).choices[0]
    reasoning, content, calls = "", "", []
    for chunk in client.chat.completions.create(stream=True, **args):
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
            calls += delta.tool_calls or []
    return choice, reasoning, content, calls


def reasoning_of(message: Any) -> str | None:
    return getattr(message, "reasoning_content", None)


def test_template_opens_thinking(client: openai.OpenAI) -> None:
    choice, reasoning, content, _ = ask(client, extra_body={
        "grammar": OPENED, "chat_template_kwargs": {"enable_thinking": True}})
    message = choice.message
    thought = reasoning_of(message)
    assert thought and set(thought) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert message.content and "think>" not in message.content
    assert (reasoning, content) == (thought, message.content)


def test_think_tags_in_the_output(client: openai.OpenAI) -> None:
    choice, reasoning, content, _ = ask(client, extra_body={"grammar": WHOLE})
    thought = reasoning_of(choice.message)
    assert thought and "<" not in thought and ">" not in thought
    assert choice.message.content and "<" not in choice.message.content
    assert (reasoning, content) == (thought, choice.message.content)
    raw, *_ = ask(client, extra_body={"grammar": WHOLE, "reasoning_format": "none"})
    assert reasoning_of(raw.message) is None
    assert raw.message.content.startswith(f"<think>{thought}")
    assert raw.message.content.endswith(choice.message.content)


def test_tool_call_after_thinking(client: openai.OpenAI) -> None:
    choice, reasoning, content, calls = ask(
        client, tools=[WEATHER], extra_body={"grammar": CALL})
    assert choice.finish_reason == "tool_calls"
    assert reasoning_of(choice.message) and reasoning == reasoning_of(choice.message)
    assert not choice.message.content and not content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    city = json.loads(call.function.arguments)["city"]
    assert city[0].isupper()
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"city": city}


def test_usage_counts_reasoning_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SMOL, messages=ASK, temperature=0, max_tokens=60,
        extra_body={"grammar": WHOLE})
    usage = reply.usage
    assert usage is not None and usage.completion_tokens_details is not None
    reasoning_tokens = usage.completion_tokens_details.reasoning_tokens
    assert reasoning_tokens is not None and 0 < reasoning_tokens < usage.completion_tokens


def test_response_format_after_opened_thinking(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SMOL, messages=ASK, temperature=0, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "sky", "schema": {
            "type": "object", "properties": {"colour": {"type": "string", "maxLength": 20}},
            "required": ["colour"]}}},
        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    message = reply.choices[0].message
    assert reasoning_of(message) is None  # the prompt closed the thinking it opened
    assert set(json.loads(message.content or "")) == {"colour"}
