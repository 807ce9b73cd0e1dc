"""Embeddings beside a chat stream: the stream's longest gap between tokens, and /health.

One server (SmolLM2 by default). A chat stream of --tokens tokens runs alone, then again
while --embeddings requests of about --embed_tokens tokens each run concurrently (sent after
its first token); /health is polled every 0.2 s throughout. Prints, for the stream alone and
beside the embeddings, the longest and median gap between content chunks, the embeddings'
wall time, and how many /health answers were not 200.

Issue 20's goals: beside 8 embeddings of 1000 tokens the longest gap stays under 1.5 s (it
was 66 s when an input was one call on the engine thread) and /health stays 200 (it answered
503 in 21 of 279 samples).

    .venv/bin/python benchmarks/embed_beside_stream.py [--embeddings 8] [--embed_tokens 1000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from _server import ROOT, running_server, sse_chunks


def stream(base: str, tokens: int) -> list[float]:
    """Gaps (s) between the content chunks of one greedy stream."""
    body = {"messages": [{"role": "user", "content": "Tell me a long story about a harbour."}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    stamps = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=900) as resp:
        for chunk in sse_chunks(resp):
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)]


def embed(base: str, n_tokens: int, i: int) -> float:
    text = " ".join(f"item{i}-{j} ships cargo to port" for j in range(n_tokens // 8))
    start = time.perf_counter()
    resp = httpx.post(f"{base}/v1/embeddings", json={"input": text}, timeout=900)
    resp.raise_for_status()
    return time.perf_counter() - start


def poll_health(base: str, stop: threading.Event, codes: list[int]) -> None:
    while not stop.is_set():
        try:
            codes.append(httpx.get(f"{base}/health", timeout=5).status_code)
        except httpx.HTTPError:
            codes.append(0)
        stop.wait(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--models_dir", default=str(ROOT / "models"))
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--embeddings", type=int, default=8)
    ap.add_argument("--embed_tokens", type=int, default=1000)
    ap.add_argument("--n_threads", type=int, default=2)
    args = ap.parse_args()
    with running_server("--model_name", args.model_name, "--models_dir", args.models_dir,
                        "--n_threads", str(args.n_threads)) as base:
        embed(base, 64, -1)  # the embedding context exists before anything is timed
        alone = stream(base, args.tokens)
        codes: list[int] = []
        stop = threading.Event()
        poller = threading.Thread(target=poll_health, args=(base, stop, codes))
        poller.start()
        results: dict[str, Any] = {}
        with ThreadPoolExecutor(args.embeddings + 1) as pool:
            gaps_f = pool.submit(stream, base, args.tokens)
            time.sleep(1.0)  # NOTE: the stream is under way
            start = time.perf_counter()
            embeds = [pool.submit(embed, base, args.embed_tokens, i)
                      for i in range(args.embeddings)]
            beside = gaps_f.result()
            [f.result() for f in embeds]
            results["embeddings_wall_s"] = round(time.perf_counter() - start, 2)
        stop.set()
        poller.join()
    results.update({
        "alone_max_gap_s": round(max(alone), 3),
        "alone_median_gap_s": round(statistics.median(alone), 4),
        "beside_max_gap_s": round(max(beside), 3),
        "beside_median_gap_s": round(statistics.median(beside), 4),
        "health_samples": len(codes),
        "health_not_200": sum(1 for c in codes if c != 200),
    })
    print(json.dumps(results))
    print(f"longest gap beside {args.embeddings} embeddings of ~{args.embed_tokens} tokens: "
          f"{results['beside_max_gap_s']} s (alone {results['alone_max_gap_s']} s; goal < 1.5 s); "
          f"/health not 200 in {results['health_not_200']} of {len(codes)} samples")


if __name__ == "__main__":
    main()
