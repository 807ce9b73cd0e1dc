"""The Responses API end to end: `python server.py` on SmolLM2, the official openai SDK and the
OpenAI Agents SDK as clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import SMOL, ServerProcess, require_model, started_server

pytestmark = pytest.mark.real_model

WEATHER: Any = {
    "type": "function", "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False},
    "strict": True,
}
ASK = "What is the weather in Paris?"


def start(tmp: Path, name: str, cache_dir: Path) -> ServerProcess:
    require_model(SMOL)
    return started_server(tmp / f"{name}.log", "--model_name", SMOL, "--n_ctx", "2048",
                          "--n_threads", "2", "--cache_dir", str(cache_dir), "--no_announce")


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("responses")
    server = start(tmp, "server", tmp / "cache")
    try:
        yield server
    finally:
        server.stop()


def test_create_and_stream(server: ServerProcess) -> None:
    with sdk(server) as client:
        made = client.responses.create(model=SMOL, input="Name three colors.", temperature=0,
                                       max_output_tokens=200)
        assert made.status == "completed" and made.output_text.strip()
        assert made.usage is not None and made.usage.output_tokens > 0
        assert made.usage.input_tokens > 5
        deltas: list[str] = []
        kinds: list[str] = []
        with client.responses.stream(model=SMOL, input="Name three animals.", temperature=0,
                                     max_output_tokens=200) as stream:
            for event in stream:
                kinds.append(event.type)
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
            final = stream.get_final_response()
        assert final.output_text and "".join(deltas) == final.output_text
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[-1] == "response.completed"
        got = client.responses.retrieve(final.id)
        assert got.output_text == final.output_text


def test_function_call_round_trip(server: ServerProcess) -> None:
    with sdk(server) as client:
        first = client.responses.create(model=SMOL, input=ASK, tools=[WEATHER],
                                        tool_choice="required", temperature=0,
                                        max_output_tokens=60, parallel_tool_calls=False)
        [call] = [item for item in first.output if item.type == "function_call"]
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        assert isinstance(json.loads(call.arguments)["city"], str)
        answer = client.responses.create(
            model=SMOL, previous_response_id=first.id, tools=[WEATHER], temperature=0,
            max_output_tokens=40,
            input=[{"type": "function_call_output", "call_id": call.call_id,
                    "output": json.dumps({"temperature_c": 21, "sky": "sunny"})}],
        )
        assert answer.status in ("completed", "incomplete")
        assert answer.output and answer.usage is not None and first.usage is not None
        assert answer.usage.input_tokens > first.usage.input_tokens
        # the second turn's prompt starts with the first one's prompt and call
        assert answer.usage.input_tokens_details.cached_tokens > 0
        listed = client.responses.input_items.list(answer.id, order="asc")
        assert [i.type for i in listed.data] == ["message", "function_call", "function_call_output"]


def test_previous_response_id_across_restart(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first = start(tmp_path, "first", cache_dir)
    try:
        with sdk(first) as client:
            one = client.responses.create(
                model=SMOL, input="Tell me about the planet Mars in a few sentences.",
                instructions="You are a concise astronomy tutor.", temperature=0,
                max_output_tokens=60)
    finally:
        first.stop()
    assert one.output_text
    second = start(tmp_path, "second", cache_dir)
    try:
        with sdk(second) as client:
            stored = client.responses.retrieve(one.id)
            two = client.responses.create(
                model=SMOL, previous_response_id=one.id, input="And Venus?",
                instructions="You are a concise astronomy tutor.", temperature=0,
                max_output_tokens=30)
            items = client.responses.input_items.list(two.id, order="asc")
            client.responses.delete(one.id)
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(one.id)
    finally:
        second.stop()
    assert stored.output_text == one.output_text
    assert two.previous_response_id == one.id
    assert two.usage is not None and one.usage is not None
    assert two.usage.input_tokens > one.usage.input_tokens + one.usage.output_tokens
    # the KV of turn one (prompt + reply) came from the prefix cache on disk
    assert two.usage.input_tokens_details.cached_tokens >= 64
    assert [getattr(i, "role", None) for i in items.data] == ["user", "assistant", "user"]


def test_agents_sdk_runs_a_tool(server: ServerProcess) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        cities.append(city)
        return f"It is 21 degrees and sunny in {city}."

    async def run() -> Any:
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused",
                                    max_retries=0)
        agent = Agent(
            name="weather", instructions="Use the get_weather tool, then answer in one sentence.",
            tools=[get_weather], model=OpenAIResponsesModel(model=SMOL, openai_client=client),
            model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=200),
        )
        try:
            return await Runner.run(agent, ASK, max_turns=4)
        finally:
            await client.close()

    result = asyncio.run(run())
    assert cities and all(isinstance(c, str) and c for c in cities)
    outputs = [i for i in result.new_items if i.type == "tool_call_output_item"]
    assert outputs and "sunny" in str(outputs[0].output)
    assert isinstance(result.final_output, str)
