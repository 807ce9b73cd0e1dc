"""A Claude Code session replayed: llmserve against llama-server, same model, one run.

The session is built from a request Claude Code really sent (tests/fixtures/agents/
claude_code_json_1.json: its system prompt, its 12 tools, its system entry inside `messages`,
its billing block, whose `cc_version` suffix changes on every request as the CLI's does). Each
turn adds what the agent did: a `Read` tool_use and its tool_result, the text of a source file
of this repository (1-4k tokens), so turn N resends the whole conversation as Claude Code does.
Both servers get each turn in turn (llmserve, then llama-server), streamed to /v1/messages;
per turn it prints the time to the first content event and the cached share of the prompt
(`cache_read_input_tokens` / prompt tokens; llama-server's own figures where it reports them),
and at the end what each turn read of the previous turn's prompt.

Goals (issue 19): from the second turn on, each turn reads >= 95% of the previous turn's prompt
from the cache; later-turn TTFT <= 0.5x llama-server's.

    LLAMA_SERVER=$(.venv/bin/python -m llmserve install llama) \
        .venv/bin/python benchmarks/agent_replay.py [--turns 20] [--model_name FILE]

Without LLAMA_SERVER only llmserve runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from _server import ROOT, free_port, running, running_server

FIXTURE = ROOT / "tests" / "fixtures" / "agents" / "claude_code_json_1.json"
FILES = sorted(p for p in (ROOT / "llmserve").rglob("*.py") if 3000 < p.stat().st_size < 14000)
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "dummy",
           "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"}


def session(turns: int, seed: int) -> list[dict[str, Any]]:
    """The request bodies of one session, turn by turn."""
    rng = random.Random(seed)
    base = json.loads(FIXTURE.read_text())["body"]
    messages = copy.deepcopy(base["messages"])
    bodies = []
    for turn in range(turns):
        body = copy.deepcopy(base)
        body["messages"] = copy.deepcopy(messages)
        # NOTE: Claude Code's billing block changes on every request (cc_version suffix).
        body["system"][0]["text"] = (f"x-anthropic-billing-header: cc_version=2.1.332."
                                     f"{rng.randrange(4096):03x}; cc_entrypoint=sdk-cli;")
        bodies.append(body)
        path = FILES[(seed * 7 + turn) % len(FILES)]
        call_id = f"toolu_{seed:02d}{turn:04d}{rng.randrange(16**10):010x}"
        messages.append({"role": "assistant", "content": [
            {"type": "tool_use", "id": call_id, "name": "Read",
             "input": {"file_path": str(path.relative_to(ROOT))}}]})
        numbered = "\n".join(f"{i}\t{line}" for i, line in
                             enumerate(path.read_text().splitlines(), start=1))
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call_id, "content": numbered}]})
    return bodies


def turn(base: str, body: dict[str, Any], model: str, max_tokens: int) -> dict[str, Any]:
    """Stream one Messages request: TTFT, prompt tokens, cached tokens."""
    body = {**body, "model": model, "max_tokens": max_tokens, "stream": True,
            "temperature": 0}
    usage: dict[str, int] = {}
    ttft = None
    start = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/messages?beta=true", json=body, headers=HEADERS,
                      timeout=1800) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{base}: {r.status_code} {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            kind = event.get("type")
            if kind == "message_start":
                usage.update({k: v for k, v in event["message"].get("usage", {}).items()
                              if isinstance(v, int)})
            elif kind == "message_delta":
                usage.update({k: v for k, v in event.get("usage", {}).items()
                              if isinstance(v, int)})
            elif kind in ("content_block_start", "content_block_delta") and ttft is None:
                ttft = time.perf_counter() - start
            elif kind == "error":
                raise RuntimeError(f"{base}: {event}")
    read = usage.get("cache_read_input_tokens", 0)
    prompt = usage.get("input_tokens", 0) + read + usage.get("cache_creation_input_tokens", 0)
    return {"ttft": ttft or time.perf_counter() - start, "prompt": prompt, "read": read}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_name", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--models_dir", default=str(ROOT / "models"))
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--n_ctx", type=int, default=65536)
    ap.add_argument("--n_threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--max_tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    bodies = session(args.turns, args.seed)
    model_path = Path(args.models_dir) / args.model_name
    binary = os.environ.get("LLAMA_SERVER")
    with ExitStack() as stack:
        cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="agent-replay-"))
        servers = {"llmserve": stack.enter_context(running_server(
            "--model_name", args.model_name, "--models_dir", args.models_dir,
            "--n_ctx", str(args.n_ctx), "--n_threads", str(args.n_threads),
            "--cache_dir", cache_dir))}
        if binary:
            port = free_port()
            cmd = [binary, "-m", str(model_path), "--port", str(port), "--host", "127.0.0.1",
                   "-c", str(args.n_ctx), "-t", str(args.n_threads), "--jinja", "-np", "1"]
            # NOTE: the template llmserve renders tools with (SmolLM2's own ignores tools), so
            # both servers see the same prompt.
            family = "gemma" if "gemma" in args.model_name.lower() else "chatml"
            cmd += ["--chat-template-file", str(ROOT / "templates" / f"{family}.jinja")]
            servers["llama-server"] = stack.enter_context(running(cmd, port, "llama-server"))
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        print(f"{args.model_name}, {args.turns} turns, n_ctx {args.n_ctx}, "
              f"{args.n_threads} threads", flush=True)
        print(f"{'turn':>4} {'prompt':>7} " + " ".join(
            f"{n + ' ttft':>18} {n + ' cached':>20}" for n in servers), flush=True)
        for i, body in enumerate(bodies, start=1):
            cells = []
            for name, base in servers.items():
                row = turn(base, body, args.model_name, args.max_tokens)
                rows[name].append(row)
                share = row["read"] / row["prompt"] if row["prompt"] else 0.0
                cells.append(f"{row['ttft']:>17.2f}s {share:>19.1%}")
            print(f"{i:>4} {rows['llmserve'][-1]['prompt']:>7} " + " ".join(cells), flush=True)
    ours = rows["llmserve"]
    later = ours[1:]
    # NOTE: the goal's measure: what each turn reads of the turn before's prompt (all of its
    # own prompt cannot be cached: the newest tool result is new).
    kept = min((r["read"] / p["prompt"] for p, r in zip(ours[:-1], later, strict=True)),
               default=0.0)
    print(f"llmserve: first turn {ours[0]['ttft']:.2f} s; later turns median TTFT "
          f"{statistics.median(r['ttft'] for r in later):.2f} s; from turn 2 on, each turn "
          f"read at least {kept:.1%} of the previous turn's prompt from the cache (goal >= 95%)")
    if "llama-server" in rows:
        ratios = [a["ttft"] / b["ttft"] for a, b in
                  zip(later, rows["llama-server"][1:], strict=True)]
        theirs = rows["llama-server"][1:]
        print(f"llama-server: later turns median TTFT "
              f"{statistics.median(r['ttft'] for r in theirs):.2f} s")
        print(f"later-turn TTFT llmserve / llama-server: median {statistics.median(ratios):.3f}"
              f", worst {max(ratios):.3f} (goal <= 0.5)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
