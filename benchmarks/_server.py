"""Start `server.py` (or another server) on a free loopback port for a benchmark, wait for it,
stop it by PID; and read OpenAI SSE chunks."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(cmd: list[str], port: int, name: str, **popen: Any) -> Iterator[str]:
    """Run cmd (a server listening on port), wait for /health 200, yield its base URL;
    stop it by PID. A server that exits first raises with the tail of its log."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **popen)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(1200):
                if proc.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            else:
                raise RuntimeError(f"{name} did not become healthy in 120 s")
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def running_server(*args: str) -> Iterator[str]:
    """Yield the base URL of `python server.py --port <free> --log-level warning *args`."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "server.py"), "--port", str(port), "--log-level",
           "warning", "--no_announce", *args]
    with running(cmd, port, "server.py", cwd=ROOT) as base:
        yield base


def sse_chunks(resp: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON chunks of an OpenAI SSE response, up to `[DONE]`."""
    resp.raise_for_status()
    for line in resp.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])
