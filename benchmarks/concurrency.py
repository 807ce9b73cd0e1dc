"""Concurrent streams: single-stream decode tok/s, aggregate tok/s and TTFT at 2, 4, 8 streams.

Runs llmserve (`server.py --parallel N`) and, when LLAMA_SERVER=<path to llama-server> is set,
llama.cpp's own server (`-np N`) on the same model, in alternating order within each round, and
prints medians over the rounds plus ours / llama-server (median of per-round ratios) and
ours-at-N / ours-single. --ceiling adds a third column in the same rotation: llama.cpp alone
(benchmarks/decode_ceiling.py: the same prompts and context, llama_decode and an argmax, no
server), and each server's aggregate as a share of it. Every stream gets a different prompt
(also across rounds), greedy, `ignore_eos`, a fixed `max_tokens`. Usage:
    LLAMA_SERVER=/path/to/llama-server python benchmarks/concurrency.py \
        [--model_name FILE] [--tokens 128] [--rounds 3] [--streams 2,4,8] [--parallel 4] \
        [--n_threads 2] [--n_ctx 4096] [--server_args "..."] [--llama_args "..."] [--ceiling]
    python benchmarks/concurrency.py --no_parallel_flag  # llmserve without --parallel
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from _server import free_port, running, running_server, sse_chunks

ROOT = Path(__file__).resolve().parent.parent
TOPICS = [
    "a lighthouse keeper", "a clockmaker in Prague", "a deep-sea diver", "a desert caravan",
    "a lost robot", "a mountain village baker", "a river pilot", "an old library cat",
    "a comet hunter", "a jazz trumpeter", "a beekeeper's apprentice", "a polar research station",
]


def prompt(round_no: int, stream: int) -> str:
    return f"Tell me a long story about {TOPICS[stream % len(TOPICS)]}, part {round_no + 1}."


def one_stream(base: str, model: str, text: str, tokens: int, go: threading.Barrier,
               out: dict[str, float]) -> None:
    """One streamed chat completion; fills sent/first/last/done times and tokens."""
    body = {
        "model": model, "messages": [{"role": "user", "content": text}], "temperature": 0,
        "max_tokens": tokens, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = produced = 0
    with httpx.Client(timeout=600) as client:
        go.wait()
        out["sent"] = time.perf_counter()
        with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
            for chunk in sse_chunks(resp):
                if chunk.get("usage"):
                    produced = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    out.setdefault("first", now)
                    out["last"] = now
                    chunks += 1
    out["done"] = time.perf_counter()
    # NOTE: a chunk can carry several tokens (held-back UTF-8); prefer the usage count.
    out["tokens"] = produced or chunks


def burst(base: str, model: str, n: int, round_no: int, tokens: int) -> dict[str, float]:
    """n simultaneous streams: aggregate tok/s, TTFT median (ms), single-stream decode tok/s."""
    outs: list[dict[str, float]] = [{} for _ in range(n)]
    go = threading.Barrier(n)
    threads = [threading.Thread(target=one_stream, args=(
        base, model, prompt(round_no, i), tokens, go, outs[i])) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any("done" not in o or "first" not in o for o in outs):
        raise RuntimeError(f"a stream failed or produced no content at {n} streams")
    wall = max(o["done"] for o in outs) - min(o["sent"] for o in outs)
    return {
        "agg": sum(o["tokens"] for o in outs) / wall,
        "ttft": statistics.median(o["first"] - o["sent"] for o in outs) * 1000,
        "decode": statistics.median((o["tokens"] - 1) / (o["last"] - o["first"]) for o in outs),
    }


def alone(args: argparse.Namespace, n: int, round_no: int) -> dict[str, float]:
    """One round of llama.cpp alone (decode_ceiling.py in a child process, so that its
    threads and memory are gone before a server runs)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode_ceiling.py"), "--json",
           "--model_name", args.model_name, "--models_dir", args.models_dir,
           "--streams", str(n), "--tokens", str(args.tokens), "--rounds", "1",
           "--round_offset", str(round_no), "--n_threads", str(args.n_threads),
           "--n_ctx", str(args.n_ctx)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1])[0])


