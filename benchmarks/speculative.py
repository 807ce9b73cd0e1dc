"""Speculative decoding (issue 23): decode tokens/s with and without each draft source.

Workloads, all greedy (temperature 0), streamed:
  code-edit    one request: a ~60-line Python file (SOURCE below) and "rewrite it with one
               small change"; the model copies the file nearly verbatim (~500 tokens out), so
               drafts that guess the copy are accepted;
  free-text    one request: a short story (--story-tokens, `ignore_eos`), little to copy;
  code-edit x4 four different small changes to the same file at once (aggregate tokens/s).

Configurations (--only picks some, comma-separated):
  ours          server.py --draft none (the baseline every ratio is taken against)
  ours-ngram    server.py --draft ngram (prompt lookup)
  ours-pred     server.py --draft none, code edits carry OpenAI's Predicted Outputs
                (`prediction` = the original file); its free text has no prediction (the same
                as `ours`: a measure of the noise)
  ours-model    server.py --draft_model <the same model> (a model drafting for itself: only the
                mechanics on a CPU, every draft is accepted and nothing is gained)
  llama         llama-server, no speculation
  llama-ngram   llama-server --spec-type ngram-simple with a 4-token lookup and 16-token drafts
                (its default 12-token lookup accepted 53 of 192 drafted tokens on the code edit,
                4 tokens 114 of 287, ngram-map-k alike, ngram-mod 33 of 64; --llama-ngram
                picks another type and its flags)
  llama-md      llama-server -md <the same model> --spec-type draft-simple
Every server gets the same model, n_ctx, threads and 4 parallel sequences (llama-server
`-np 4 --kv-unified`); ours and llama-server draft up to --draft-max tokens a step.

All servers are started once and stay up (the models are tiny); requests go to one server at a
time. Each round runs every workload on every configuration back to back, in an order that
rotates per round, because this machine's speed drifts by +-20% within seconds.

The figure is decode tokens/s = completion_tokens / (end - first content token), from the
stream (the 4-stream figure: all completion tokens / (last end - first first token)). Also
printed: TTFT, accepted/rejected prediction tokens (usage.completion_tokens_details) for
`ours-pred`, drafted / accepted tokens (ours: /metrics' llmserve_draft_tokens_*, all sources;
llama-server: `timings` draft_n / draft_n_accepted), whether each drafted run's
text equals its server's plain run's text (greedy: it should), and the ratios to `ours`
(issue 23's goals: code edit >= 1.5x, free text >= 0.95x, 4 code edits >= 1.0x aggregate) and
ours' best / llama-server's best on the code edit (goal >= 1.3x).

    LLAMA_SERVER=$(.venv/bin/python -m llmserve install llama) \\
        .venv/bin/python benchmarks/speculative.py [--rounds 3] [--only ours,llama,...] [--quick]
(without LLAMA_SERVER the binary `llmserve install llama` built is used when there is one)
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _server import ROOT, free_port, running, running_server, sse_chunks

SOURCE = '''\
"""Inventory records kept in a JSON file, with a small command-line front end."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_PATH = Path("inventory.json")
LOW_STOCK = 5


@dataclass
class Item:
    sku: str
    name: str
    quantity: int
    price: float

    def total_value(self) -> float:
        return self.quantity * self.price


def load_items(path: Path) -> list[Item]:
    """Read every item from the file; an absent file is an empty inventory."""
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return [Item(**row) for row in json.load(f)]


def save_items(path: Path, items: list[Item]) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump([asdict(item) for item in items], f, indent=2)


def restock(items: list[Item], sku: str, amount: int) -> Item:
    for item in items:
        if item.sku == sku:
            item.quantity += amount
            return item
    raise KeyError(f"unknown sku: {sku}")


def low_stock(items: list[Item]) -> list[Item]:
    return [item for item in items if item.quantity < LOW_STOCK]


def main() -> None:
    parser = argparse.ArgumentParser(description="Manage the inventory file.")
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--restock", nargs=2, metavar=("SKU", "AMOUNT"))
    args = parser.parse_args()
    items = load_items(args.path)
    if args.restock:
        item = restock(items, args.restock[0], int(args.restock[1]))
        save_items(args.path, items)
        print(f"{item.name}: {item.quantity} in stock")
    for item in low_stock(items):
        print(f"low stock: {item.sku} {item.name} ({item.quantity} left)")
    total = sum(item.total_value() for item in items)
    print(f"{len(items)} items, total value {total:.2f}")


