"""Embeddings beside streams on the real GGUFs (issue 20): a chat model's input is evaluated
in chunks, one engine call each, and its mean equals llama.cpp's mean pooling."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest

from llmserve.config import Settings
from tests.conftest import GEMMA, SMOL, ServerProcess, require_model

pytestmark = pytest.mark.real_model


def _llama_mean(engine: Any, tokens: list[int]) -> np.ndarray:
    """llama.cpp's own mean pooling of tokens, in one micro-batch."""
    import llama_cpp
    from llama_cpp import _internals

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 1024
    params.embeddings = True
    params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    params.n_threads = params.n_threads_batch = 2
    ctx = _internals.LlamaContext(model=engine._model, params=params, verbose=False)
    batch = _internals.LlamaBatch(n_tokens=1024, embd=0, n_seq_max=1, verbose=False)
    try:
        batch.add_sequence(tokens, 0, True)
        ctx.decode(batch)
        ptr = llama_cpp.llama_get_embeddings_seq(ctx.ctx, 0)
        return np.array(ptr[: engine.info.n_embd], dtype=np.float64)
    finally:
        batch.close()
        ctx.close()


@pytest.mark.parametrize("model", [SMOL, GEMMA])
def test_chunked_mean_equals_llama_mean_pooling(model: str) -> None:
    from llmserve.engine.llama import LlamaEngine

    engine = LlamaEngine.load(require_model(model), Settings(n_ctx=2048, n_threads=2))
    try:
        tokens = engine.tokenize("The harbour master logs every ship that arrives. " * 60,
                                 add_special=True, parse_special=False)
        assert 500 < len(tokens) < 1024
        session = engine.embed_session(tokens)
        steps = 1
        while not session.step():
            steps += 1
        assert steps > 1  # evaluated in pieces, not one call
        got = np.array(session.vector)
        want = _llama_mean(engine, tokens)
        cosine = got @ want / np.linalg.norm(got) / np.linalg.norm(want)
        assert cosine > 0.9999
        assert engine.embed([tokens]) == [session.vector]  # the same through embed()
    finally:
        engine.close()


def test_a_stream_goes_on_while_embeddings_run(smol_server: ServerProcess) -> None:
    """Two ~700-token embeddings sent beside a stream: the stream goes on while they run (a
    token per chunk at least; it used to wait for each whole input), /health answers 200
    throughout, and the vectors equal the ones computed with nothing beside them."""
    base = smol_server.base_url
    texts = [" ".join(f"crate {i}-{j} goes to dock {j % 7}" for j in range(100))
             for i in range(2)]
    alone = httpx.post(f"{base}/v1/embeddings", json={"input": texts, "encoding_format":
                                                      "float"}, timeout=300).json()
    done: dict[str, float] = {}
    stamps: list[float] = []
    codes: list[int] = []
    stop = threading.Event()

    def stream() -> None:
        body = {"messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body,
                          timeout=300) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if '"content":' in line:
                    stamps.append(time.monotonic())

    def embeddings() -> None:
        time.sleep(1.0)  # NOTE: the stream is under way
        done["start"] = time.monotonic()
        resp = httpx.post(f"{base}/v1/embeddings", json={"input": texts,
                                                        "encoding_format": "float"},
                          timeout=300)
        done["embeddings"] = time.monotonic()
        done["same"] = float(resp.json()["data"] == alone["data"])

    def health() -> None:
        while not stop.is_set():
            codes.append(httpx.get(f"{base}/health", timeout=30).status_code)
            stop.wait(0.2)

    threads = [threading.Thread(target=f) for f in (embeddings, stream, health)]
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join(timeout=300)
    stop.set()
    threads[2].join(timeout=60)
    during = [t for t in stamps if done["start"] < t < done["embeddings"]]
    assert len(during) >= 10
    assert done["same"] == 1.0
    assert codes and set(codes) == {200}
