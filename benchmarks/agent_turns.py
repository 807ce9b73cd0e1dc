"""An agent's next turn at real context lengths: llmserve against llama-server, one run.

Each conversation starts with a long system prompt (about --system_tokens tokens of agent
instructions, different per conversation after a shared head when --conversations > 1) and
runs --turns turns: a short user message, a streamed reply of --max_tokens tokens at
temperature 0, the reply appended to the conversation as the agent would. Turn N of every
conversation is sent to llmserve, then to llama-server (both up at once, same model, same
threads, same context), so drift on a loaded machine hits both alike. With --conversations N
the N conversations of one turn run concurrently on each server.

Prints the time to first token per turn and server, and the median of ours / llama-server's
over turns 2.. (issue 20's goal: <= 1.0x, i.e. a later turn continues from the live KV and
saving the finished turn never delays the next one).

    LLAMA_SERVER=$(.venv/bin/python -m llmserve install llama) \\
        .venv/bin/python benchmarks/agent_turns.py [--system_tokens 7300] [--conversations 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from _server import ROOT, free_port, running, running_server, sse_chunks

WORDS = ["inventory", "record", "customer", "shipment", "invoice", "ledger", "warehouse",
         "supplier", "audit", "policy", "refund", "ticket", "priority", "escalation", "schedule",
         "report", "region", "quarter", "forecast", "budget"]


def system_prompt(tokens: int, conversation: int, shared: float) -> str:
    """Agent instructions of about `tokens` SmolLM2 tokens (~1.9 tokens per word); the first
    `shared` share is the same for every conversation, the rest names the conversation."""
    lines = []
    n_words = int(tokens / 1.9)
    for i in range(0, n_words, 12):
        owner = 0 if i < n_words * shared else conversation + 1
        words = [WORDS[(i * 7 + j * 3 + owner * 5) % len(WORDS)] for j in range(10)]
        lines.append(f"Rule {i // 12} (desk {owner}): " + " ".join(words) + ".")
    return "You are an operations agent. Follow every rule below.\n" + "\n".join(lines)


def turn(base: str, model: str, messages: list[dict[str, Any]], max_tokens: int
         ) -> tuple[float, str, dict[str, Any]]:
    """Stream one reply; (seconds to the first content token, the text, usage)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    text = []
    usage: dict[str, Any] = {}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=900) as resp:
        for chunk in sse_chunks(resp):
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    end = time.perf_counter()
    return (first or end) - start, "".join(text), usage


def cached(usage: dict[str, Any]) -> int:
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--models_dir", default=str(ROOT / "models"))
    ap.add_argument("--system_tokens", type=int, default=7300)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max_tokens", type=int, default=24)
    ap.add_argument("--conversations", type=int, default=1)
    ap.add_argument("--shared", type=float, default=0.8,
                    help="share of the system prompt every conversation has in common")
    ap.add_argument("--n_threads", type=int, default=2)
    ap.add_argument("--n_ctx", type=int, default=32768)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--server_args", default="", help="extra llmserve flags, space-separated")
    args = ap.parse_args()
    model_path = Path(args.models_dir) / args.model_name
    binary = os.environ.get("LLAMA_SERVER")
    with ExitStack() as stack:
        cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="agent-turns-"))
        servers = {"llmserve": stack.enter_context(running_server(
            "--model_name", args.model_name, "--models_dir", args.models_dir,
            "--n_ctx", str(args.n_ctx), "--n_threads", str(args.n_threads),
            "--parallel", str(args.parallel), "--cache_dir", cache_dir,
            *args.server_args.split()))}
        if binary:
            port = free_port()
            cmd = [binary, "-m", str(model_path), "--port", str(port), "--host", "127.0.0.1",
                   "-c", str(args.n_ctx), "-t", str(args.n_threads), "--jinja",
                   "-np", str(args.parallel), "--kv-unified"]
            servers["llama-server"] = stack.enter_context(running(cmd, port, "llama-server"))
        convs = {name: [[{"role": "system", "content": system_prompt(
            args.system_tokens, c, args.shared)}] for c in range(args.conversations)]
            for name in servers}
        ttft: dict[str, list[list[float]]] = {name: [] for name in servers}
        print(f"{args.model_name}, ~{args.system_tokens}-token system prompt, "
              f"{args.conversations} conversation(s), {args.turns} turns of {args.max_tokens} "
              f"tokens, n_ctx {args.n_ctx}, {args.n_threads} threads", flush=True)
        pool = stack.enter_context(ThreadPoolExecutor(args.conversations))
        for t in range(args.turns):
            cells = []
            for name, base in servers.items():
                for c, msgs in enumerate(convs[name]):
                    msgs.append({"role": "user", "content": f"Step {t + 1} for desk {c}: "
                                 f"what is rule {t * 3 + c}? Answer briefly."})
                results = list(pool.map(
                    lambda msgs, base=base: turn(base, args.model_name, msgs, args.max_tokens),
                    convs[name]))
                for msgs, (_, text, _) in zip(convs[name], results, strict=True):
                    msgs.append({"role": "assistant", "content": text})
                ttft[name].append([r[0] for r in results])
                prompt = max(int(r[2].get("prompt_tokens") or 0) for r in results)
                cells.append(f"{name} ttft {max(r[0] for r in results):6.2f} s "
                             f"(prompt {prompt}, cached {min(cached(r[2]) for r in results)})")
            print(f"turn {t + 1}: " + " | ".join(cells), flush=True)
        if binary and args.turns > 1:
            ratios = [max(o) / max(b) for o, b in
                      zip(ttft["llmserve"][1:], ttft["llama-server"][1:], strict=True)]
            print(json.dumps({
                "later_turn_ttft_ours_s": [round(max(x), 3) for x in ttft["llmserve"][1:]],
                "later_turn_ttft_llama_server_s":
                    [round(max(x), 3) for x in ttft["llama-server"][1:]],
                "ratio_median": round(statistics.median(ratios), 3),
                "ratio_worst": round(max(ratios), 3),
            }))
            print(f"later turns: ours / llama-server median {statistics.median(ratios):.2f}x "
                  f"(goal <= 1.0x)")


if __name__ == "__main__":
    main()
