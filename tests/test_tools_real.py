"""Tool calling and constrained output end to end: `python server.py` on the real GGUFs, the
openai SDK as the client, and the grammars/parsers on real model output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest

from tests.conftest import GEMMA, SMOL, ServerProcess, require_model

pytestmark = pytest.mark.real_model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
TOOLS: Any = [WEATHER, ADD]
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
ONE: dict[str, Any] = {"temperature": 0, "max_tokens": 60, "parallel_tool_calls": False}


def check_args(name: str, arguments: str) -> dict[str, Any]:
    """The arguments are JSON matching the schema of the named tool in TOOLS."""
    args = json.loads(arguments)
    if name == "get_weather":
        assert isinstance(args["city"], str) and set(args) <= {"city", "unit"}
        assert args.get("unit", "celsius") in ("celsius", "fahrenheit")
    else:
        assert name == "add"
        assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    return dict(args)


def check_call(call: Any, name: str | None = None) -> dict[str, Any]:
    """An SDK tool call to one of TOOLS (to `name` if given) with valid arguments."""
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == (name or call.function.name)
    return check_args(call.function.name, call.function.arguments)


def stream_calls(client: openai.OpenAI, **kw: Any) -> tuple[str, list[tuple[str, str]], str]:
    """(content, [(name, arguments)], finish_reason) from raw stream chunks."""
    content, calls, reason = "", {}, ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            if tc.id is not None:
                assert tc.index not in calls and tc.function and tc.function.name
                calls[tc.index] = [tc.function.name, tc.function.arguments or ""]
            else:
                assert tc.function and tc.function.name is None and tc.type is None
                calls[tc.index][1] += tc.function.arguments or ""
        reason = choice.finish_reason or reason
    return content, [(n, a) for n, a in calls.values()], reason


def test_required_stream_and_non_stream(client: openai.OpenAI) -> None:
    kw = {"model": SMOL, "messages": ASK, "tools": TOOLS, "tool_choice": "required", **ONE}
    reply = client.chat.completions.create(**kw)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    check_call(call)
    content, calls, reason = stream_calls(client, **kw)
    assert (content, reason) == ("", "tool_calls")
    # NOTE: the second request reuses the first one's prompt KV; on SmolLM2 (Q4_1) that can
    # flip a later near-tie (README, "Batched output vs solo output"), so compare the call.
    [(name, arguments)] = calls
    assert name == call.function.name
    check_args(name, arguments)


def test_required_without_parallel_flag_is_one_call(client: openai.OpenAI) -> None:
    # SmolLM2 used to repeat get_weather({"city": "Paris"}) until max_tokens ("length").
    kw: Any = {"model": SMOL, "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
               "temperature": 0, "max_tokens": 200}
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert check_call(call, "get_weather")["city"] == "Paris"
    content, calls, reason = stream_calls(client, **kw)
    assert (content, reason, len(calls)) == ("", "tool_calls", 1)
    # parallel calls allowed: a repeat of an identical call still ends the output
    choice = client.chat.completions.create(**kw, parallel_tool_calls=True).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls or []) == 1


def test_parallel_tool_calls_true_allows_distinct_calls(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris and in Rome? "
                                       "Call get_weather once per city."}]
    choice = client.chat.completions.create(
        model=SMOL, messages=ask, tools=[WEATHER], tool_choice="required",  # type: ignore[arg-type]
        parallel_tool_calls=True, temperature=0, max_tokens=200,
    ).choices[0]
    assert choice.finish_reason == "tool_calls"
    cities = [check_call(c, "get_weather")["city"] for c in choice.message.tool_calls or []]
    assert cities == ["Paris", "Rome"]


def test_named_function_with_stream_helper(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "add"}}
    messages: Any = [{"role": "user", "content": "What is 2 plus 3?"}]
    with client.chat.completions.stream(
        model=SMOL, messages=messages, tools=TOOLS, tool_choice=choice, **ONE
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    [call] = final.choices[0].message.tool_calls or []
    check_call(call, "add")


def test_none_and_auto(client: openai.OpenAI) -> None:
    none = client.chat.completions.create(
        model=SMOL, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=30
    )
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content
    kw = {"model": SMOL, "messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": 60}
    auto = client.chat.completions.create(**kw).choices[0]
    for call in auto.message.tool_calls or []:
        check_call(call)
    assert "<tool_call>" not in (auto.message.content or "")
    content, calls, reason = stream_calls(client, **kw)
    assert content == (auto.message.content or "")
    assert [n for n, _ in calls] == [c.function.name for c in auto.message.tool_calls or []]
    assert reason == auto.finish_reason


def test_tool_result_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=SMOL, messages=ASK, tools=TOOLS, tool_choice="required", **ONE
    ).choices[0].message
    call = (first.tool_calls or [])[0]
    history: Any = [*ASK, first.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    answer = client.chat.completions.create(
        model=SMOL, messages=history, tools=TOOLS, temperature=0, max_tokens=30
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage is not None and answer.usage.prompt_tokens > 100


class Cat(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int
    color: str = pydantic.Field(json_schema_extra={"enum": ["black", "white", "orange"]})


def test_json_schema_and_json_object(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Describe a cat."}]
    parsed = client.chat.completions.parse(
        model=SMOL, messages=messages, response_format=Cat, temperature=0, max_tokens=80
    )
    cat = parsed.choices[0].message.parsed
    assert isinstance(cat, Cat) and cat.color in ("black", "white", "orange")
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=SMOL, messages=messages, temperature=0, max_tokens=80, stream=True,
            response_format={"type": "json_schema", "json_schema": {
                "name": "Cat", "schema": Cat.model_json_schema()}})
    )
    assert Cat.model_validate_json(streamed)
    obj = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Give me a JSON object with a key."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=60,
    ).choices[0]
    text = obj.message.content or ""
    assert text.startswith("{")
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_raw_grammar_and_bad_grammars(client: openai.OpenAI, smol_server: ServerProcess) -> None:
    yes_no = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Is the sky blue?"}], temperature=0,
        max_tokens=5, extra_body={"grammar": 'root ::= "yes" | "no"'},
    )
    assert yes_no.choices[0].message.content in ("yes", "no")
    text = client.completions.create(
        model=SMOL, prompt="Count: 1, 2,", temperature=0, max_tokens=8,
        extra_body={"grammar": 'root ::= " " [0-9]+ ("," " " [0-9]+)*'},
    )
    assert all(p.strip().isdigit() for p in text.choices[0].text.split(","))
    # NOTE: `"\\x00"` aborted llama.cpp's grammar engine; llguidance runs it (a byte-level
    # vocabulary has a token for NUL)
    nul = client.chat.completions.create(model=SMOL, messages=ASK, max_tokens=3,
                                         extra_body={"grammar": 'root ::= "\\x00"'})
    assert nul.choices[0].finish_reason in ("stop", "length")
    crashers = ['root ::= "a"{5,3}', "root ::= " + "(" * 3000 + '"a"' + ")" * 3000,
                'root ::= "unterminated', "root ::= undefined-rule"]
    for grammar in crashers:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(
                    model=SMOL, messages=ASK, max_tokens=5, stream=stream,
                    extra_body={"grammar": grammar},
                )
            assert info.value.code == "invalid_grammar"
    assert httpx.get(f"{smol_server.base_url}/health").status_code == 200


def test_bad_tool_input_keeps_serving(client: openai.OpenAI) -> None:
    bad: list[dict[str, Any]] = [
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "wat"}}}}}]},
        {"tools": [{"type": "function"}]},
        {"messages": [{"role": "tool", "content": "1", "tool_call_id": "x"}]},
        {"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "array", "minItems": 5, "maxItems": 1}}}},
    ]
    for extra in bad:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**{"model": SMOL, "messages": ASK, **extra})
    ok = client.chat.completions.create(model=SMOL, messages=ASK, max_tokens=3)
    assert ok.choices[0].message.content is not None


def test_apply_template_counts_the_prompt(
    client: openai.OpenAI, smol_server: ServerProcess
) -> None:
    body = {"model": SMOL, "messages": ASK, "tools": TOOLS}
    applied = httpx.post(f"{smol_server.base_url}/apply-template", json=body, timeout=30).json()
    usage = client.chat.completions.create(**body, max_tokens=1).usage
    assert usage is not None and applied["tokens"] == usage.prompt_tokens
    assert applied["prompt"].startswith("<|im_start|>system\n# Tools")
    assert applied["template"].endswith("chatml.jinja")


def test_gemma_tools_and_json(client: openai.OpenAI, smol_server: ServerProcess) -> None:
    require_model(GEMMA)
    try:
        with client.chat.completions.stream(
            model=GEMMA, messages=ASK, tools=TOOLS, **ONE,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        ) as stream:
            final = stream.get_final_completion()
        assert final.model == GEMMA
        [call] = final.choices[0].message.tool_calls or []
        check_call(call, "get_weather")
        parsed = client.chat.completions.parse(
            model=GEMMA, messages=[{"role": "user", "content": "Describe a cat."}],
            response_format=Cat, temperature=0, max_tokens=60,
        )
        assert isinstance(parsed.choices[0].message.parsed, Cat)
        applied = httpx.post(f"{smol_server.base_url}/apply-template", timeout=30,
                             json={"model": GEMMA, "messages": ASK, "tools": TOOLS}).json()
        assert applied["prompt"].startswith("<bos><start_of_turn>user\nYou can call functions.")
        assert applied["tool_call_format"] == "hermes"
    finally:
        httpx.post(f"{smol_server.base_url}/setModel", json={"modelName": SMOL}, timeout=60)


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral", "json"])
def test_grammar_and_parser_agree_on_real_output(family: str) -> None:
    """Each family's forced-call grammar, run on SmolLM2, parses back into valid calls."""
    from llmserve.chat import constraints
    from llmserve.chat.tools import ToolCallDelta, make_parser
    from llmserve.config import Settings
    from llmserve.engine.base import SamplingParams
    from llmserve.engine.llama import LlamaEngine

    specs = [constraints.ToolSpec(t["function"]["name"], constraints.schema_expr(
        t["function"]["parameters"], "tools")) for t in TOOLS]
    grammar = constraints.grammar(*constraints.tool_calls(family, specs, parallel=False))
    engine = LlamaEngine.load(require_model(SMOL), Settings(n_ctx=512, n_threads=2))
    try:
        prompt = engine.tokenize(
            "<|im_start|>user\nWhat is the weather in Oslo?<|im_end|>\n<|im_start|>assistant\n",
            add_special=False, parse_special=True)
        tokens = engine.generate(prompt, SamplingParams(temperature=0, grammar=grammar))
        pieces = [piece.decode() for _, (_tok, piece) in zip(range(80), tokens, strict=False)]
    finally:
        engine.close()
    parser = make_parser(family)
    out = [p for piece in pieces for p in parser.feed(piece)] + parser.finish()
    assert [p for p in out if isinstance(p, str)] == []
    deltas = [p for p in out if isinstance(p, ToolCallDelta)]
    assert deltas[0].name is not None and {d.index for d in deltas} == {0}
    check_args(deltas[0].name, "".join(d.arguments for d in deltas))


