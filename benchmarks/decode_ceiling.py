"""llama.cpp's own ceiling for N concurrent greedy streams on this machine: no server, no HTTP,
no sampler chain, nothing but llama_decode on one context and an argmax over the logits.

N prompts (the ones benchmarks/concurrency.py sends) are evaluated together in one batch,
each sequence reusing the KV it holds of the previous round's prompt (the servers' prompt
caches hold it too), then each step decodes one token of every stream (n_seq_max N, unified
KV, flash attention auto: the same context as `server.py --parallel N` and `llama-server -np N
--kv-unified`).
Prints the aggregate tokens/s from the start of the prompts to the last token (what
concurrency.py's "aggregate" measures through a server) and the decode-only tokens/s.
A server's aggregate divided by this is the share of the machine's decode speed it reaches;
no server on the same llama.cpp kernels can go above 1.0 (less its HTTP and sampling).

    .venv/bin/python benchmarks/decode_ceiling.py [--streams 4] [--tokens 128] [--rounds 3]
        [--round_offset 0] [--n_threads 2] [--n_ctx 4096] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from concurrency import prompt  # noqa: E402  (the same prompts as the servers get)


def chat_text(llama_cpp: Any, model: Any, user: str) -> bytes:
    """The user turn in the model's own template (the raw text when it has none)."""
    template = llama_cpp.llama_model_chat_template(model, None)
    if not template:
        return user.encode()
    msg = llama_cpp.llama_chat_message(role=b"user", content=user.encode())
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(template, ctypes.byref(msg), 1, True, buf, 4096)
    return buf.raw[:n]


def run(model_path: Path, streams: int, tokens: int, rounds: int, round_offset: int,
        n_threads: int, n_ctx: int) -> list[dict[str, float]]:
    import llama_cpp
    import numpy as np

    llama_cpp.llama_backend_init()
    quiet = llama_cpp.llama_log_callback(lambda *a: None)  # NOTE: kept alive while in use
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(),
                                                 llama_cpp.llama_model_default_params())
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, 512, 512
    params.n_seq_max, params.kv_unified = streams, True
    params.n_threads = params.n_threads_batch = n_threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i: int) -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), (n_vocab,))
        return int(logits.argmax())

    def tokenize(text: bytes) -> list[int]:
        buf = (llama_cpp.llama_token * 1024)()
        n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, 1024, True, True)
        return list(buf[:n])

    mem = llama_cpp.llama_get_memory(ctx)
    held: list[list[int]] = [[] for _ in range(streams)]  # KV each sequence holds

    def prefill(prompts: list[list[int]]) -> list[int]:
        """Evaluate the prompts together, reusing the prefix each sequence's KV already has
        (as both servers do, so the servers' prompt caches are no advantage); the first
        token of each."""
        entries = []
        for s, p in enumerate(prompts):
            keep = 0
            while keep < min(len(p) - 1, len(held[s])) and p[keep] == held[s][keep]:
                keep += 1
            llama_cpp.llama_memory_seq_rm(mem, s, keep, -1)
            entries += [(p[i], i, s, i == len(p) - 1) for i in range(keep, len(p))]
            held[s] = list(p)
        decode(entries)
        return [argmax(i) for i, e in enumerate(entries) if e[3]]

    # NOTE: warm-up (the servers are warm): the first decodes fault the mmapped weights in
    # and size the compute buffers; the KV then holds the previous round's prompts, as the
    # servers' does
    prefill([tokenize(chat_text(llama_cpp, model, prompt(round_offset - 1, s)))
             for s in range(streams)])
    decode([(1, len(held[s]), s, True) for s in range(streams)])
    out = []
    for r in range(rounds):
        prompts = [tokenize(chat_text(llama_cpp, model, prompt(r + round_offset, s)))
                   for s in range(streams)]
        start = time.perf_counter()
        last = prefill(prompts)
        pos = [len(p) for p in prompts]
        first = time.perf_counter()
        for _ in range(tokens - 1):
            decode([(last[s], pos[s], s, True) for s in range(streams)])
            for s in range(streams):
                held[s].append(last[s])
                last[s] = argmax(s)
                pos[s] += 1
        done = time.perf_counter()
        # NOTE: the keys of concurrency.py's burst(): decode is one stream's tokens/s
        out.append({"agg": streams * tokens / (done - start), "ttft": (first - start) * 1000,
                    "decode": (tokens - 1) / (done - first)})
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--models_dir", default=str(ROOT / "models"))
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round_offset", type=int, default=0, help="prompts of this round on")
    ap.add_argument("--n_threads", type=int, default=2)
    ap.add_argument("--n_ctx", type=int, default=4096)
    ap.add_argument("--json", action="store_true", help="one JSON list of rounds on stdout")
    args = ap.parse_args()
    res = run(Path(args.models_dir) / args.model_name, args.streams, args.tokens, args.rounds,
              args.round_offset, args.n_threads, args.n_ctx)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"model {args.model_name}, {args.streams} streams x {args.tokens} tokens, "
          f"{args.n_threads} threads, n_ctx {args.n_ctx}, {args.rounds} rounds")
    print(f"aggregate tok/s (prompts to last token): "
          f"{statistics.median(x['agg'] for x in res):.1f}")
    print(f"decode-only tok/s:                       "
          f"{statistics.median(x['decode'] for x in res) * args.streams:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
