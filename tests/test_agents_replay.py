"""What Claude Code and Codex CLI really send, replayed against `python server.py`.

The requests in tests/fixtures/agents/ were captured from the pinned CLIs through
tests/fixtures/agents/record.py (scrubbed). Each is replayed with its own path, query and
headers; only `model` is replaced and the output limit lowered (a base model may ramble to its
limit). The answers are parsed by the official SDKs' own stream and response types, and the
prefix cache is checked the way an agent uses it: the follow-up turn, a new session with the
same system prompt and tools, and a billing header whose per-request nonce changes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anthropic
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from tests.conftest import AGENT_MODEL, ServerProcess

# NOTE: tests/test_messages_agents.py replays each Claude Code turn pair and checks the Messages
# specifics, tests/test_responses_agents.py each Codex request's stream; this file adds what
# spans turns and sessions, on the same shared agent_server (Gemma 3, defaults only).

pytestmark = pytest.mark.real_model

FIXTURES = Path(__file__).parent / "fixtures" / "agents"
CODEX = ("codex_exec", "codex_exec_json")
MAX_OUT = 8


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _split(rec: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, str]]:
    url = urlsplit(rec["path"])
    headers = {k: v for k, v in rec["headers"].items()
               if k not in ("content-type", "accept", "authorization", "x-api-key")}
    return url.path, dict(parse_qsl(url.query)), headers


def claude(server: ServerProcess, rec: dict[str, Any], model: str) -> Any:
    """One captured Messages request through the anthropic SDK's beta client (the one that
    speaks Claude Code's betas); the final Message, accumulated by the SDK from the stream."""
    _, query, headers = _split(rec)
    body = {**copy.deepcopy(rec["body"]), "model": model, "max_tokens": MAX_OUT}
    stream = body.pop("stream", False)
    # NOTE: this SDK's beta client sends no `?beta=true` itself; Claude Code does.
    args = {**body, "betas": headers.pop("anthropic-beta").split(","),
            "extra_headers": headers, "extra_query": query}
    with anthropic.Anthropic(base_url=server.base_url, api_key="dummy", max_retries=0,
                             timeout=1800) as sdk:
        if not stream:
            return sdk.beta.messages.create(**args)
        with sdk.beta.messages.stream(**args) as events:
            return events.get_final_message()


def codex(server: ServerProcess, rec: dict[str, Any], model: str) -> Response:
    """One captured Responses request through the openai SDK; the completed Response."""
    path, query, headers = _split(rec)
    body = {**copy.deepcopy(rec["body"]), "model": model, "max_output_tokens": MAX_OUT}
    options: Any = {"headers": headers, "params": query}
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="dummy", max_retries=0,
                       timeout=1800) as sdk:
        stream = sdk.post(path.removeprefix("/v1"), body=body, options=options,
                          cast_to=Response, stream=True,
                          stream_cls=openai.Stream[ResponseStreamEvent])
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created", kinds
    assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers)
    final = events[-1].response  # type: ignore[union-attr]
    assert isinstance(final, Response)
    return final


def prompt_of(message: Any) -> int:
    u = message.usage
    return u.input_tokens + (u.cache_read_input_tokens or 0) + (
        u.cache_creation_input_tokens or 0)


def test_claude_code_new_session_and_billing_nonce_read_the_cache(
    agent_server: ServerProcess,
) -> None:
    """A new session (same system prompt and tools, another session id) and a billing header
    with another per-request `cch=` nonce read at least 90% of their prompt from the cache."""
    claude(agent_server, fixture("claude_code_json_1"), AGENT_MODEL)
    rec = fixture("claude_code_stream_1")
    billing = rec["body"]["system"][0]
    assert billing["text"].startswith("x-anthropic-billing-header:")
    for nonce in ("1a2b3", "9f8e7"):
        billing["text"] = billing["text"].rstrip(";") + f"; cch={nonce};"
        message = claude(agent_server, rec, AGENT_MODEL)
        read = message.usage.cache_read_input_tokens or 0
        assert read >= 0.90 * prompt_of(message), (nonce, read, prompt_of(message))


def test_codex_requests_all_answered(agent_server: ServerProcess) -> None:
    """Every captured Codex request is a 200 stream the openai SDK parses, and the follow-up
    reads at least 95% of the first request's prompt from the cache."""
    for name in CODEX:
        first = codex(agent_server, fixture(f"{name}_1"), AGENT_MODEL)
        second = codex(agent_server, fixture(f"{name}_2"), AGENT_MODEL)
        assert first.usage is not None and second.usage is not None
        assert first.usage.input_tokens > 3000
        cached = second.usage.input_tokens_details.cached_tokens
        assert cached >= 0.95 * first.usage.input_tokens, (name, cached,
                                                           first.usage.input_tokens)