def test_malicious_gguf_template_fails_the_request_only(tmp_path: Path) -> None:
    """A GGUF whose template tries to run code: the request fails, nothing runs, serving goes on."""
    src = require_model(SMOL)
    data = bytearray(src.read_bytes())
    old = b"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    start = data.index(old)
    length = int.from_bytes(data[start - 8 : start], "little")  # GGUF strings: u64 length
    marker = tmp_path / "pwned"
    code = f"cycler.__init__.__globals__.os.popen('touch {marker}').read()"
    evil = ("{{ " + code + " }}").encode()
    assert len(evil) <= length
    data[start : start + length] = evil.ljust(length)
    models = tmp_path / "models"
    models.mkdir()
    (models / "evil.gguf").write_bytes(bytes(data))
    # NOTE: a symlink out of the models dir needs --allow_symlinks (README, "Models directory")
    (models / SMOL).symlink_to(src)
    server = ServerProcess(tmp_path / "server.log", "--models_dir", str(models),
                           "--model_name", "evil.gguf", "--n_ctx", "512", "--allow_symlinks")
    try:
        server.wait_ready()
        for stream in (False, True):
            resp = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60, json={
                "messages": ASK, "max_tokens": 5, "stream": stream})
            assert resp.status_code == 500
            assert resp.json()["error"]["code"] == "template_error"
        assert not marker.exists()
        text = httpx.post(f"{server.base_url}/v1/completions", timeout=60,
                          json={"prompt": "Hello", "max_tokens": 3})
        assert text.status_code == 200
        chat = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60,
                          json={"model": SMOL, "messages": ASK, "max_tokens": 3})
        assert chat.status_code == 200
        assert server.proc.poll() is None
    finally:
        server.stop()
