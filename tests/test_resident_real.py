"""Several resident models on the real GGUFs: no-reload switching, eviction, freeing memory."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GEMMA, MODELS_DIR, SMOL, ServerProcess, require_model

pytestmark = pytest.mark.real_model

ASK = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def two_model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server that keeps both test models resident, addressed by their catalog aliases."""
    require_model(SMOL)
    require_model(GEMMA)
    log = tmp_path_factory.mktemp("resident") / "server.log"
    server = ServerProcess(
        log, "--model_name", "smollm2-135m", "--n_ctx", "2048", "--n_threads", "2",
        "--max_loaded_models", "2",
    )  # fmt: skip
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def chat(server: ServerProcess, model: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": ASK, "temperature": 0, "max_tokens": 12, **extra}
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def loaded(server: ServerProcess) -> list[str]:
    return list(httpx.get(f"{server.base_url}/models", timeout=30).json()["loaded"])


def load_count(server: ServerProcess, filename: str) -> int:
    return server.log().count(f"loaded {filename} in")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_switching_between_resident_models_does_not_reload(two_model_server: ServerProcess) -> None:
    first = chat(two_model_server, "smollm2-135m")
    gemma = chat(two_model_server, "gemma3-270m")
    again = chat(two_model_server, "smollm2-135m")
    chat(two_model_server, GEMMA)

    assert first["model"] == again["model"] == SMOL and gemma["model"] == GEMMA
    # the resident model's state survives the other model's use: same greedy output
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert gemma["choices"][0]["message"]["content"]
    assert sorted(loaded(two_model_server)) == sorted([SMOL, GEMMA])
    assert load_count(two_model_server, SMOL) == 1
    assert load_count(two_model_server, GEMMA) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_unloading_frees_the_memory(two_model_server: ServerProcess) -> None:
    pid = two_model_server.proc.pid
    chat(two_model_server, "gemma3-270m")  # resident, its weights touched
    with_gemma = rss_bytes(pid)

    chat(two_model_server, "gemma3-270m", keep_alive=0)  # unloaded when the request ends
    # NOTE: the response goes out before the job ends (the prompt cache saves after it)
    deadline = time.monotonic() + 30
    while loaded(two_model_server) != [SMOL] and time.monotonic() < deadline:
        time.sleep(0.05)
    without = rss_bytes(pid)

    gemma_file = (MODELS_DIR / GEMMA).stat().st_size
    assert loaded(two_model_server) == [SMOL]
    freed = with_gemma - without
    print(f"RSS with gemma {with_gemma >> 20} MiB, after unload {without >> 20} MiB, "
          f"freed {freed >> 20} MiB (file {gemma_file >> 20} MiB)")  # fmt: skip
    assert freed > gemma_file // 2
    reloads = load_count(two_model_server, GEMMA)
    chat(two_model_server, "gemma3-270m")
    assert load_count(two_model_server, GEMMA) == reloads + 1  # it really was gone


def test_one_resident_model_evicts_the_other(smol_server: ServerProcess) -> None:
    chat(smol_server, "gemma3-270m")
    after_gemma = loaded(smol_server)
    chat(smol_server, "smollm2-135m")
    after_smol = loaded(smol_server)

    assert after_gemma == [GEMMA]
    assert after_smol == [SMOL]
    status = httpx.get(f"{smol_server.base_url}/", timeout=10).json()
    assert status["model"] == SMOL