@contextmanager
def llama_server(binary: str, model: Path, args: argparse.Namespace) -> Iterator[str]:
    """llama-server -np N on a free loopback port (stopped by PID when done)."""
    port = free_port()
    cmd = [binary, "-m", str(model), "-np", str(args.parallel), "-c", str(args.n_ctx),
           "-t", str(args.n_threads), "--host", "127.0.0.1", "--port", str(port),
           *args.llama_args.split()]
    with running(cmd, port, "llama-server") as base:
        yield base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--models_dir", default=str(ROOT / "models"))
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens of every stream")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", default="2,4,8", help="concurrency levels, comma-separated")
    ap.add_argument("--parallel", type=int, default=4, help="llmserve --parallel, llama-server -np")
    ap.add_argument("--no_parallel_flag", action="store_true",
                    help="do not pass --parallel to llmserve (a build without it)")
    ap.add_argument("--n_threads", type=int, default=2)
    ap.add_argument("--n_ctx", type=int, default=4096)
    ap.add_argument("--server_args", default="", help="extra llmserve flags, space-separated")
    ap.add_argument("--llama_args", default="", help="extra llama-server flags, space-separated")
    ap.add_argument("--ceiling", action="store_true",
                    help="also measure llama.cpp alone (decode_ceiling.py) in the rotation")
    args = ap.parse_args()
    levels = [1, *(int(n) for n in args.streams.split(","))]
    model = Path(args.models_dir) / args.model_name
    binary = os.environ.get("LLAMA_SERVER")
    ours_args = ["--model_name", args.model_name, "--models_dir", args.models_dir,
                 "--n_threads", str(args.n_threads), "--n_ctx", str(args.n_ctx)]
    if not args.no_parallel_flag:
        ours_args += ["--parallel", str(args.parallel)]
    names = ["llmserve", "llama-server"] if binary else ["llmserve"]
    servers = list(names)
    if args.ceiling:
        names.append("llama.cpp alone")
    # results[name][level] -> one dict per round
    results: dict[str, dict[int, list[dict[str, float]]]] = {
        name: {n: [] for n in levels} for name in names}
    with ExitStack() as stack:
        bases = {"llmserve": stack.enter_context(running_server(*ours_args,
                                                                *args.server_args.split()))}
        if binary:
            bases["llama-server"] = stack.enter_context(llama_server(binary, model, args))
        for name in servers:  # warm-up: load, first allocations, a concurrent batch
            burst(bases[name], args.model_name, max(levels), -1, 16)
        for r in range(args.rounds):
            for j, n in enumerate(levels):
                # NOTE: this VM's speed drifts by +-20% within seconds; each level is measured
                # on both servers back to back, in alternating order, and ratios taken per pair.
                shift = (r + j) % len(names)
                order = names[shift:] + names[:shift]
                if (r + j) % 2:
                    order = order[::-1]
                for name in order:
                    results[name][n].append(
                        alone(args, n, r) if name == "llama.cpp alone"
                        else burst(bases[name], args.model_name, n, r, args.tokens))

    def med(name: str, n: int, key: str) -> float:
        return statistics.median(x[key] for x in results[name][n])

    def ratio(n: int, key: str, den: str = "llama-server", num: str = "llmserve") -> float:
        pairs = zip(results[num][n], results[den][n], strict=True)
        return statistics.median(a[key] / b[key] for a, b in pairs)

    print(f"model {args.model_name}, {args.tokens} tokens/stream, {args.rounds} rounds, "
          f"parallel {args.parallel}{' (not passed to llmserve)' * args.no_parallel_flag}, "
          f"{args.n_threads} threads, n_ctx {args.n_ctx}")
    header = f"{'':28}" + "".join(f"{name:>16}" for name in names)
    print(header + ("   ours/llama" if binary else ""))
    rows = [(1, "decode", "single decode tok/s"), (1, "ttft", "single TTFT ms")]
    for n in levels[1:]:
        rows += [(n, "agg", f"{n} streams aggregate tok/s"), (n, "ttft", f"{n} streams TTFT ms")]
    for n, key, label in rows:
        line = f"{label:28}" + "".join(f"{med(name, n, key):16.1f}" for name in names)
        print(line + (f"{ratio(n, key):13.3f}" if binary else ""))
    for name in names:
        per = results[name]
        scale = [statistics.median(a["agg"] / s["decode"] for a, s in zip(
            per[n], per[1], strict=True)) for n in levels[1:]]
        print(f"{name} aggregate at N / single decode: "
              + ", ".join(f"{n}: {x:.2f}x" for n, x in zip(levels[1:], scale, strict=True)))
    if args.ceiling:
        for n in levels[1:]:
            shares = ", ".join(f"{name} {ratio(n, 'agg', 'llama.cpp alone', name):.3f}"
                               for name in servers)
            print(f"{n} streams aggregate / llama.cpp alone (median of per-round ratios): "
                  f"{shares}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
