"""Single-stream decode tokens/s: through llmserve's HTTP SSE vs raw llama-cpp-python, same run.

Prints both figures and the ratio (target >= 0.97). Usage:
    python benchmarks/decode.py [--model_name FILE] [--tokens 256] [--rounds 5] [--n_threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx
from _server import running_server, sse_chunks

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def raw_decode(model: Path, tokens: int, n_threads: int, n_ctx: int) -> float:
    """Tokens/s of llama-cpp-python's own generate loop, first token to last."""
    import llama_cpp

    llm = llama_cpp.Llama(str(model), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
    text = llm.metadata.get("tokenizer.chat_template") and (
        "<|im_start|>user\n" + MESSAGES[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt = llm.tokenize((text or MESSAGES[0]["content"]).encode(), False, True)
    llm.reset()
    first = last = 0.0
    for i, _tok in enumerate(llm.generate(prompt, temp=0.0, top_k=0, top_p=1.0, min_p=0.0)):
        now = time.perf_counter()
        if i == 0:
            first = now
        last = now
        if i + 1 >= tokens:
            break
    llm.close()
    return (tokens - 1) / (last - first)


def http_decode(base: str, model: str, tokens: int) -> float:
    """Tokens/s as an SSE client sees them, first content chunk to last."""
    body = {
        "model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": tokens,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    first = last = 0.0
    n = 0
    produced = 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=300) as resp:
        for chunk in sse_chunks(resp):
            if chunk.get("usage"):
                produced = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                if n == 0:
                    first = now
                last = now
                n += 1
    # NOTE: a chunk can carry several tokens (held-back UTF-8); count tokens, not chunks.
    return (produced - 1) / (last - first)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model_name", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--models_dir", default=str(ROOT / "models"))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--n_threads", type=int, default=2)
    ap.add_argument("--server_args", default="", help="extra server flags, space-separated")
    args = ap.parse_args()
    n_ctx = 2048
    with running_server(
        "--model_name", args.model_name, "--models_dir", args.models_dir, "--n_threads",
        str(args.n_threads), "--n_ctx", str(n_ctx), *args.server_args.split(),
    ) as base:
        http_decode(base, args.model_name, 16)  # warm-up
        raw: list[float] = []
        http: list[float] = []
        model = Path(args.models_dir) / args.model_name
        for i in range(args.rounds):
            # NOTE: this VM's speed drifts by +-20% over seconds; pairs measured back to back
            # (in alternating order) see the same conditions, so the ratio is taken per pair.
            if i % 2:
                http.append(http_decode(base, args.model_name, args.tokens))
                raw.append(raw_decode(model, args.tokens, args.n_threads, n_ctx))
            else:
                raw.append(raw_decode(model, args.tokens, args.n_threads, n_ctx))
                http.append(http_decode(base, args.model_name, args.tokens))
    r, h = statistics.median(raw), statistics.median(http)
    ratio = statistics.median(b / a for a, b in zip(raw, http, strict=True))
    print(f"model {args.model_name}, {args.tokens} tokens x {args.rounds} rounds, "
          f"{args.n_threads} threads")
    def rounds(xs: list[float]) -> str:
        return ", ".join(f"{x:.1f}" for x in xs)

    print(f"raw llama-cpp-python decode: {r:.1f} tok/s (rounds: {rounds(raw)})")
    print(f"llmserve HTTP SSE decode:    {h:.1f} tok/s (rounds: {rounds(http)})")
    print(f"ratio http/raw: {ratio:.3f} (median of per-round ratios; target >= 0.97); "
          f"ratio of medians {h / r:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
