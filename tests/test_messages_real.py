"""End-to-end: `python server.py` on SmolLM2, the official anthropic SDK as the client."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest

from tests.conftest import SMOL, ServerProcess

pytestmark = pytest.mark.real_model

# NOTE: the anthropic SDK 2.x has no temperature/top_p/top_k arguments; the server takes them.
GREEDY = {"temperature": 0}
ASK = [{"role": "user", "content": "Name three colors of the rainbow."}]
WEATHER = {"name": "get_weather", "description": "Get the current weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
SYSTEM = "You are a careful assistant for a weather service. " + " ".join(
    f"Rule {i}: answer questions about region {i} with the forecast of region {i}."
    for i in range(12)
)


@pytest.fixture
def client(smol_server: ServerProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=smol_server.base_url, api_key="unused",
                             max_retries=0) as sdk:
        yield sdk


def text_of(message: anthropic.types.Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def test_create_and_stream(client: anthropic.Anthropic) -> None:
    plain = client.messages.create(model=SMOL, max_tokens=32, messages=ASK,  # type: ignore[arg-type]
                                   extra_body=GREEDY)
    assert plain.id.startswith("msg_") and plain.model == SMOL
    assert text_of(plain)
    assert plain.stop_reason in ("end_turn", "max_tokens")
    assert plain.usage.output_tokens > 0
    with client.messages.stream(model=SMOL, max_tokens=32, messages=ASK,  # type: ignore[arg-type]
                                extra_body=GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text_of(final) == text_of(plain)
    assert final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens


def test_tool_use_round_trip(client: anthropic.Anthropic) -> None:
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.messages.create(
        model=SMOL, max_tokens=64, messages=question, tools=[WEATHER],  # type: ignore[arg-type, list-item]
        tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body=GREEDY,
    )
    assert first.stop_reason == "tool_use"
    calls = [b for b in first.content if b.type == "tool_use"]
    assert calls and calls[0].name == "get_weather"
    assert calls[0].id.startswith("toolu_") and isinstance(calls[0].input, dict)
    history = [*question, {"role": "assistant", "content": first.content},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": calls[0].id,
                    "content": "Sunny, 24 degrees Celsius."}]}]
    answer = client.messages.create(
        model=SMOL, max_tokens=48, messages=history, tools=[WEATHER],  # type: ignore[arg-type, list-item]
        tool_choice={"type": "none"}, extra_body=GREEDY,
    )
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert text_of(answer).strip()
    counted = client.messages.count_tokens(model=SMOL, messages=history, tools=[WEATHER],  # type: ignore[arg-type, list-item]
                                           tool_choice={"type": "none"})
    u = answer.usage
    total = u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
    assert counted.input_tokens == total


def test_same_system_prompt_reads_the_cache(client: anthropic.Anthropic) -> None:
    def ask(question: str) -> anthropic.types.Message:
        return client.messages.create(
            model=SMOL, max_tokens=8, extra_body=GREEDY,
            system=[{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": question}],
        )

    first = ask("What is the forecast for region 3?")
    second = ask("And for region 7?")
    assert (second.usage.cache_read_input_tokens or 0) > 0
    assert (second.usage.cache_read_input_tokens or 0) >= 64
    assert first.usage.cache_creation_input_tokens is not None
    counted = client.messages.count_tokens(
        model=SMOL, system=SYSTEM, messages=[{"role": "user", "content": "And for region 7?"}])
    u = second.usage
    assert counted.input_tokens == (u.input_tokens + (u.cache_read_input_tokens or 0)
                                    + (u.cache_creation_input_tokens or 0))


def test_errors_reach_the_sdk_typed(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="nope.gguf", max_tokens=8, messages=ASK)  # type: ignore[arg-type]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=SMOL, max_tokens=8, messages=ASK,  # type: ignore[arg-type]
                               extra_body={"temperature": 1.5})
    assert "temperature" in bad.value.message
