"""KV cache types on the real SmolLM2: a q8_0 cache serves the same greedy text as f16 in
about half the KV memory (llama.cpp's own figure, and our estimate of it), the prompt cache
never restores f16 entries into a q8_0 context, and a quantized V cache without flash
attention is a clear load error."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.catalog.gguf_info import read_gguf
from llmserve.config import Settings
from llmserve.engine.base import SamplingParams
from llmserve.engine.llama import LlamaEngine
from llmserve.errors import ModelLoadError
from tests.conftest import SMOL, ServerProcess, require_model, started_server

pytestmark = pytest.mark.real_model

Q8 = {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}
# NOTE: questions with one confident answer: a q8_0 cache changes the logits a little, so
# where the two best tokens are close (a haiku, say) greedy text may part after a few tokens.
QUESTIONS = ["What is the capital of France?", "List three colors.",
             "Explain what a CPU does in two sentences."]


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, LlamaEngine]]:
    path = require_model(SMOL)
    loaded: dict[str, LlamaEngine] = {}
    try:
        for name, kv in (("f16", {}), ("q8_0", Q8)):
            loaded[name] = LlamaEngine.load(path, Settings(n_ctx=8192, n_threads=2, **kv))
        yield loaded
    finally:
        for engine in loaded.values():
            engine.close()


def greedy(engine: LlamaEngine, question: str, n: int = 48) -> str:
    prompt = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    tokens = engine.tokenize(prompt, add_special=False, parse_special=True)
    out = [t for _, (t, _b) in zip(range(n), engine.generate(tokens, SamplingParams(temperature=0)),
                                   strict=False)]
    return engine.detokenize(out)


def test_q8_0_serves_the_same_greedy_text(engines: dict[str, LlamaEngine]) -> None:
    f16 = [greedy(engines["f16"], q) for q in QUESTIONS]
    q8 = [greedy(engines["q8_0"], q) for q in QUESTIONS]
    assert q8 == f16
    assert "Paris" in q8[0]


def test_q8_0_holds_the_kv_in_about_half_the_memory(engines: dict[str, LlamaEngine]) -> None:
    f16, q8 = engines["f16"].info, engines["q8_0"].info
    assert (f16.cache_type_k, f16.cache_type_v, q8.cache_type_k, q8.cache_type_v) == (
        "f16", "f16", "q8_0", "q8_0")
    # a quantized V needs flash attention: llama.cpp turns auto on; on a CPU auto means on too
    assert q8.flash_attn == "on" and f16.flash_attn in ("on", "off")
    assert f16.kv_bytes == 180 << 20  # 8192 cells x 30 layers x 192 x 2 (K, V) x 2 bytes
    assert q8.kv_bytes is not None
    assert abs(q8.kv_bytes / f16.kv_bytes - 34 / 64) < 1e-4
    # the estimate that picks the default n_ctx is llama.cpp's figure
    layout = read_gguf(require_model(SMOL)).kv_layout()
    assert layout is not None
    assert layout.bytes_for(8192, swa_full=True) == f16.kv_bytes
    assert abs(layout.bytes_for(8192, swa_full=True, type_k="q8_0", type_v="q8_0")
               - q8.kv_bytes) < 1 << 14  # llama.cpp logs MiB with two decimals
    # the prompt cache's root: never one key space for two layouts
    assert engines["f16"].fingerprint != engines["q8_0"].fingerprint


def test_quantized_v_without_flash_attention_is_a_load_error() -> None:
    path = require_model(SMOL)
    # what a models.yaml `load: {flash_attn: off}` under --cache_type_v q4_0 plans
    settings = Settings(cache_type_v="q4_0").model_copy(update={"flash_attn": "off"})
    with pytest.raises(ModelLoadError) as info:
        LlamaEngine.load(path, settings)
    assert info.value.message == (
        f"cannot load {SMOL}: --cache_type_v q4_0 needs flash attention, but --flash_attn is "
        "off: use --flash_attn auto (or on), or a V cache of f32, f16, bf16")
    # quantized K alone is fine without it
    engine = LlamaEngine.load(path, Settings(n_ctx=512, n_threads=2, cache_type_k="q8_0",
                                             flash_attn="off"))
    try:
        assert engine.info.flash_attn == "off"
        assert "Paris" in greedy(engine, QUESTIONS[0], 12)
    finally:
        engine.close()


def test_a_models_yaml_combination_llama_cpp_refuses_says_why(tmp_path: Path) -> None:
    require_model(SMOL)
    manifest = tmp_path / "models.yaml"
    manifest.write_text(f"models:\n  smol:\n    path: {SMOL}\n    load: {{flash_attn: off}}\n")
    server = ServerProcess(tmp_path / "refused.log", "--model_name", "smol", "--manifest",
                           str(manifest), "--cache_type_v", "q8_0", "--no_announce")
    try:
        deadline = time.monotonic() + 60
        health: dict[str, Any] = {}
        while time.monotonic() < deadline and not health.get("load_error"):
            time.sleep(0.2)
            try:
                health = httpx.get(f"{server.base_url}/health", timeout=2).json()
            except httpx.HTTPError:
                continue
    finally:
        server.stop()
    assert "--cache_type_v q8_0 needs flash attention, but --flash_attn is off" in (
        health.get("load_error") or ""), server.log()


SYSTEM = "You are a careful assistant. " + " ".join(
    f"Rule {i}: answer questions about topic {i} in one short sentence." for i in range(14))
CONV = [{"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the capital of France?"}]


def _post(server: ServerProcess, route: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{server.base_url}{route}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _chat(server: ServerProcess) -> tuple[str, int]:
    body = _post(server, "/v1/chat/completions",
                 {"messages": CONV, "temperature": 0, "max_tokens": 16})
    return (body["choices"][0]["message"]["content"],
            body["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_the_prompt_cache_never_crosses_kv_types(tmp_path: Path) -> None:
    require_model(SMOL)
    cache = ("--cache_dir", str(tmp_path / "cache"), "--n_ctx", "2048", "--n_threads", "2",
             "--model_name", SMOL, "--no_announce")
    f16 = started_server(tmp_path / "f16.log", *cache)
    try:
        warm = _post(f16, "/restore_cache", {"messages": CONV})
        f16_text, f16_cached = _chat(f16)
    finally:
        f16.stop()
    q8 = started_server(tmp_path / "q8.log", *cache, "--cache_type_k", "q8_0",
                        "--cache_type_v", "q8_0")
    try:
        dry = _post(q8, "/restore_cache", {"messages": CONV, "dry_run": True})
        q8_text, q8_cached = _chat(q8)
        own = _post(q8, "/restore_cache", {"messages": CONV})
        again = _post(q8, "/restore_cache", {"messages": CONV, "dry_run": True})
        health = httpx.get(f"{q8.base_url}/health", timeout=10).json()
    finally:
        q8.stop()
    assert warm["evaluated_tokens"] == warm["prompt_tokens"] > 150
    assert f16_cached > 150  # the f16 server uses its own entries
    # the q8_0 server finds nothing in the f16 entries on disk
    assert dry["cached_tokens"] == 0 and q8_cached == 0
    # ... and its own entries work
    assert own["prompt_tokens"] == warm["prompt_tokens"]
    assert again["cached_tokens"] == again["prompt_tokens"]
    # both serve the right answer, the same greedy text
    assert "Paris" in f16_text and q8_text == f16_text
    assert [(m["cache_type_k"], m["cache_type_v"], m["flash_attn"])
            for m in health["loaded_models"]] == [("q8_0", "q8_0", "on")]
    log = q8.log()
    assert f"{SMOL}: n_ctx 2048 (--n_ctx; trained 8192; KV q8_0 ~0.0 GiB)" in log, log
    assert "(KV q8_0 23.9 MiB, flash_attn on)" in log, log