if __name__ == "__main__":
    main()
'''

CHANGES = [
    "change LOW_STOCK from 5 to 10",
    "rename the function low_stock to items_below_threshold",
    "make restock raise ValueError when amount is negative",
    "change the default path to Path(\"stock.json\")",
]

STORY = "Write a short story about a lighthouse keeper who finds a message in a bottle."

CONFIGS = ["ours", "ours-ngram", "ours-pred", "ours-model", "llama", "llama-ngram", "llama-md"]
WORKLOADS = ["code-edit", "free-text", "code-edit x4"]
LLAMA_NGRAM = "ngram-simple --spec-ngram-simple-size-n 4 --spec-ngram-simple-size-m 16"
GOALS = {"code-edit": 1.5, "free-text": 0.95, "code-edit x4": 1.0}


def edit_prompt(change: str) -> str:
    return (f"Here is a Python file:\n\n```python\n{SOURCE}```\n\nRewrite the whole file with "
            f"one change: {change}. Reply with the complete file in one ```python block.")


@dataclass
class Run:
    """One streamed completion."""

    sent: float = 0.0
    first: float | None = None
    end: float = 0.0
    text: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.usage.get("completion_tokens") or 0)

    def decode(self) -> float:
        return self.tokens / (self.end - (self.first or self.sent))

    def ttft(self) -> float:
        return (self.first or self.end) - self.sent


def stream(base: str, model: str, body: dict[str, Any], go: threading.Barrier | None = None
           ) -> Run:
    body = {"model": model, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **body}
    run = Run()
    parts: list[str] = []
    with httpx.Client(timeout=900) as client:
        if go is not None:
            go.wait()
        run.sent = time.perf_counter()
        with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                raise RuntimeError(f"{base} answered {resp.status_code}: {resp.text[:2000]}")
            for chunk in sse_chunks(resp):
                if chunk.get("usage"):
                    run.usage = chunk["usage"]
                if chunk.get("timings"):
                    run.timings = chunk["timings"]
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if run.first is None:
                            run.first = time.perf_counter()
                        parts.append(piece)
    run.end = time.perf_counter()
    run.text = "".join(parts)
    return run


@dataclass
class Result:
    """One workload on one configuration in one round."""

    decode: float  # tokens/s (aggregate for code-edit x4)
    ttft: float  # seconds (median for code-edit x4)
    tokens: int
    texts: list[str]
    accepted: int | None = None
    rejected: int | None = None
    draft_n: int | None = None
    draft_accepted: int | None = None


def summarize(runs: list[Run], bodies: list[dict[str, Any]]) -> Result:
    if len(runs) == 1:
        decode = runs[0].decode()
    else:
        first = min(r.first or r.sent for r in runs)
        decode = sum(r.tokens for r in runs) / (max(r.end for r in runs) - first)
    res = Result(decode=decode, ttft=statistics.median(r.ttft() for r in runs),
                 tokens=sum(r.tokens for r in runs), texts=[r.text for r in runs])
    details = [r.usage.get("completion_tokens_details") or {} for r in runs]
    if any("prediction" in b for b in bodies):
        res.accepted = sum(int(d.get("accepted_prediction_tokens") or 0) for d in details)
        res.rejected = sum(int(d.get("rejected_prediction_tokens") or 0) for d in details)
    if any("draft_n" in r.timings for r in runs):
        res.draft_n = sum(int(r.timings.get("draft_n") or 0) for r in runs)
        res.draft_accepted = sum(int(r.timings.get("draft_n_accepted") or 0) for r in runs)
    return res


def workload(name: str, config: str, args: argparse.Namespace
             ) -> list[dict[str, Any]]:
    """The request bodies of a workload on a configuration."""
    if name == "free-text":
        return [{"messages": [{"role": "user", "content": STORY}],
                 "max_tokens": args.story_tokens, "ignore_eos": True}]
    changes = CHANGES[:1] if name == "code-edit" else CHANGES
    bodies: list[dict[str, Any]] = [{"messages": [{"role": "user", "content": edit_prompt(c)}],
                                     "max_tokens": args.max_tokens} for c in changes]
    if config == "ours-pred":
        for body in bodies:
            body["prediction"] = {"type": "content", "content": f"```python\n{SOURCE}```"}
    return bodies


def run_workload(base: str, model: str, bodies: list[dict[str, Any]]) -> Result:
    if len(bodies) == 1:
        return summarize([stream(base, model, bodies[0])], bodies)
    go = threading.Barrier(len(bodies))
    runs: list[Run | None] = [None] * len(bodies)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            runs[i] = stream(base, model, bodies[i], go)
        except BaseException as exc:  # re-raised below, on the main thread
            errors.append(exc)
            go.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return summarize([r for r in runs if r is not None], bodies)


def draft_counts(base: str) -> tuple[int, int] | None:
    """Our server's drafted and accepted tokens so far, all sources (from /metrics)."""
    try:
        text = httpx.get(f"{base}/metrics", timeout=30).text
    except httpx.HTTPError:
        return None
    counts = [0, 0]
    for line in text.splitlines():
        for i, name in enumerate(("llmserve_draft_tokens_proposed_total",
                                  "llmserve_draft_tokens_accepted_total")):
            if line.startswith(name + "{") or line.startswith(name + " "):
                counts[i] += int(float(line.rsplit(" ", 1)[1]))
    return counts[0], counts[1]


def find_llama_server() -> str | None:
    binary = os.environ.get("LLAMA_SERVER")
    if binary:
        return binary
    try:
        from llmserve.backends.install import installed_binaries
    except ImportError:
        return None
    found = installed_binaries()
    return str(found[0]) if found else None


def start_servers(stack: ExitStack, configs: list[str], args: argparse.Namespace,
                  binary: str | None) -> dict[str, str]:
    """Base URL per configuration. ours-pred has a server of its own, so that every server
    sees the same requests in the same order: a prompt's KV restored from the cache then
    prefills like the plain run's (a cached prefix and a fresh prefill can round differently,
    which turns a near-tie of a greedy pick on this 135M model)."""
    model = str(Path(args.models_dir) / args.model)
    draft_model = args.draft_model or args.model
    common = ["--model_name", args.model, "--models_dir", args.models_dir,
              "--n_ctx", str(args.n_ctx), "--n_threads", str(args.threads),
              "--parallel", "4", "--prompt_cache", "ram"]
    ours = {
        "ours": ["--draft", "none"],
        "ours-pred": ["--draft", "none"],
        "ours-ngram": ["--draft", "ngram", "--draft_max", str(args.draft_max)],
        "ours-model": ["--draft_model", draft_model, "--draft_max", str(args.draft_max)],
    }
    llama = {
        "llama": [],
        "llama-ngram": ["--spec-type", *args.llama_ngram.split(), "--spec-draft-n-max",
                        str(args.draft_max)],
        "llama-md": ["-md", str(Path(args.models_dir) / draft_model), "--spec-type",
                     "draft-simple", "--spec-draft-n-max", str(args.draft_max)],
    }
    bases: dict[str, str] = {}
    for config in configs:
        key = config
        t0 = time.perf_counter()
        if key in ours:
            bases[key] = stack.enter_context(running_server(*common, *ours[key]))
        else:
            if binary is None:
                raise SystemExit(f"{config}: no llama-server (set LLAMA_SERVER)")
            port = free_port()
            cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "--jinja",
                   "-c", str(args.n_ctx), "-t", str(args.threads), "-np", "4", "--kv-unified",
                   *llama[key], *args.llama_args.split()]
            bases[key] = stack.enter_context(running(cmd, port, f"llama-server ({key})"))
        print(f"started {key} in {time.perf_counter() - t0:.1f} s", flush=True)
    return bases


# NOTE: a reply this short (Gemma at temperature 0 sometimes answers a code edit with "```")
# has no decode speed worth a ratio; such rounds are left out of it
MIN_TOKENS = 32


def ratio_line(label: str, num: list[Result], den: list[Result], goal: float | None) -> str:
    pairs = [(a, b) for a, b in zip(num, den, strict=True)
             if min(a.tokens, b.tokens) >= MIN_TOKENS]
    if not pairs:
        return f"  {label:34}   -    (every round had a reply under {MIN_TOKENS} tokens)"
    ratios = [a.decode / b.decode for a, b in pairs]
    med = statistics.median(ratios)
    mark = "" if goal is None else f"  goal >= {goal:.2f}x: {'met' if med >= goal else 'NOT met'}"
    left = len(num) - len(pairs)
    note = f", {left} round(s) left out: a reply under {MIN_TOKENS} tokens" if left else ""
    return (f"  {label:34} {med:5.2f}x  (per round: "
            + ", ".join(f"{r:.2f}" for r in ratios) + note + ")" + mark)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--models-dir", dest="models_dir", default=str(ROOT / "models"))
    ap.add_argument("--draft-model", dest="draft_model", default=None,
                    help="the draft model of ours-model and llama-md (default: --model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", dest="n_ctx", type=int, default=8192)
    ap.add_argument("--max-tokens", dest="max_tokens", type=int, default=640,
                    help="max_tokens of a code edit (it ends on its own at ~500)")
    ap.add_argument("--story-tokens", dest="story_tokens", type=int, default=300,
                    help="tokens of the free-text story (ignore_eos)")
    ap.add_argument("--draft-max", dest="draft_max", type=int, default=16,
                    help="most tokens drafted a step, ours and llama-server")
    ap.add_argument("--llama-ngram", dest="llama_ngram", default=LLAMA_NGRAM,
                    help="llama-server's --spec-type for llama-ngram (and further flags after it)")
    ap.add_argument("--llama-args", dest="llama_args", default="",
                    help="extra flags for every llama-server, e.g. \"--chat-template-file "
                         "templates/gemma.jinja\" for a GGUF without a template (llama-server "
                         "falls back to ChatML there, llmserve picks templates/gemma.jinja)")
    ap.add_argument("--only", default="", help=f"configurations: {','.join(CONFIGS)}")
    ap.add_argument("--workloads", default="", help=f"workloads: {','.join(WORKLOADS)}")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round, 48-token code edits and stories")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.max_tokens, args.story_tokens = 1, 48, 48
    configs = [c for c in CONFIGS if not args.only or c in args.only.split(",")]
    workloads = [w for w in WORKLOADS if not args.workloads or w in args.workloads.split(",")]
    if not configs or not workloads:
        raise SystemExit("nothing to run: check --only / --workloads")
    binary = find_llama_server()
    if binary is None:
        configs = [c for c in configs if not c.startswith("llama")]
        print("no llama-server (set LLAMA_SERVER): llama-* configurations left out")

    # results[workload][config] -> one Result per round
    results: dict[str, dict[str, list[Result]]] = {w: {c: [] for c in configs} for w in workloads}
    signal.signal(signal.SIGTERM, _interrupt)
    with ExitStack() as stack:
        bases = start_servers(stack, configs, args, binary)

        print("warm-up", flush=True)
        for config in configs:
            run_workload(bases[config], args.model, [
                    {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}])
        try:
            for r in range(args.rounds):
                for j, w in enumerate(workloads):
                    shift = (r + j) % len(configs)
                    order = configs[shift:] + configs[:shift]
                    if (r + j) % 2:
                        order = order[::-1]
                    for config in order:
                        bodies = workload(w, config, args)
                        before = draft_counts(bases[config]) if config.startswith("ours") else None
                        res = run_workload(bases[config], args.model, bodies)
                        after = draft_counts(bases[config]) if before is not None else None
                        if before is not None and after is not None and after[0] > before[0]:
                            res.draft_n = after[0] - before[0]
                            res.draft_accepted = after[1] - before[1]
                        results[w][config].append(res)
                        extra = ""
                        if res.accepted is not None:
                            extra = f", prediction accepted {res.accepted} rejected {res.rejected}"
                        if res.draft_n is not None:
                            extra += f", drafted {res.draft_n} accepted {res.draft_accepted}"
                        print(f"round {r + 1} {w:13} {config:12} {res.decode:7.1f} tok/s  "
                              f"ttft {res.ttft * 1000:6.0f} ms  {res.tokens} tokens{extra}",
                              flush=True)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: report the rounds that completed
            print("interrupted: reporting the completed rounds", flush=True)
    rounds = {w: min(len(rs) for rs in results[w].values()) for w in workloads}
    workloads = [w for w in workloads if rounds[w]]
    if not workloads:
        return 1
    for w in workloads:
        for c in results[w]:
            results[w][c] = results[w][c][:rounds[w]]
    args.rounds = "/".join(str(rounds[w]) for w in workloads)
    report(results, configs, workloads, args)
    return 0


def report(results: dict[str, dict[str, list[Result]]], configs: list[str],
           workloads: list[str], args: argparse.Namespace) -> None:
    print()
    print(f"model {args.model}, draft model {args.draft_model or args.model}, {args.rounds} "
          f"rounds, {args.threads} threads, n_ctx {args.n_ctx}, parallel 4, draft max "
          f"{args.draft_max}, code edit max_tokens {args.max_tokens}, story {args.story_tokens} "
          f"tokens, llama-ngram = --spec-type {args.llama_ngram}")
    print(f"{'median decode tok/s (TTFT ms)':30}" + "".join(f"{w:>22}" for w in workloads))
    for c in configs:
        cells = []
        for w in workloads:
            rs = results[w][c]
            cells.append(f"{statistics.median(x.decode for x in rs):10.1f} "
                         f"({statistics.median(x.ttft for x in rs) * 1000:7.0f})"
                         if rs else f"{'-':>20}")
        print(f"{c:30}" + "".join(f"{cell:>22}" for cell in cells))
    for c in configs:
        for w in workloads:
            rs = results[w][c]
            if rs and rs[0].accepted is not None:
                print(f"{c} {w}: prediction tokens accepted/rejected per round: "
                      + ", ".join(f"{x.accepted}/{x.rejected}" for x in rs))
            if any(x.draft_n is not None for x in rs):
                print(f"{c} {w}: drafted/accepted tokens per round: "
                      + ", ".join(f"{x.draft_n}/{x.draft_accepted}" for x in rs))

    print("ratios of decode tok/s (median of per-round ratios):")
    for w in workloads:
        if "ours" not in configs:
            break
        for c in configs:
            if c != "ours" and results[w][c]:
                print(ratio_line(f"{w}: {c} / ours", results[w][c], results[w]["ours"],
                                 GOALS[w] if c.startswith("ours") else None))
    w = "code-edit"
    if w in workloads:
        ours = [c for c in configs if c.startswith("ours") and results[w][c]]
        theirs = [c for c in configs if c.startswith("llama") and results[w][c]]
        if ours and theirs:
            def best(cs: list[str]) -> str:
                return max(cs, key=lambda c: statistics.median(x.decode for x in results[w][c]))
            b_ours, b_theirs = best(ours), best(theirs)
            print(ratio_line(f"{w}: ours best ({b_ours}) / llama best ({b_theirs})",
                             results[w][b_ours], results[w][b_theirs], 1.3))

    print("greedy text of each drafted run vs its server's plain run (same round):")
    for plain, prefix in (("ours", "ours-"), ("llama", "llama-")):
        if plain not in configs:
            continue
        for c in configs:
            if not c.startswith(prefix):
                continue
            for w in workloads:
                same, total, notes = compare(results[w][plain], results[w][c])
                if total:
                    print(f"  {w:13} {c:12} {same}/{total} texts equal {plain}'s" + notes)
    # NOTE: seen before any drafting worked: two identical --draft none servers gave 2 of 4
    # different texts at 4 streams (which prompts prefill together depends on arrival order).
    print("  (code-edit x4: concurrent batches round differently run to run, so a mismatch "
          "there is not by itself a drafting bug; single-stream ones are)")
    if "ours" in configs and "llama" in configs:
        for w in workloads:
            same, total, _ = compare(results[w]["llama"], results[w]["ours"])
            print(f"  {w:13} ours vs llama (plain): {same}/{total} texts equal (different "
                  f"templates and batching may differ)")


def compare(plain: list[Result], other: list[Result]) -> tuple[int, int, str]:
    """(texts equal, texts compared, where the first mismatch starts)."""
    same = total = 0
    notes = ""
    for a, b in zip(plain, other, strict=False):
        for x, y in zip(a.texts, b.texts, strict=True):
            total += 1
            if x == y:
                same += 1
            elif not notes:
                at = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q),
                          min(len(x), len(y)))
                notes = (f"; first mismatch at char {at} of {len(x)}/{len(y)}: "
                         f"{x[at:at + 40]!r} vs {y[at:at + 40]!r}")
    return same, total, notes


if __name__ == "__main__":
    sys.exit(main())
