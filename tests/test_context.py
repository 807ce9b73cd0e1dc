"""The context and thread defaults (catalog/context.py) and the KV estimate behind them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmserve.catalog.context import MIN_AUTO_CTX, fit_context, plan_load
from llmserve.catalog.gguf_info import KVLayout, read_gguf
from llmserve.config import Settings
from tests.conftest import GEMMA, SMOL, require_model
from tests.ggufgen import tiny_llama, write_gguf

GIB = 1 << 30
# A 128k-context 8B-class model: 32 layers x 8 kv heads x 128 elements, K and V each; f16:
# 32 x 8 x 256 x 2 bytes = 128 KiB per token
LLAMA8B = KVLayout(full_k=32 * 8 * 128, full_v=32 * 8 * 128)
# Gemma 3 270M: 18 layers, every 6th global; 1 kv head x 256 elements, K and V each
GEMMA3 = KVLayout(full_k=3 * 256, full_v=3 * 256, swa_k=15 * 256, swa_v=15 * 256, window=512)


def test_the_trained_context_when_it_fits() -> None:
    choice = fit_context(32768, KVLayout(4608, 4608), 20 * GIB, 250 << 20)
    assert choice.n_ctx == 32768
    assert choice.reason == "trained context; KV f16 ~0.6 GiB of 20.0 GiB available"


@pytest.mark.parametrize("available", [8 * GIB, 12 * GIB, 20 * GIB])
def test_lowered_to_a_multiple_of_256_that_fits_half_the_memory_left(available: int) -> None:
    model = 5 * GIB
    choice = fit_context(131072, LLAMA8B, available, model)
    usable = (available - model) // 2
    assert choice.n_ctx % 256 == 0 and choice.n_ctx < 131072
    assert LLAMA8B.bytes_for(choice.n_ctx, swa_full=True) <= usable
    assert LLAMA8B.bytes_for(choice.n_ctx + 256, swa_full=True) > usable  # the largest
    assert choice.reason.startswith(f"trained 131072, lowered to fit {available / GIB:.1f} GiB")


def test_never_below_the_minimum_or_above_the_trained_context() -> None:
    starved = fit_context(131072, LLAMA8B, 5 * GIB, 5 * GIB)
    assert starved.n_ctx == MIN_AUTO_CTX and "minimum" in starved.reason
    small = fit_context(1024, LLAMA8B, 0, 0)
    assert small.n_ctx == 1024


def test_unknowns() -> None:
    assert fit_context(None, LLAMA8B, GIB, 0).n_ctx == 4096
    assert fit_context(65536, None, GIB, 0).n_ctx == 65536  # no shape: the trained context
    unknown = fit_context(65536, LLAMA8B, None, 0)
    assert unknown.reason == "trained context; available memory unknown"


def test_sliding_window_layers_hold_the_window_unless_swa_full() -> None:
    gemma = GEMMA3
    assert gemma.bytes_for(32768, swa_full=True) == 18 * 1024 * 32768
    # llama_kv_cache_iswa: n_swa * n_seq + n_ubatch cells on the windowed layers
    assert gemma.bytes_for(32768, swa_full=False, n_seq=4, n_ubatch=512) == (
        3 * 1024 * 32768 + 15 * 1024 * (512 * 4 + 512))
    lean = fit_context(131072, gemma, 2 * GIB, 0, swa_full=False, n_seq=1)
    full = fit_context(131072, gemma, 2 * GIB, 0, swa_full=True)
    assert lean.n_ctx > full.n_ctx


def test_kv_layout_from_the_real_headers() -> None:
    gemma = read_gguf(require_model(GEMMA)).kv_layout()
    smol = read_gguf(require_model(SMOL)).kv_layout()
    assert gemma == GEMMA3
    assert smol == KVLayout(full_k=30 * 3 * 64, full_v=30 * 3 * 64)  # 30 layers, 3 kv heads
    assert (gemma.full_bytes, gemma.swa_bytes, smol.full_bytes) == (3072, 15360, 23040)  # f16


def test_kv_layout_per_layer_heads_and_pattern_arrays(tmp_path: Path) -> None:
    meta: dict[str, Any] = {
        "general.architecture": "hybrid", "hybrid.block_count": 4,
        "hybrid.embedding_length": 64, "hybrid.attention.head_count": 4,
        "hybrid.attention.head_count_kv": [2, 0, 2, 1],  # 0: a layer without attention
        "hybrid.attention.sliding_window": 128,
        "hybrid.attention.sliding_window_pattern": [True, False, False, True],
    }  # fmt: skip
    layout = read_gguf(write_gguf(tmp_path / "h.gguf", meta)).kv_layout()
    assert layout == KVLayout(full_k=2 * 16, full_v=2 * 16, swa_k=3 * 16, swa_v=3 * 16,
                              window=128)


def _plan(settings: Settings, tmp_path: Path, **kw: Any) -> Any:
    info = read_gguf(tiny_llama(tmp_path / "t.gguf"))  # trained 4096, 256 B/token
    args: dict[str, Any] = {"sources": {}, "info": info, "model_bytes": 0,
                            "available": 16 * GIB, "machine_threads": 6, **kw}
    return plan_load(settings, **args)


def test_plan_defaults_and_overrides(tmp_path: Path) -> None:
    auto = _plan(Settings(), tmp_path)
    assert (auto.settings.n_ctx, auto.settings.n_threads, auto.settings.n_threads_batch) == (
        4096, 6, 6)
    assert auto.threads_reason == "physical cores"
    assert auto.summary("t.gguf") == (
        "t.gguf: n_ctx 4096 (trained context; KV f16 ~0.0 GiB of 16.0 GiB available), shared "
        "by --parallel 4; n_threads 6 (physical cores), n_threads_batch 6; flash_attn auto")
    flags = _plan(Settings(n_ctx=2048, n_threads=3), tmp_path,
                  sources={"n_ctx": "--n_ctx", "n_threads": "--n_threads"})
    assert (flags.settings.n_ctx, flags.settings.n_threads_batch) == (2048, 3)
    assert flags.n_ctx_reason == "--n_ctx; trained 4096; KV f16 ~0.0 GiB"
    zero = _plan(Settings(n_ctx=0, n_threads_batch=5), tmp_path, sources={"n_ctx": "--n_ctx"})
    assert (zero.settings.n_ctx, zero.settings.n_threads, zero.settings.n_threads_batch) == (
        4096, 6, 5)


def test_plan_respects_the_memory_budget(tmp_path: Path) -> None:
    info = read_gguf(tiny_llama(tmp_path / "t.gguf"))
    per_token = info.kv_bytes_per_token()
    assert per_token == 256
    # half of a 1 MiB budget holds 2048 tokens of 256 bytes; the machine has plenty
    plan = _plan(Settings(memory_budget=1 << 20), tmp_path)
    assert plan.settings.n_ctx == 2048
    assert plan.n_ctx_reason.startswith("trained 4096, lowered to fit 0.0 GiB available")
