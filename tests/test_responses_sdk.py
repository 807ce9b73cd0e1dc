"""The openai SDK and the OpenAI Agents SDK against the in-process app (fake engine): every
object and stream event they parse, the SDK's stream helper, an agent's tool loop."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.test_responses_http import WEATHER
from tests.test_tools_http import CALL_SCRIPT

pytestmark = pytest.mark.anyio

FAST = {"stream_interval_ms": 0}


def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    """An AsyncOpenAI that talks to the app in-process."""
    http = httpx.AsyncClient(transport=client._transport, base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", max_retries=0,
                              http_client=http)


async def test_sdk_create_stream_retrieve(fake_client: Any) -> None:
    async with fake_client(FAST) as client:
        api = sdk(client)
        made = await api.responses.create(model="alpha", input="hi")
        async with api.responses.stream(model="alpha", input="hi") as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
        got = await api.responses.retrieve(final.id)
        items = await api.responses.input_items.list(final.id)
        await api.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            await api.responses.retrieve(made.id)
        await api.close()
    assert made.output_text == "Hello, world!" == final.output_text == "".join(deltas)
    assert got.id == final.id and got.output_text == final.output_text
    assert [i.type for i in items.data] == ["message"]


async def test_sdk_stream_helper_assembles_calls(fake_client: Any) -> None:
    async with fake_client(FAST, script=CALL_SCRIPT) as client:
        api = sdk(client)
        async with api.responses.stream(model="alpha", input="Weather?",
                                        tools=[WEATHER]) as stream:
            final = await stream.get_final_response()
        await api.close()
    calls = [i for i in final.output if i.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}


async def test_sdk_errors_are_api_errors(fake_client: Any) -> None:
    async with fake_client() as client:
        api = sdk(client)
        with pytest.raises(openai.BadRequestError) as info:
            await api.responses.create(model="alpha", input="x",
                                       tools=[{"type": "retrieval"}])  # type: ignore[list-item]
        await api.close()
    assert info.value.status_code == 400 and "retrieval" in info.value.message


@pytest.mark.parametrize("streamed", [False, True])
async def test_agents_sdk_tool_loop(fake_client: Any, streamed: bool) -> None:
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    async with fake_client(FAST, script=CALL_SCRIPT) as client:
        engine = client.engines[0]
        cities: list[str] = []

        @function_tool
        def get_weather(city: str) -> str:
            """Get the current weather in a city."""
            cities.append(city)
            engine.script = ["It is sunny in Paris."]  # the model's next turn answers
            return "sunny, 21 C"

        api = sdk(client)
        agent = Agent(name="weather", instructions="Use tools.", tools=[get_weather],
                      model=OpenAIResponsesModel(model="alpha", openai_client=api))
        if streamed:
            run = Runner.run_streamed(agent, "Weather in Paris?", max_turns=3)
            kinds = [event.type async for event in run.stream_events()]
            result: Any = run
            assert "raw_response_event" in kinds
        else:
            result = await Runner.run(agent, "Weather in Paris?", max_turns=3)
        prompts = engine.prompts
        await api.close()
    assert cities == ["Paris"]
    assert result.final_output == "It is sunny in Paris."
    assert len(prompts) == 2 and "sunny, 21 C" in prompts[1]
    assert prompts[1].startswith(prompts[0])  # the agent's second turn extends the first
