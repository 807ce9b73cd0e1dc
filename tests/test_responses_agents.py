"""What Codex CLI 0.171.0 sends, replayed on `python server.py` (SmolLM2) through the official
openai SDK: custom, namespace and hosted tools, developer messages, custom_tool_call items and
every other field of the captured bodies are accepted and streamed back as valid events. Also a
prompt past a small --n_ctx: a 400 in OpenAI's words (context_length_exceeded), JSON or
stream, on both APIs."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import AGENT_MODEL, SMOL, ServerProcess

pytestmark = pytest.mark.real_model

AGENTS = Path(__file__).parent / "fixtures" / "agents"
CODEX = ["codex_exec_1", "codex_exec_2", "codex_exec_json_1", "codex_exec_json_2"]


@pytest.fixture(scope="module")
def codex_server(agent_server: ServerProcess) -> ServerProcess:
    """The shared agent server (conftest): what another replay prefilled comes from its cache."""
    return agent_server


def codex_body(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((AGENTS / f"{name}.json").read_text())["body"]
    return {**body, "model": AGENT_MODEL, "max_output_tokens": 8}


@pytest.mark.parametrize("name", CODEX)
def test_codex_request_streams_back(codex_server: ServerProcess, name: str) -> None:
    body = codex_body(name)
    client = openai.OpenAI(base_url=f"{codex_server.base_url}/v1", api_key="unused",
                           max_retries=0, timeout=1800)
    known = set(inspect.signature(client.responses.create).parameters)
    extra = {k: v for k, v in body.items() if k not in known}
    assert "client_metadata" in body  # sent as is, whether the SDK knows it or not
    with client:
        stream = client.responses.create(
            **{k: v for k, v in body.items() if k in known}, extra_body=extra or None)
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response  # type: ignore[union-attr]
    assert final.model == AGENT_MODEL and final.usage is not None
    assert final.usage.input_tokens > 5000  # Codex's instructions and tool list
    assert 0 < final.usage.output_tokens <= 8
    assert [t.type for t in final.tools] == [t["type"] for t in body["tools"]]
    namespaced = {t["name"] for t in body["tools"][4]["tools"]} if name in CODEX[:2] else set()
    for item in final.output:
        if item.type == "function_call" and item.namespace is not None:
            assert item.namespace == "multi_agent_v1" and item.name in namespaced
        if item.type == "custom_tool_call":
            assert item.name == "apply_patch"
    for event in events:  # every item the stream carried is in the final response
        if event.type == "response.output_item.done":
            assert event.item.id in {i.id for i in final.output}


def test_overflow_is_openais_400(small_server: ServerProcess) -> None:
    long = "word " * 2000
    base = small_server.base_url
    chat = {"model": SMOL, "messages": [{"role": "user", "content": long}]}
    responses = {"model": SMOL, "input": long}
    got = [
        httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=120),
        httpx.post(f"{base}/v1/chat/completions", json={**chat, "stream": True}, timeout=120),
        httpx.post(f"{base}/v1/responses", json=responses, timeout=120),
        httpx.post(f"{base}/v1/responses", json={**responses, "stream": True}, timeout=120),
    ]
    for resp in got:
        assert resp.status_code == 400, resp.text
        assert resp.headers["content-type"].startswith("application/json")
        error = resp.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert error["type"] == "invalid_request_error"
        assert error["n_ctx"] == 512 and error["n_prompt_tokens"] > 512
        assert error["message"].startswith("This model's maximum context length is 512 tokens.")
    assert got[0].json()["error"]["param"] == "messages"
    assert got[2].json()["error"]["param"] == "input"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    with client, pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=SMOL, input=long, stream=True)
    assert info.value.code == "context_length_exceeded"
