"""Agent workload: a long shared system prompt, interleaved conversations, restarts.

Runs `server.py` with --prompt_cache tiered (ours), llama_disk (llama-cpp-python's
LlamaDiskCache) and off, and prints, from one run:
  - later-turn TTFT median vs the cold first request (target <= 0.1x; llama-server: 0.064x)
  - TTFT for a known prefix after a restart on the same cache dir vs cold (target <= 0.1x)
  - total time with the cache on vs off for prompts that share nothing (target <= 1.10x)
  - disk bytes vs the KV size of the unique tokens stored (target <= 1.5x)
Usage: python benchmarks/agent_workload.py [--model_name FILE] [--n_threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from _server import running_server

ROOT = Path(__file__).resolve().parent.parent


def system_prompt() -> str:
    """About 1500 SmolLM2 tokens of agent instructions and tool descriptions."""
    tools = []
    for i in range(24):
        tools.append(json.dumps({
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": f"Look up record {i} in the inventory database and return it.",
                "parameters": {"type": "object", "properties": {
                    "id": {"type": "integer", "description": "record id"},
                    "verbose": {"type": "boolean"}}, "required": ["id"]},
            },
        }))
    return ("You are an inventory agent. Answer briefly. Use the tools below when needed.\n"
            + "\n".join(tools))


@contextmanager
def server(model: str, models_dir: str, n_threads: int, cache_dir: Path, mode: str
           ) -> Iterator[str]:
    with running_server("--model_name", model, "--models_dir", models_dir, "--n_threads",
                        str(n_threads), "--n_ctx", "4096", "--cache_dir", str(cache_dir),
                        "--prompt_cache", mode) as base:
        yield base


def ask(base: str, messages: list[dict[str, str]], max_tokens: int = 16) -> dict[str, Any]:
    """Stream one chat completion; TTFT is the time to the first content token."""
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    text = ""
    usage: dict[str, Any] = {}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = ttft or time.perf_counter() - start
                text += chunk["choices"][0]["delta"]["content"]
    total = time.perf_counter() - start
    return {"text": text, "ttft": ttft or total, "total": total, "usage": usage}


def interleaved(base: str, sysmsg: str) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    convs: dict[str, list[Any]] = {k: [{"role": "system", "content": sysmsg}] for k in "ABC"}
    results = []
    for turn in range(3):
        for k, conv in convs.items():
            conv.append({"role": "user",
                         "content": f"Conversation {k}, turn {turn}: what is in record {turn}?"})
            r = ask(base, conv)
            conv.append({"role": "assistant", "content": r["text"]})
            results.append({"conv": k, "turn": turn, **r})
    return results, convs


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def kv_bytes_per_token(model: Path, n_threads: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(str(model), n_ctx=1024, n_threads=n_threads, verbose=False)
    tokens = llm.tokenize(("lorem ipsum dolor sit amet " * 100).encode())[:512]
    llm.eval(tokens)
    size = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
    llm.close()
    return size / len(tokens)


def run_mode(mode: str, args: argparse.Namespace, sysmsg: str) -> dict[str, Any]:
    cache_dir = Path(tempfile.mkdtemp(prefix=f"llmserve-bench-{mode}-"))
    try:
        with server(args.model_name, args.models_dir, args.n_threads, cache_dir, mode) as base:
            results, convs = interleaved(base, sysmsg)
            stats = httpx.get(f"{base}/cache").json()
        with server(args.model_name, args.models_dir, args.n_threads, cache_dir, mode) as base:
            new_user = {"role": "user", "content": "New conversation: what is in record 5?"}
            fresh = ask(base, [{"role": "system", "content": sysmsg}, new_user])
            known = ask(base, [*convs["A"], {"role": "user", "content": "And record 9?"}])
        return {"results": results, "after_restart_new": fresh, "after_restart_known": known,
                "disk_bytes": dir_bytes(cache_dir), "stats": stats, "convs": convs}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def unrelated(args: argparse.Namespace) -> tuple[float, float]:
    """Total seconds for prompts that share nothing: cache tiered vs off (alternating)."""
    prompts = [
        [{"role": "system", "content": f"Persona {i}: " + " ".join(f"w{i}x{j}" for j in range(120))},  # noqa: E501
         {"role": "user", "content": f"Question {i}?"}]
        for i in range(6)
    ]
    on_dir = Path(tempfile.mkdtemp(prefix="llmserve-bench-unrelated-"))
    off_dir = Path(tempfile.mkdtemp(prefix="llmserve-bench-unrelated-off-"))
    on = off = 0.0
    try:
        with server(args.model_name, args.models_dir, args.n_threads, on_dir, "tiered") as b_on, \
             server(args.model_name, args.models_dir, args.n_threads, off_dir, "off") as b_off:
            ask(b_on, [{"role": "user", "content": "warm-up"}], 4)
            ask(b_off, [{"role": "user", "content": "warm-up"}], 4)
            for i, p in enumerate(prompts):
                first, second = (b_on, b_off) if i % 2 == 0 else (b_off, b_on)
                t1 = ask(first, p, 32)["total"]
                t2 = ask(second, p, 32)["total"]
                on += t1 if first == b_on else t2
                off += t2 if first == b_on else t1
    finally:
        shutil.rmtree(on_dir, ignore_errors=True)
        shutil.rmtree(off_dir, ignore_errors=True)
    return on, off


def report(mode: str, run: dict[str, Any], kv_per_token: float) -> None:
    results = run["results"]
    cold = results[0]["ttft"]
    later = [r["ttft"] for r in results if r["turn"] > 0]
    med = statistics.median(later)
    print(f"\n== --prompt_cache {mode} ==")
    for r in results:
        u = r["usage"]
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        print(f"  {r['conv']}{r['turn']}: TTFT {r['ttft']:.3f} s  prompt {u['prompt_tokens']}"
              f"  cached {cached}")
    print(f"cold first request TTFT: {cold:.3f} s")
    print(f"later-turn TTFT median: {med:.3f} s  -> {med / cold:.3f}x cold (target <= 0.1)")
    for label in ("after_restart_new", "after_restart_known"):
        r = run[label]
        cached = (r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        print(f"{label.replace('_', ' ')}: TTFT {r['ttft']:.3f} s -> {r['ttft'] / cold:.3f}x "
              f"cold (cached {cached}/{r['usage']['prompt_tokens']})")
    if mode != "off":
        shared = results[1]["usage"]["prompt_tokens_details"]["cached_tokens"]
        finals = [r for r in results if r["turn"] == 2]
        unique = sum(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
                     for r in finals) - (len(finals) - 1) * shared
        kv = unique * kv_per_token
        print(f"disk: {run['disk_bytes'] / 1e6:.1f} MB for ~{unique} unique tokens "
              f"({kv / 1e6:.1f} MB of KV) -> {run['disk_bytes'] / kv:.2f}x (target <= 1.5)")
    print(f"cache stats: {json.dumps(run['stats'])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model_name", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--models_dir", default=str(ROOT / "models"))
    ap.add_argument("--n_threads", type=int, default=2)
    ap.add_argument("--modes", default="tiered,llama_disk")
    args = ap.parse_args()
    sysmsg = system_prompt()
    kv_per_token = kv_bytes_per_token(Path(args.models_dir) / args.model_name, args.n_threads)
    print(f"model {args.model_name}, {args.n_threads} threads, "
          f"KV {kv_per_token / 1e3:.1f} kB/token")
    for mode in args.modes.split(","):
        report(mode, run_mode(mode, args, sysmsg), kv_per_token)
    on, off = unrelated(args)
    print(f"\nunrelated prompts (nothing shared), 6 requests: cache tiered {on:.2f} s, "
          f"off {off:.2f} s -> {on / off:.3f}x (target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
