"""KV cache types and flash attention without a model: flags, env, models.yaml, the plan and
its memory estimate, the llama-server child's arguments, llama.cpp's ids and log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmserve.backends.llama_server import LlamaServerBackend
from llmserve.catalog.context import fit_context, plan_load
from llmserve.catalog.gguf_info import KVLayout, kv_type_bytes, kv_type_size, read_gguf
from llmserve.catalog.manifest import ManifestError, parse_manifest
from llmserve.cli import _settings, build_parser
from llmserve.config import CACHE_TYPES, Settings
from tests.ggufgen import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
# SmolLM2-135M: 30 layers x 3 kv heads x 64, K and V each
SMOL = KVLayout(full_k=30 * 3 * 64, full_v=30 * 3 * 64)


# --- settings ---------------------------------------------------------------------------------


def test_defaults_flags_env_and_spellings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert (s.cache_type_k, s.cache_type_v, s.flash_attn) == ("f16", "f16", "auto")
    monkeypatch.setenv("LLMSERVE_CACHE_TYPE_V", "Q4_0")
    monkeypatch.setenv("LLMSERVE_FLASH_ATTN", "on")
    args = build_parser().parse_args(["serve", "--cache-type-k", "Q8_0", "--flash_attn", "AUTO"])
    s = _settings(args)
    # flags over env, env over defaults; ggml's upper-case names accepted
    assert (s.cache_type_k, s.cache_type_v, s.flash_attn) == ("q8_0", "q4_0", "auto")
    assert {"cache_type_k", "cache_type_v", "flash_attn"} <= s.model_fields_set


@pytest.mark.parametrize("name", CACHE_TYPES)
def test_every_llama_server_cache_type_is_accepted(name: str) -> None:
    assert Settings(cache_type_k=name, cache_type_v=name).cache_type_v == name


@pytest.mark.parametrize(("args", "words"), [
    (["--cache_type_k", "q3_k"], "invalid choice: 'q3_k'"),
    (["--flash_attn", "yes"], "invalid choice: 'yes'"),
    (["--cache_type_v", "q8_0", "--flash_attn", "off"],
     "--cache_type_v q8_0 needs flash attention, but --flash_attn is off"),
])  # fmt: skip
def test_invalid_values_stop_the_start(args: list[str], words: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "llmserve", "serve", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr


def test_invalid_env_values_are_settings_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSERVE_CACHE_TYPE_K", "q2_k")
    with pytest.raises(ValueError, match="cache_type_k"):
        Settings()
    monkeypatch.setenv("LLMSERVE_CACHE_TYPE_K", "f16")
    monkeypatch.setenv("LLMSERVE_CACHE_TYPE_V", "iq4_nl")
    monkeypatch.setenv("LLMSERVE_FLASH_ATTN", "off")
    with pytest.raises(ValueError, match="needs flash attention"):
        Settings()
    monkeypatch.setenv("LLMSERVE_CACHE_TYPE_V", "bf16")  # not quantized: fine without it
    assert Settings().flash_attn == "off"


# --- models.yaml ------------------------------------------------------------------------------


def test_models_yaml_load_keys() -> None:
    text = ("models:\n  a:\n    path: a.gguf\n"
            "    load: {cache_type_k: Q8_0, cache_type_v: q4_0, flash_attn: on}\n"
            "  b:\n    path: b.gguf\n    load:\n      flash_attn: off\n")
    specs = parse_manifest(text, Path("models.yaml"))
    # NOTE: bare on/off are YAML booleans; they mean -fa on/off
    assert specs["a"].load == {"cache_type_k": "q8_0", "cache_type_v": "q4_0", "flash_attn": "on"}
    assert specs["b"].load == {"flash_attn": "off"}


@pytest.mark.parametrize(("load", "line", "field", "words"), [
    ("      cache_type_k: q3_k\n", 5, "models.a.load.cache_type_k", "'q8_0'"),
    ("      n_ctx: 2048\n      cache_type_v: fp8\n", 6, "models.a.load.cache_type_v",
     "(got 'fp8')"),
    ("      flash_attn: sometimes\n", 5, "models.a.load.flash_attn", "'auto', 'on' or 'off'"),
])  # fmt: skip
def test_models_yaml_bad_values_name_their_line(load: str, line: int, field: str,
                                                words: str) -> None:
    text = "models:\n  a:\n    path: a.gguf\n    load:\n" + load
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, Path("models.yaml"))
    (message,) = info.value.lines()
    assert message.startswith(f"models.yaml:{line}: {field}: ") and words in message, message


# --- estimates and the plan -------------------------------------------------------------------


def test_type_sizes() -> None:
    assert kv_type_size("f16") == (1, 2) and kv_type_size("f32") == (1, 4)
    assert kv_type_size("bf16") == (1, 2)
    assert kv_type_size("q8_0") == (32, 34) and kv_type_size("q4_0") == (32, 18)
    assert kv_type_size("q4_1") == (32, 20) and kv_type_size("iq4_nl") == (32, 18)
    assert kv_type_size("q5_0") == (32, 22) and kv_type_size("q5_1") == (32, 24)
    assert kv_type_bytes(64, "q8_0") == 68 and kv_type_bytes(64, "f16") == 128
    assert kv_type_bytes(33, "q4_0") == 36  # whole blocks


def test_kv_bytes_scale_with_the_types() -> None:
    f16 = SMOL.bytes_for(8192, swa_full=True)
    assert f16 == 180 << 20  # llama.cpp: "size = 180.00 MiB ... K (f16): 90.00 MiB"
    q8 = SMOL.bytes_for(8192, swa_full=True, type_k="q8_0", type_v="q8_0")
    assert q8 == f16 * 34 // 64  # llama.cpp: 95.62 MiB
    mixed = SMOL.bytes_for(8192, swa_full=True, type_k="q8_0", type_v="f16")
    assert mixed == f16 // 2 + f16 * 34 // 128  # llama.cpp: 137.81 MiB
    assert SMOL.bytes_for(8192, swa_full=True, type_k="f32", type_v="f32") == 2 * f16
    q4 = SMOL.bytes_for(8192, swa_full=True, type_k="q4_0", type_v="q4_0")
    assert q4 == f16 * 18 // 64  # llama.cpp: 50.62 MiB


def test_sliding_window_layers_scale_too() -> None:
    gemma = KVLayout(full_k=768, full_v=768, swa_k=3840, swa_v=3840, window=512)
    f16 = gemma.bytes_for(32768, swa_full=False, n_seq=4)
    q8 = gemma.bytes_for(32768, swa_full=False, n_seq=4, type_k="q8_0", type_v="q8_0")
    assert q8 == f16 * 34 // 64


def test_q8_0_fits_about_twice_the_context() -> None:
    layout = KVLayout(full_k=32 * 8 * 128, full_v=32 * 8 * 128)  # 8B-class, 128k trained
    f16 = fit_context(131072, layout, 12 * GIB, 5 * GIB)
    q8 = fit_context(131072, layout, 12 * GIB, 5 * GIB, type_k="q8_0", type_v="q8_0")
    assert f16.n_ctx == 28672 and "KV f16 ~3.5 GiB" in f16.reason
    assert 1.85 < q8.n_ctx / f16.n_ctx < 1.9  # 64/34 = 1.88
    assert q8.reason.startswith("trained 131072, lowered to fit 12.0 GiB available; KV q8_0 ~")
    mixed = fit_context(131072, layout, 12 * GIB, 5 * GIB, type_k="q8_0")
    assert "KV q8_0/f16 ~" in mixed.reason and f16.n_ctx < mixed.n_ctx < q8.n_ctx


def _plan(settings: Settings, tmp_path: Path, **kw: Any) -> Any:
    info = read_gguf(tiny_llama(tmp_path / "t.gguf"))  # trained 4096; 2 x 2 x 16, K and V
    args: dict[str, Any] = {"sources": {}, "info": info, "model_bytes": 0,
                            "available": 16 * GIB, "machine_threads": 2, **kw}
    return plan_load(settings, **args)


def test_the_plan_and_its_log_line(tmp_path: Path) -> None:
    auto = _plan(Settings(cache_type_k="q8_0", cache_type_v="q8_0"), tmp_path)
    assert auto.summary("t.gguf") == (
        "t.gguf: n_ctx 4096 (trained context; KV q8_0 ~0.0 GiB of 16.0 GiB available), shared "
        "by --parallel 4; n_threads 2 (physical cores), n_threads_batch 2; flash_attn auto")
    # 1 MiB: half holds 2048 f16 tokens of 256 bytes, or 3840 (a multiple of 256) of 136
    budget = _plan(Settings(memory_budget=1 << 20), tmp_path)
    q8 = _plan(Settings(memory_budget=1 << 20, cache_type_k="q8_0", cache_type_v="q8_0"),
               tmp_path)
    assert (budget.settings.n_ctx, q8.settings.n_ctx) == (2048, 3840)
    flags = _plan(Settings(n_ctx=8192, cache_type_k="q4_0", flash_attn="off"), tmp_path,
                  sources={"n_ctx": "--n_ctx"})
    assert flags.n_ctx_reason == "--n_ctx; trained 4096; KV q4_0/f16 ~0.0 GiB"
    assert flags.summary("t.gguf").endswith("; flash_attn off")


def test_the_footprint_uses_the_types(tmp_path: Path) -> None:
    from llmserve.catalog.registry import ModelManager
    from llmserve.scheduler import Scheduler

    models = tmp_path / "models"
    models.mkdir()
    tiny_llama(models / "t.gguf")
    (models / "models.yaml").write_text(
        "models:\n  t:\n    path: t.gguf\n    load: {n_ctx: 4096, cache_type_v: q8_0}\n")
    size = (models / "t.gguf").stat().st_size

    def footprint(**kw: Any) -> int:
        manager = ModelManager(Settings(models_dir=models, **kw), lambda p, s: None,  # type: ignore[arg-type,return-value]
                               Scheduler())
        return manager._footprint("t.gguf", manager.plan("t.gguf")) - size

    assert footprint(cache_type_v="f16") == 4096 * 256  # the flag wins over models.yaml
    assert footprint() == 4096 * (128 + 68)  # models.yaml's V type under the default K
    assert footprint(cache_type_k="q4_0") == 4096 * (36 + 68)


# --- the llama-server child -------------------------------------------------------------------


CHILD = """models:
  child:
    path: alpha.gguf
    backend: llama_server
    load: {n_ctx: 512%s}
