"""What a quantized KV cache saves: process RSS after loading a model with each cache type.

Each type loads in a fresh subprocess (LlamaEngine.load, the server's engine, with n_ctx cells
shared by --parallel sequences), so one load's memory never shows in another's figure. Prints
the RSS after load, the KV buffer llama.cpp reports and our estimate of it (the one that picks
the default n_ctx), then each type's ratio to the first. Usage:
    python benchmarks/kv_types.py [--model_name FILE] [--n_ctx 8192] [--types f16 q8_0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def rss_bytes() -> int:
    """This process's resident set (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """Load once with --child's cache type (K and V) and print the figures as JSON."""
    from llmserve.catalog.context import kv_bytes
    from llmserve.catalog.gguf_info import read_gguf
    from llmserve.config import Settings
    from llmserve.engine.llama import LlamaEngine

    path = Path(args.models_dir) / args.model_name
    settings = Settings(n_ctx=args.n_ctx, n_threads=args.n_threads, parallel=args.parallel,
                        cache_type_k=args.child, cache_type_v=args.child)
    before = rss_bytes()
    engine = LlamaEngine.load(path, settings)
    after = rss_bytes()
    layout = read_gguf(path).kv_layout()
    print(json.dumps({
        "type": args.child, "rss_before": before, "rss": after, "kv": engine.info.kv_bytes,
        "estimate": kv_bytes(layout, settings, args.n_ctx) if layout else None,
        "flash_attn": engine.info.flash_attn,
    }))
    engine.close()


def measure(args: argparse.Namespace, kv_type: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kv_type, "--model_name", args.model_name,
           "--models_dir", args.models_dir, "--n_ctx", str(args.n_ctx), "--n_threads",
           str(args.n_threads), "--parallel", str(args.parallel)]
    # NOTE: this checkout's llmserve, whatever the venv's editable install points at
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, timeout=600)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_name", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--models_dir", default=str(ROOT / "models"))
    parser.add_argument("--n_ctx", type=int, default=8192)
    parser.add_argument("--n_threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = [measure(args, t) for t in args.types]
    print(f"{args.model_name}, n_ctx {args.n_ctx}, --parallel {args.parallel}, K and V of "
          "each type")
    print(f"{'type':<7} {'RSS after load':>15} {'KV (llama.cpp)':>15} {'KV (estimate)':>14}  "
          "flash_attn")
    for r in rows:
        kv = f"{r['kv'] / MIB:.1f} MiB" if r["kv"] is not None else "?"
        est = f"{r['estimate'] / MIB:.1f} MiB" if r["estimate"] is not None else "?"
        print(f"{r['type']:<7} {r['rss'] / MIB:>11.1f} MiB {kv:>15} {est:>14}  {r['flash_attn']}")
    base = rows[0]
    for r in rows[1:]:
        line = (f"{r['type']} / {base['type']}: RSS {r['rss'] / base['rss']:.3f} "
                f"({(base['rss'] - r['rss']) / MIB:.1f} MiB less)")
        if r["kv"] and base["kv"]:
            line += (f", KV {r['kv'] / base['kv']:.3f} "
                     f"({(base['kv'] - r['kv']) / MIB:.1f} MiB less)")
        print(line)


if __name__ == "__main__":
    main()
