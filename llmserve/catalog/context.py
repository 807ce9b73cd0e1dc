"""How big a model's context is, and how many threads run it, when the flags do not say.

Without --n_ctx (or models.yaml `load.n_ctx`) a model gets the context it was trained with
(the GGUF's `<arch>.context_length`), lowered only as far as memory requires: its KV cache (at
the --cache_type_k / --cache_type_v element sizes: q8_0 takes about half of f16) may take at
most half of what is available once the weights are in. Coding agents send 20k+
token prompts; a fixed small default turns every one of them into a 400.

The KV cache is unified (kv_unified): the n_ctx cells are one pool shared by all --parallel
sequences, so the cache's size does not depend on --parallel and one request may use it all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from llmserve.catalog.gguf_info import GGUFInfo, KVLayout
from llmserve.config import Settings

CTX_STEP = 256  # a lowered context is a multiple of this (llama.cpp pads to it anyway)
MIN_AUTO_CTX = 2048  # never lowered below this (or the trained context, if smaller)
FALLBACK_CTX = 4096  # a header that names no trained context
# NOTE: the engine keeps a full-size sliding-window cache (LlamaEngine.load, swa_full) so
# prefixes of Gemma 3 sequences can be kept and copied; its windowed layers cost n_ctx cells.
SWA_FULL = True


def gib(n: int) -> str:
    """Bytes as GiB with one decimal."""
    return f"{n / (1 << 30):.1f}"


@dataclass(frozen=True)
class ContextChoice:
    """An n_ctx and the words the start-up log gives for it."""

    n_ctx: int
    reason: str


def kv_label(type_k: str, type_v: str) -> str:
    """The cache types as the log shows them: "q8_0", or "q8_0/f16" (K/V) when they differ."""
    return type_k if type_k == type_v else f"{type_k}/{type_v}"


def fit_context(
    trained: int | None, kv: KVLayout | None, available: int | None, model_bytes: int, *,
    n_seq: int = 1, n_ubatch: int = 512, swa_full: bool = SWA_FULL, type_k: str = "f16",
    type_v: str = "f16",
) -> ContextChoice:
    """The trained context, lowered to a multiple of CTX_STEP whose KV cache (of K type_k,
    V type_v) fits in half of the memory left after the weights (never below MIN_AUTO_CTX or
    the trained context)."""
    if not trained or trained <= 0:
        return ContextChoice(FALLBACK_CTX, "the GGUF header names no trained context")
    if kv is None or available is None:
        unknown = "KV size" if kv is None else "available memory"
        return ContextChoice(trained, f"trained context; {unknown} unknown")

    def kv_bytes(n: int) -> int:
        return kv.bytes_for(n, swa_full=swa_full, n_seq=n_seq, n_ubatch=n_ubatch,
                            type_k=type_k, type_v=type_v)

    label = kv_label(type_k, type_v)
    usable = max(0, available - model_bytes) // 2
    need = kv_bytes(trained)
    if need <= usable:
        return ContextChoice(trained, f"trained context; KV {label} ~{gib(need)} GiB of "
                                      f"{gib(available)} GiB available")
    floor = min(MIN_AUTO_CTX, trained)
    n = trained // CTX_STEP * CTX_STEP
    while n > floor and kv_bytes(n) > usable:
        n -= CTX_STEP
    n = max(n, floor)
    why = "lowered to fit" if kv_bytes(n) <= usable else "lowered to the minimum; still more than"
    return ContextChoice(
        n, f"trained {trained}, {why} {gib(available)} GiB available; KV {label} "
           f"~{gib(kv_bytes(n))} GiB"
    )  # fmt: skip


@dataclass(frozen=True)
class LoadPlan:
    """The settings a model is loaded with (n_ctx and threads decided; cache types and
    flash_attn as the flags or models.yaml say) and why."""

    settings: Settings
    n_ctx_reason: str
    threads_reason: str

    def summary(self, name: str) -> str:
        """The start-up log line."""
        s = self.settings
        return (
            f"{name}: n_ctx {s.n_ctx} ({self.n_ctx_reason}), shared by --parallel {s.parallel}; "
            f"n_threads {s.n_threads} ({self.threads_reason}), n_threads_batch "
            f"{s.n_threads_batch}; flash_attn {s.flash_attn}"
        )


def plan_load(
    settings: Settings, *, sources: Mapping[str, str], info: GGUFInfo | None,
    model_bytes: int, available: int | None, machine_threads: int,
) -> LoadPlan:
    """Fill in n_ctx and the thread counts where settings leave them None. `sources` names
    where explicit values came from ("--n_ctx", "models.yaml load.n_ctx"), for the log;
    `available` is capped by --memory_budget when that is set."""
    n_ctx_source = sources.get("n_ctx", "--n_ctx")
    trained = info.context_length if info else None
    layout = info.kv_layout() if info else None
    if settings.memory_budget is not None:
        available = min(available, settings.memory_budget) if available else settings.memory_budget
    if settings.n_ctx is None:
        choice = fit_context(trained, layout, available, model_bytes, n_seq=settings.parallel,
                             n_ubatch=settings.n_batch, type_k=settings.cache_type_k,
                             type_v=settings.cache_type_v)
    else:
        if settings.n_ctx == 0:
            n_ctx, why = trained or FALLBACK_CTX, f"{n_ctx_source} 0: the trained context"
        else:
            n_ctx, why = settings.n_ctx, f"{n_ctx_source}; trained {trained or 'unknown'}"
        if layout is not None:
            kv = kv_bytes(layout, settings, n_ctx)
            why += f"; KV {kv_label(settings.cache_type_k, settings.cache_type_v)} ~{gib(kv)} GiB"
        choice = ContextChoice(n_ctx, why)
    threads = settings.n_threads or machine_threads
    plan = settings.model_copy(update={
        "n_ctx": choice.n_ctx, "n_threads": threads,
        "n_threads_batch": settings.n_threads_batch or threads,
    })  # fmt: skip
    return LoadPlan(plan, choice.reason,
                    sources.get("n_threads", "--n_threads") if settings.n_threads
                    else "physical cores")


def kv_bytes(layout: KVLayout, settings: Settings, n_ctx: int) -> int:
    """The KV cache's bytes for n_ctx cells with settings' cache types, --parallel and
    --n_batch (the footprint --memory_budget counts, and the log's estimate)."""
    return layout.bytes_for(n_ctx, swa_full=SWA_FULL, n_seq=settings.parallel,
                            n_ubatch=settings.n_batch, type_k=settings.cache_type_k,
                            type_v=settings.cache_type_v)
