"""Structured output on the real SmolLM2 GGUF: every strict reply to the 67 real-world schemas
of tests/fixtures/json_schemas.json validates with jsonschema (16 sequences per decode step;
replies cut at 64 tokens are left to benchmarks/structured.py, which runs them to the end);
tool_choice auto's lazy grammar leaves text free and holds a started call to the schemas;
a too ambiguous GBNF grammar is a 400."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from llmserve.config import Settings
from llmserve.engine.base import SamplingParams
from llmserve.scheduler import plan_step
from tests.conftest import SMOL, require_model

pytestmark = pytest.mark.real_model

CORPUS = json.loads((Path(__file__).parent / "fixtures" / "json_schemas.json").read_text())
MAX_TOKENS = 64
BATCH = 16


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    from llmserve.engine.llama import LlamaEngine

    engine = LlamaEngine.load(require_model(SMOL),
                              Settings(n_ctx=8192, n_threads=2, parallel=BATCH))
    try:
        yield engine
    finally:
        engine.close()


def _prompt(engine: Any, question: str) -> list[int]:
    text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return list(engine.tokenize(text, add_special=False, parse_special=True))


def _run(engine: Any, jobs: list[tuple[list[int], str | None]],
         limit: int = MAX_TOKENS) -> list[tuple[str, bool]]:
    """(text, ended before limit) for each (prompt, grammar), BATCH sequences per step."""
    results: list[tuple[str, bool]] = []
    for start in range(0, len(jobs), BATCH):
        seqs = [engine.open_seq(p, SamplingParams(temperature=0, grammar=g))
                for p, g in jobs[start:start + BATCH]]
        out: dict[int, list[bytes]] = {id(s): [] for s in seqs}
        ended: dict[int, bool] = {}
        live = list(seqs)
        while live:
            for seq, token in engine.execute(plan_step(live, 512)):
                if engine.is_eog(token) or len(out[id(seq)]) >= limit:
                    ended[id(seq)] = engine.is_eog(token)
                    live.remove(seq)
                    engine.close_seq(seq)
                else:
                    out[id(seq)].append(engine.token_bytes(token))
        results += [(b"".join(out[id(s)]).decode("utf-8", "replace"), ended[id(s)])
                    for s in seqs]
        engine.reset()
    return results


def _schema_grammar(schema: Any) -> str:
    from llmserve.chat.plan import plan_chat
    from llmserve.schemas import ChatCompletionRequest

    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "x", "strict": True, "schema": schema}}})
    grammar = plan_chat(req).grammar("hermes")
    assert grammar is not None
    return grammar


def test_strict_replies_validate_against_real_world_schemas(engine: Any) -> None:
    assert len(CORPUS) >= 50
    jobs = [(_prompt(engine, f"Give an example {c['name'].replace('_', ' ')} as JSON."),
             _schema_grammar(c["schema"])) for c in CORPUS]
    results = _run(engine, jobs)
    finished = 0
    for case, (text, ended) in zip(CORPUS, results, strict=True):
        if not ended:
            continue  # NOTE: cut at MAX_TOKENS: benchmarks/structured.py runs them to the end
        finished += 1
        jsonschema.validate(json.loads(text), case["schema"])
    assert finished >= len(CORPUS) // 3, f"only {finished} of {len(CORPUS)} finished"


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
           "required": ["city"]}


def test_lazy_tool_grammar_on_real_output(engine: Any) -> None:
    """tool_choice auto: without the trigger the reply is what it is without a grammar; once
    the trigger is written, the rest is a call matching the tool's schema."""
    from llmserve.chat import constraints as C

    specs = [C.ToolSpec("get_weather", C.schema_expr(WEATHER, "tools"))]
    lazy = C.lazy_tool_calls("hermes", specs, parallel=False)
    free = _prompt(engine, "Tell me a joke about cats.")
    plain = _run(engine, [(free, None), (free, lazy)], limit=24)
    assert plain[0][0] == plain[1][0] and "<tool_call>" not in plain[0][0]
    # the model "wrote" the trigger: it is in the prompt and consumed by the matcher
    opening = "Let me check. <tool_call>"
    asked = _prompt(engine, "What is the weather in Oslo?")
    opened = engine.tokenize(opening, add_special=False, parse_special=False)
    seq = engine.open_seq(asked + opened, SamplingParams(temperature=0, grammar=lazy))
    for token in opened:
        seq.handle._gate.accept(token)
    pieces: list[bytes] = []
    while len(pieces) < 60:
        [(_seq, token)] = engine.execute(plan_step([seq], 512))
        if engine.is_eog(token):
            break
        pieces.append(engine.token_bytes(token))
    engine.close_seq(seq)
    engine.reset()
    call = b"".join(pieces).decode()
    assert call.startswith("\n{\"name\": \"get_weather\", \"arguments\": ")
    assert call.endswith("}\n</tool_call>")
    body = json.loads(call.removeprefix("\n").removesuffix("\n</tool_call>"))
    jsonschema.validate(body["arguments"], WEATHER)


def test_too_ambiguous_grammar_is_a_400_and_bounded(engine: Any) -> None:
    """`"a" root?` 400 times: llama.cpp's grammar engine never produced a token (chat/gbnf.py
    refused it); llguidance's first mask takes seconds, so the engine refuses it (400), once:
    the verdict is kept. A milder one (12 alternatives) runs."""
    from llmserve.chat import constraints as C
    from llmserve.errors import InvalidRequestError

    grammar = C.gbnf("root ::= " + " | ".join(['"a" root?'] * 400))
    for attempt in range(2):
        with pytest.raises(InvalidRequestError) as info:
            engine.open_seq(_prompt(engine, "Say aaaa."), SamplingParams(grammar=grammar))
        assert info.value.code == "invalid_grammar" and "ambiguous" in info.value.message
        if attempt == 0:  # the verdict is kept: the second time compiles nothing
            assert grammar in engine._guide._refused
            engine._guide._compiled.clear()
            compile_s = engine._guide.compile_s
            engine._guide.compile_s = -1.0
    assert engine._guide.compile_s == -1.0 and compile_s > 0
    mild = C.gbnf("root ::= " + " | ".join(['"a" root?'] * 12))
    [(text, _)] = _run(engine, [(_prompt(engine, "Say aaaa."), mild)], limit=8)
    assert text and set(text) <= {"a"}
