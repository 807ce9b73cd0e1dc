"""KV cache types and flash attention: llama-server's names to llama.cpp's ids, the checks
llama.cpp makes (so a bad combination is a clear ModelLoadError, not a NULL context), and what
llama.cpp decided, read from its log while a context is created (it has no getter for the
resolved flash attention, nor for the KV buffer's size)."""

from __future__ import annotations

import ctypes
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import llama_cpp
from llama_cpp import _logger as llama_logger

from llmserve.config import (
    CACHE_TYPES,
    FLASH_ATTN,
    UNQUANTIZED_CACHE_TYPES,
    quantized_v_message,
)
from llmserve.errors import ModelLoadError

# NOTE: ggml.h's GGML_TYPE_BF16; llama-cpp-python's bindings name no constant for it
GGML_TYPE_BF16 = 30
# --cache_type_k / --cache_type_v (the set llama-server's -ctk/-ctv accept) -> ggml_type
CACHE_TYPE_IDS: dict[str, int] = {
    "f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16,
    "bf16": GGML_TYPE_BF16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0, "q4_1": llama_cpp.GGML_TYPE_Q4_1,
    "iq4_nl": llama_cpp.GGML_TYPE_IQ4_NL, "q5_0": llama_cpp.GGML_TYPE_Q5_0,
    "q5_1": llama_cpp.GGML_TYPE_Q5_1,
}  # fmt: skip
# --flash_attn (llama-server's -fa) -> llama_flash_attn_type
FLASH_ATTN_IDS: dict[str, int] = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
assert set(CACHE_TYPE_IDS) == set(CACHE_TYPES) and set(FLASH_ATTN_IDS) == set(FLASH_ATTN)

# llama.cpp's log lines (src/llama-context.cpp, llama-kv-cache.cpp) that say what it chose
_FA_ENABLED = re.compile(r"Flash Attention enabled|enabling flash_attn|flash_attn\s+= enabled")
_FA_DISABLED = re.compile(r"Flash Attention not supported|flash_attn\s+= disabled")
_KV_SIZE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB")
_GGML_LOG_ERROR = 4  # ggml_log_level in this llama.cpp (llama-cpp-python's table is older)


def context_types(cache_type_k: str, cache_type_v: str, flash_attn: str) -> tuple[int, int, int]:
    """(type_k, type_v, flash_attn_type) ids for llama_context_params; ModelLoadError for what
    llama.cpp would refuse: an unknown name, or a quantized V cache with flash attention off
    (llama.cpp's V cache is read transposed without it, which quantized blocks cannot be)."""
    try:
        ids = (CACHE_TYPE_IDS[cache_type_k], CACHE_TYPE_IDS[cache_type_v],
               FLASH_ATTN_IDS[flash_attn])
    except KeyError as exc:
        raise ModelLoadError(f"unknown KV cache type or flash_attn value {exc.args[0]!r}: "
                             f"types are {', '.join(CACHE_TYPES)}; flash_attn auto, on, off"
                             ) from None
    if flash_attn == "off" and cache_type_v not in UNQUANTIZED_CACHE_TYPES:
        raise ModelLoadError(quantized_v_message(cache_type_v))
    return ids


@dataclass
class LlamaLog:
    """What llama.cpp logged while a context was created, and what that says."""

    lines: list[tuple[int, str]] = field(default_factory=list)

    def flash_attn(self) -> str | None:
        """"on" or "off" as llama.cpp resolved it (auto included); None if it did not say."""
        last = None
        for _, text in self.lines:  # NOTE: "flash_attn = auto", then how auto resolved
            if _FA_DISABLED.search(text):
                last = "off"
            elif _FA_ENABLED.search(text):
                last = "on"
        return last

    def kv_bytes(self) -> int | None:
        """The KV buffer's size llama.cpp reported (MiB, two decimals; summed over the base
        and sliding-window caches of an iSWA model); None if it did not say."""
        sizes = [float(m.group(1)) for _, t in self.lines if (m := _KV_SIZE.search(t))]
        return round(sum(sizes) * (1 << 20)) if sizes else None

    def errors(self) -> str:
        """llama.cpp's error lines, joined (its reason for a NULL context)."""
        return "; ".join(t.strip() for level, t in self.lines
                         if level == _GGML_LOG_ERROR and t.strip())


_log_lock = threading.Lock()


@contextmanager
def captured_llama_log(verbose: bool) -> Iterator[LlamaLog]:
    """Collect llama.cpp's log for the duration (still printed when verbose), then hand the
    log back to llama-cpp-python's callback. Only the engine thread creates contexts; the
    lock keeps two captures (tests) from restoring each other's callback."""
    log = LlamaLog()

    def collect(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        log.lines.append((level, line))
        if verbose:  # NOTE: as llama-cpp-python's callback shows it when debugging
            sys.stderr.write(line)
            sys.stderr.flush()

    callback = llama_cpp.llama_log_callback(collect)  # NOTE: referenced until restored

    with _log_lock:
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        try:
            yield log
        finally:
            llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
