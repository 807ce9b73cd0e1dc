"""The context default on the real GGUFs: each model runs with its trained context unless
--n_ctx says otherwise, and /health, /v1/models and the start-up log say so."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from llmserve.hardware import machine_threads
from tests.conftest import GEMMA, SMOL, require_model, started_server

NO_DRAFT = {"draft": "none", "draft_model": None, "draft_max": 16, "draft_min": 0}

pytestmark = pytest.mark.real_model


def _models(base: str) -> list[dict[str, object]]:
    return list(httpx.get(f"{base}/v1/models", timeout=10).json()["data"])


def test_without_n_ctx_each_model_gets_its_trained_context(tmp_path: Path) -> None:
    require_model(GEMMA)
    require_model(SMOL)
    server = started_server(tmp_path / "auto.log", "--model_name", GEMMA, "--no_announce",
                            "--prompt_cache", "ram")
    try:
        base = server.base_url
        health = httpx.get(f"{base}/health", timeout=10).json()
        models = _models(base)
        # a prompt the old 4096 default refused with a 400 (Gemma: quicker to prefill here
        # than SmolLM2's Q4_1)
        long = httpx.post(f"{base}/v1/completions", timeout=300,
                          json={"prompt": "one two three four " * 1030, "max_tokens": 1})
        switched = httpx.post(f"{base}/setModel", json={"modelName": SMOL}, timeout=120)
        after = httpx.get(f"{base}/health", timeout=10).json()
        log = server.log()
    finally:
        server.stop()
    threads = machine_threads()
    assert health["n_ctx"] == 32768
    assert health["loaded_models"] == [{"model": GEMMA, "n_ctx": 32768, "n_threads": threads,
                                        "n_threads_batch": threads, "parallel": 4,
                                        "cache_type_k": "f16", "cache_type_v": "f16",
                                        "flash_attn": "on",  # auto, as llama.cpp resolved it
                                        **NO_DRAFT}]
    by_id = {m["id"]: m for m in models}
    assert models[0]["id"] == GEMMA
    assert by_id[GEMMA]["context_length"] == 32768 and by_id[GEMMA]["meta"] == {
        "n_ctx_train": 32768, "n_params": by_id[GEMMA]["meta"]["n_params"],  # type: ignore[index]
        "n_embd": 640, "size": (require_model(GEMMA)).stat().st_size}
    assert by_id[SMOL]["context_length"] == 8192 and by_id[SMOL]["loaded"] is False
    assert long.status_code == 200, long.text
    assert long.json()["usage"]["prompt_tokens"] > 4096
    assert switched.status_code == 200 and after["n_ctx"] == 8192
    assert re.search(rf"{GEMMA}: n_ctx 32768 \(trained context; KV f16 ~0\.6 GiB of [\d.]+ GiB "
                     rf"available\), shared by --parallel 4; n_threads {threads} \(physical "
                     rf"cores\), n_threads_batch {threads}", log), log
    assert re.search(rf"{SMOL}: n_ctx 8192 \(trained context; KV f16 ~0\.2 GiB", log), log
    assert f"loaded {SMOL} in " in log and "(KV f16 180.0 MiB, flash_attn on)" in log, log


def test_n_ctx_overrides(tmp_path: Path) -> None:
    require_model(SMOL)
    server = started_server(tmp_path / "flag.log", "--model_name", SMOL, "--n_ctx", "2048",
                            "--n_threads", "1", "--no_announce")
    try:
        health = httpx.get(f"{server.base_url}/health", timeout=10).json()
        by_id = {m["id"]: m for m in _models(server.base_url)}
        log = server.log()
    finally:
        server.stop()
    assert health["n_ctx"] == 2048
    assert health["loaded_models"][0]["n_threads"] == 1
    assert by_id[SMOL]["context_length"] == 2048
    assert by_id[SMOL]["meta"]["n_ctx_train"] == 8192  # type: ignore[index]
    assert by_id[GEMMA]["context_length"] == 2048  # what it would run with
    assert f"{SMOL}: n_ctx 2048 (--n_ctx; trained 8192; KV f16 ~0.0 GiB)" in log
    assert "n_threads 1 (--n_threads), n_threads_batch 1" in log


def test_the_embedding_context_grows_with_the_inputs(caplog: pytest.LogCaptureFixture) -> None:
    import math

    from llmserve.config import Settings
    from llmserve.engine.llama import LlamaEngine

    engine = LlamaEngine.load(require_model(SMOL), Settings(n_ctx=4096, n_threads=2))
    try:
        short = engine.tokenize("The cat sat on the mat.", add_special=True,
                                parse_special=False)
        long = engine.tokenize("word " * 700, add_special=True, parse_special=False)
        with caplog.at_level("INFO", logger="llmserve.engine.llama"):
            first = engine.embed([short])[0]
            grown = engine.embed([long, short])
            again = engine.embed([short])[0]
    finally:
        engine.close()
    sizes = [int(m) for m in re.findall(r"embedding context for \S+ \(n_ctx (\d+)\)",
                                        caplog.text)]
    # NOTE: not the chat n_ctx up front: its compute buffer grows with n_ctx squared
    assert sizes == [512, 1024]
    assert len(grown) == 2 and len(grown[0]) == 576
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(first, grown[1], strict=True))
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(first, again, strict=True))
