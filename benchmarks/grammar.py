"""What grammar-constrained decoding costs: tokens/s with a JSON-schema grammar vs without.

Runs LlamaEngine in-process on each model, alternating constrained and free rounds, and prints
the medians and their ratio. The grammar (an object holding an unbounded list of strings) never
completes within the token budget, so both runs produce the same number of tokens. Usage:
    python benchmarks/grammar.py [--models FILE ...] [--tokens 96] [--rounds 3] [--n_threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from llmserve.chat.grammar import assemble, schema_fragment
from llmserve.config import Settings
from llmserve.engine.base import SamplingParams
from llmserve.engine.llama import LlamaEngine

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}},
          "required": ["items"]}
PROMPT = "List as many fruits as you can, as JSON."


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+",
                        default=["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n_threads", type=int, default=2)
    args = parser.parse_args()
    frag = schema_fragment(SCHEMA, "b-", "benchmark")
    grammar = assemble(frag.root, frag)
    for name in args.models:
        engine = LlamaEngine.load(ROOT / "models" / name,
                                  Settings(n_ctx=1024, n_threads=args.n_threads))
        prompt = engine.tokenize(PROMPT, add_special=True, parse_special=False)
        free, constrained = [], []
        for _ in range(args.rounds):
            free.append(tokens_per_s(
                engine, prompt, SamplingParams(temperature=0, ignore_eos=True), args.tokens))
            constrained.append(tokens_per_s(
                engine, prompt, SamplingParams(temperature=0, grammar=grammar), args.tokens))
        engine.close()
        f, c = statistics.median(free), statistics.median(constrained)
        print(f"{name}: free {f:.1f} tok/s, grammar {c:.1f} tok/s, ratio {c / f:.2f}")


if __name__ == "__main__":
    main()
