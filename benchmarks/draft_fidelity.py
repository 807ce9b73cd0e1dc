"""How often speculative decoding changes greedy output, and why (issue 23).

For each model and prompt, decodes greedily on the engine (no server) once without drafts and
once with each draft source (prompt lookup; the request's prediction, taken from the prompt's
own code), drafts sized as the server sizes them. Prints whether the texts are identical, and
where they part, the undrafted run's gap between its two best log-probabilities at that token
(a near-tie: llama.cpp's arithmetic differs a little with the shape of the batch a position is
evaluated in) plus the speed of both runs.

    .venv/bin/python benchmarks/draft_fidelity.py [--models SmolLM2...gguf,gemma...gguf]
        [--tokens 160] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmserve.config import Settings
from llmserve.engine.base import SamplingParams, StepPlan
from llmserve.engine.llama import LlamaEngine
from llmserve.scheduler import StepCost, draft_wants, with_drafts

ROOT = Path(__file__).resolve().parent.parent
CODE = [
    '''def parse_config(path):
    """Read a config file of key=value lines."""
    config = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, value = line.split("=", 1)
            config[key.strip()] = value.strip()
    return config
''',
    '''class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()

    def __len__(self):
        return len(self.items)
''',
    '''def merge_sorted(a, b):
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out
''',
]
ASKS = ["Add type hints to this Python code. Reply with the full code only.",
        "Add a docstring to every function in this code. Reply with the full code only."]
FREE = ["Write a short story about a lighthouse keeper.",
        "Explain how a bicycle works, step by step."]


def _prompt(engine: LlamaEngine, user: str) -> list[int]:
    name = engine.info.name.lower()
    if "gemma" in name:
        text = f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"
    else:
        text = (f"<|im_start|>system\nYou are a helpful coding assistant.<|im_end|>\n"
                f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    return engine.tokenize(text, add_special=True, parse_special=True)


Logprobs = list[tuple[float, list[tuple[int, float]]]]


def _run(engine: LlamaEngine, prompt: list[int], params: SamplingParams, tokens: int,
         draft: bool, cost: StepCost) -> tuple[list[int], Logprobs, float, int]:
    seq = engine.open_seq(prompt, params)
    assert seq is not None
    seq.max_new = tokens
    logprobs: Logprobs = []
    first = 0.0
    steps = 0
    while len(seq.tokens) - seq.n_prompt < tokens:
        plan = StepPlan(((seq, min(seq.pending, engine.n_batch)),))
        if draft:
            wanted = draft_wants(plan, engine.n_batch, engine.info.n_ctx)
            if wanted:
                plan = with_drafts(plan, wanted, engine.propose(wanted), cost)
        before = engine.batch.decode_seconds
        out = engine.execute(plan)
        cost.observe_step(plan, engine.batch.last_batch_tokens,
                          engine.batch.decode_seconds - before)
        steps += 1
        if not first:
            first = time.perf_counter()
        logprobs += seq.logprobs
        seq.logprobs.clear()
        if any(engine.is_eog(t) for _, t in out):
            break
    took = time.perf_counter() - first
    made = seq.tokens[seq.n_prompt:][:tokens]
    engine.close_seq(seq)
    engine.reset()
    return made, logprobs, (len(made) - 1) / took if took > 0 else 0.0, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="SmolLM2-135M-Instruct.Q4_1.gguf,"
                                        "gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    total = same = 0
    for name in args.models.split(","):
        engine = LlamaEngine.load(ROOT / "models" / name, Settings(
            n_ctx=4096, n_threads=args.threads, parallel=1, draft="ngram",
            log_level="warning"))
        cost = StepCost()
        try:
            cases = [(f"{ask[:18]}../code {i}", f"{ask}\n\n```python\n{code}```", code)
                     for i, code in enumerate(CODE) for ask in ASKS]
            cases += [(f"free: {q[:24]}", q, None) for q in FREE]
            for label, user, code in cases:
                prompt = _prompt(engine, user)
                plain_params = SamplingParams(temperature=0, logprobs=2, draft_max=0)
                plain, lps, plain_speed, _ = _run(engine, prompt, plain_params, args.tokens,
                                                  False, cost)
                sources = [("ngram", SamplingParams(temperature=0))]
                if code is not None:
                    pred = tuple(engine.tokenize(f"```python\n{code}```", add_special=False,
                                                 parse_special=False))
                    sources.append(("prediction", SamplingParams(temperature=0,
                                                                 prediction=pred)))
                for source, params in sources:
                    made, _, speed, steps = _run(engine, prompt, params, args.tokens, True, cost)
                    total += 1
                    n = min(len(made), len(plain))
                    at = next((i for i in range(n) if made[i] != plain[i]), None)
                    if at is None and len(made) == len(plain):
                        same += 1
                        verdict = "identical"
                    elif at is None:
                        verdict = f"same tokens, lengths {len(plain)} vs {len(made)}"
                    else:
                        top = lps[at][1]
                        gap = top[0][1] - top[1][1] if len(top) > 1 else float("nan")
                        verdict = f"parts at token {at} (top-2 gap {gap:.3f})"
                    print(f"{name[:12]:12} {label:32} {source:10} {len(plain):4} tokens "
                          f"{plain_speed:6.1f} -> {speed:6.1f} tok/s ({steps} steps): {verdict}")
        finally:
            engine.close()
    print(f"identical greedy text: {same} of {total} drafted runs")


if __name__ == "__main__":
    main()