"""


def _command(load: str = "", **settings: Any) -> list[str]:
    spec = parse_manifest(CHILD % load, Path("models.yaml"))["child"]
    backend = LlamaServerBackend(spec, Settings(**settings), pool=None)  # type: ignore[arg-type]
    return backend.command(Path("/bin/llama-server"), 9999)


def _kv_args(cmd: list[str]) -> list[str]:
    return [a for i, a in enumerate(cmd) if a in ("-ctk", "-ctv", "-fa")
            or cmd[i - 1] in ("-ctk", "-ctv", "-fa")]


def test_llama_server_gets_the_kv_settings_when_set() -> None:
    assert _kv_args(_command()) == []  # llama-server's defaults are ours
    assert _kv_args(_command(cache_type_k="q8_0", cache_type_v="q8_0")) == [
        "-ctk", "q8_0", "-ctv", "q8_0"]
    assert _kv_args(_command(", cache_type_v: q4_0, flash_attn: on", flash_attn="auto")) == [
        "-ctv", "q4_0", "-fa", "auto"]  # the flag over models.yaml
    assert _kv_args(_command(", flash_attn: off")) == ["-fa", "off"]


# --- the engine's mapping (llama_cpp, no model) -----------------------------------------------


def test_names_map_to_llama_cpp_ids() -> None:
    import llama_cpp

    from llmserve.engine.kvtypes import CACHE_TYPE_IDS, context_types
    from llmserve.errors import ModelLoadError

    assert set(CACHE_TYPE_IDS) == set(CACHE_TYPES)
    assert context_types("q8_0", "f16", "off") == (
        llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_F16, llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    assert context_types("bf16", "iq4_nl", "on") == (
        30, llama_cpp.GGML_TYPE_IQ4_NL, llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED)
    assert context_types("f16", "f16", "auto")[2] == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    with pytest.raises(ModelLoadError, match="needs flash attention"):
        context_types("f16", "q5_0", "off")
    with pytest.raises(ModelLoadError, match="unknown KV cache type"):
        context_types("q2_k", "f16", "auto")


def test_what_llama_cpp_logged() -> None:
    from llmserve.engine.kvtypes import LlamaLog

    auto = LlamaLog([(2, "llama_context: flash_attn            = auto\n"),
                     (2, "llama_kv_cache: size =  180.00 MiB (  8192 cells,  30 layers,  4/1 "
                         "seqs), K (f16):   90.00 MiB, V (f16):   90.00 MiB\n"),
                     (2, "resolve_fused_ops: Flash Attention enabled\n")])
    assert (auto.flash_attn(), auto.kv_bytes()) == ("on", 180 << 20)
    cpu_less = LlamaLog([(2, "llama_context: flash_attn            = auto\n"),
                         (3, "resolve_fused_ops: Flash Attention not supported, set to "
                             "disabled\n")])
    assert (cpu_less.flash_attn(), cpu_less.kv_bytes()) == ("off", None)
    forced = LlamaLog([(2, "llama_init_from_model: enabling flash_attn since it is required "
                           "for quantized V cache\n"),
                       (2, "llama_kv_cache: size =   95.62 MiB\n"),
                       (2, "llama_kv_cache: size =   10.00 MiB\n")])  # iSWA: two caches
    assert (forced.flash_attn(), forced.kv_bytes()) == ("on", round(105.62 * (1 << 20)))
    failed = LlamaLog([(4, "llama_init_from_model: V cache type q4_0 with block size 32 does "
                           "not divide n_embd_head_v=40\n")])
    assert failed.errors().startswith("llama_init_from_model: V cache type q4_0")
    assert LlamaLog().flash_attn() is None
