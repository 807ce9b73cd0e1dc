"""Reading a GGUF's weights with llama.cpp's low-level API (the chat model and a draft model)."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
from llama_cpp import _internals

from llmserve.errors import ModelLoadError


def load_weights(path: Path, n_gpu_layers: int, *, verbose: bool,
                 what: str = "") -> _internals.LlamaModel:
    """The model in path, n_gpu_layers offloaded (-1: all); ModelLoadError naming the file
    (and `what` it was loaded as, e.g. "the draft model") when llama.cpp cannot read it."""
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers
    try:
        return _internals.LlamaModel(path_model=str(path), params=params, verbose=verbose)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"cannot load {what + ' ' if what else ''}{path.name}: {exc}") \
            from exc
