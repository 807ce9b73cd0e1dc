"""Where the engine thread's time goes while streams decode: inside llama_decode, or in
Python between decodes (sampling, detokenizing, stops, tool parsing, events).

Runs `server.py`, sends --streams concurrent greedy streams of --tokens tokens (short
prompts: the case where Python's share is largest), and prints, from /health's engine block,
the seconds of loop turns that stepped, the seconds inside llama_decode, and the share
outside it, with the aggregate tokens/s.

    .venv/bin/python benchmarks/engine_share.py [--streams 4] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from _server import ROOT, running_server, sse_chunks


def stream(base: str, tokens: int, i: int) -> int:
    body = {"messages": [{"role": "user", "content": f"Tell story number {i} about a fox."}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    n = 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=900) as resp:
        for chunk in sse_chunks(resp):
            if chunk.get("usage"):
                n = int(chunk["usage"]["completion_tokens"])
    return n


def engine(base: str) -> dict[str, float]:
    return dict(httpx.get(f"{base}/health", timeout=30).json()["engine"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--models_dir", default=str(ROOT / "models"))
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--n_threads", type=int, default=2)
    args = ap.parse_args()
    with running_server("--model_name", args.model_name, "--models_dir", args.models_dir,
                        "--n_threads", str(args.n_threads), "--parallel",
                        str(max(args.streams, 1))) as base:
        stream(base, 8, -1)  # warm up
        before = engine(base)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.streams) as pool:
            produced = sum(pool.map(lambda i: stream(base, args.tokens, i),
                                    range(args.streams)))
        wall = time.perf_counter() - start
        after = engine(base)
    step = after["step_seconds"] - before["step_seconds"]
    decode = after["decode_seconds"] - before["decode_seconds"]
    out = {"streams": args.streams, "tokens": produced, "wall_s": round(wall, 2),
           "tokens_per_s": round(produced / wall, 1), "engine_step_s": round(step, 2),
           "llama_decode_s": round(decode, 2),
           "outside_decode_share": round(1 - decode / step, 3) if step else None}
    print(json.dumps(out))
    print(f"engine thread outside llama_decode: {out['outside_decode_share']:.1%} of its "
          f"stepping time ({produced / wall:.1f} tokens/s over {args.streams} streams)")


if __name__ == "__main__":
    main()
