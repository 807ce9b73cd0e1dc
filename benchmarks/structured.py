"""What structured output costs on llguidance (issue 21), in one run on both test models:

1. decode tokens/s free vs constrained (a JSON schema whose list never closes, so both runs
   produce the same number of tokens; and tool_choice auto's lazy grammar on free text),
   rounds alternating, medians and their ratio;
2. 250 tools with tool_choice required: request build time (plan_chat, every schema checked),
   grammar compile time, and time to first token of the first and the second (cached: prompt
   KV and compiled grammar) request;
3. grammar compile time per request for a few common shapes.

Usage: python benchmarks/structured.py [--models FILE ...] [--tokens 96] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from llmserve.chat.plan import plan_chat, render_chat
from llmserve.config import Settings
from llmserve.engine.base import SamplingParams
from llmserve.engine.llama import LlamaEngine
from llmserve.schemas import ChatCompletionRequest

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}},
          "required": ["items"]}
PROMPT = "List as many fruits as you can, as JSON."
N_TOOLS = 250


def tokens_per_s(engine: LlamaEngine, prompt: list[int], params: SamplingParams, n: int) -> float:
    first = last = 0.0
    produced = 0
    for i, _ in enumerate(engine.generate(prompt, params)):
        now = time.perf_counter()
        first = now if i == 0 else first
        last = now
        produced = i + 1
        if produced >= n:
            break
    return (produced - 1) / (last - first)


def request(body: dict[str, Any]) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", **body})


def tools(n: int) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Task {i}.",
        "parameters": {"type": "object", "properties": {
            "target": {"type": "string"}, "mode": {"enum": ["fast", "safe"]}},
            "required": ["target"]}}} for i in range(n)]


def first_token(engine: LlamaEngine, body: dict[str, Any]) -> tuple[float, float, float]:
    """(build s, compile s, time to first token s) of one chat request, in-process."""
    t0 = time.perf_counter()
    plan = plan_chat(request(body))
    rendered = render_chat(engine.info, plan, ROOT / "templates", None)
    grammar = plan.grammar(rendered.family)
    prompt = engine.tokenize(rendered.text, add_special=False, parse_special=True)
    built = time.perf_counter() - t0
    gen = engine.generate(prompt, SamplingParams(temperature=0, grammar=grammar))
    next(gen)
    ttft = time.perf_counter() - t0
    compile_s = engine.grammar_compile_s
    gen.close()
    return built, compile_s, ttft


def speed(engine: LlamaEngine, name: str, n: int, rounds: int) -> None:
    prompt = engine.tokenize(PROMPT, add_special=True, parse_special=False)
    schema = plan_chat(request({"messages": [{"role": "user", "content": PROMPT}],
                                "response_format": {"type": "json_schema", "json_schema": {
                                    "name": "fruits", "schema": SCHEMA}}})).grammar("hermes")
    lazy = plan_chat(request({"messages": [{"role": "user", "content": PROMPT}],
                              "tools": tools(8)})).grammar("hermes")
    free: list[float] = []
    constrained: list[float] = []
    lazy_free: list[float] = []
    for _ in range(rounds):
        free.append(tokens_per_s(
            engine, prompt, SamplingParams(temperature=0, ignore_eos=True), n))
        constrained.append(tokens_per_s(
            engine, prompt, SamplingParams(temperature=0, grammar=schema), n))
        lazy_free.append(tokens_per_s(
            engine, prompt, SamplingParams(temperature=0, ignore_eos=True, grammar=lazy), n))
    f, c, lz = (statistics.median(x) for x in (free, constrained, lazy_free))
    print(f"{name}: free {f:.1f} tok/s, json_schema {c:.1f} tok/s (ratio {c / f:.2f}), "
          f"auto-tools lazy grammar {lz:.1f} tok/s (ratio {lz / f:.2f})")


def many_tools(engine: LlamaEngine, name: str) -> None:
    body = {"messages": [{"role": "user", "content": "Run task 7 on prod."}],
            "tools": tools(N_TOOLS), "tool_choice": "required"}
    for label in ("first", "second (cached)"):
        built, compiled, ttft = first_token(engine, body)
        print(f"{name}: {N_TOOLS} tools, tool_choice required, {label} request: build "
              f"{built * 1000:.0f} ms, grammar compile {compiled * 1000:.0f} ms, "
              f"time to first token {ttft:.2f} s")


def compile_times(engine: LlamaEngine, name: str) -> None:
    ask = [{"role": "user", "content": "Hi"}]
    shapes = {
        "json_object": {"messages": ask, "response_format": {"type": "json_object"}},
        "json_schema": {"messages": ask, "response_format": {"type": "json_schema",
                                                             "json_schema": {"name": "s",
                                                                             "schema": SCHEMA}}},
        "8 tools auto (lazy)": {"messages": ask, "tools": tools(8)},
        "8 tools required": {"messages": ask, "tools": tools(8), "tool_choice": "required"},
        "GBNF": {"messages": ask, "grammar": 'root ::= ("yes" | "no") [.!]?'},
    }
    parts = []
    for label, body in shapes.items():
        plan = plan_chat(request(body))
        grammar = plan.grammar("hermes")
        assert grammar is not None
        t0 = time.perf_counter()
        engine._grammar(grammar + f"\n// {time.time()}\n").close()  # NOTE: never cached
        parts.append(f"{label} {(time.perf_counter() - t0) * 1000:.1f} ms")
    print(f"{name}: grammar compile per request: " + ", ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+",
                        default=["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n_threads", type=int, default=2)
    args = parser.parse_args()
    for name in args.models:
        engine = LlamaEngine.load(ROOT / "models" / name,
                                  Settings(n_ctx=32768, n_threads=args.n_threads,
                                           parallel=1))
        try:
            speed(engine, name, args.tokens, args.rounds)
            compile_times(engine, name)
            many_tools(engine, name)
        finally:
            engine.close()


if __name__ == "__main__":
    main()
