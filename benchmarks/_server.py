"""Start `server.py` on a free loopback port for a benchmark, and stop it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def running_server(*args: str) -> Iterator[str]:
    """Yield the base URL of `python server.py --port <free> --log-level warning *args`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "server.py"), "--port", str(port), "--log-level", "warning",
         "--no_announce", *args],
        cwd=ROOT, stdout=subprocess.DEVNULL,  # LlamaDiskCache prints every call
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)
