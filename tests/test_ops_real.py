"""Issue 6 on the real SmolLM2 server: tokenize, embeddings, /chat, metrics, API keys."""

from __future__ import annotations

import ast
import base64
import contextlib
import math
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import MODELS_DIR, ROOT, SMOL, ServerProcess, free_port, require_model
from tests.test_metrics import value

pytestmark = pytest.mark.real_model

TEXTS = [
    "Hello, world!",
    "你好，世界。日本語のテキストと한국어",  # noqa: RUF001
    "🎉 party 👨‍👩‍👧 family 🇯🇵 flag 🚀",
    "café – naïve – “quotes” – ½ – \t tabs\nnew line",  # noqa: RUF001
]


def post(server: ServerProcess, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_round_trip(smol_server: ServerProcess, text: str) -> None:
    tokens = post(smol_server, "/tokenize", {"content": text}).json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    back = post(smol_server, "/detokenize", {"tokens": tokens}).json()["content"]
    assert back == text


def test_split_utf8_tokens_join_exactly(smol_server: ServerProcess) -> None:
    text = "🎉🚀"
    tokens = post(smol_server, "/tokenize", {"content": text}).json()["tokens"]
    singles = [post(smol_server, "/detokenize", {"tokens": [t]}).json()["content"]
               for t in tokens]
    # SmolLM2's byte-level BPE splits these emoji across tokens: one alone is not UTF-8 ...
    assert any("\ufffd" in s for s in singles)
    # ... but the list is turned into bytes first, then decoded, so the whole is exact.
    assert post(smol_server, "/detokenize", {"tokens": tokens}).json()["content"] == text


def test_tokenize_with_pieces(smol_server: ServerProcess) -> None:
    text = "<|im_start|>Hi 🎉🚀"
    plain = post(smol_server, "/tokenize", {"content": text}).json()["tokens"]
    items = post(smol_server, "/tokenize", {"content": text, "with_pieces": True}).json()["tokens"]
    assert [t["id"] for t in items] == plain and all(set(t) == {"id", "piece"} for t in items)
    assert items[0]["piece"] == "<|im_start|>"  # special tokens as their text, as llama-server
    # split UTF-8 pieces come as byte lists; joined, every piece gives the text back
    assert any(isinstance(t["piece"], list) for t in items)
    joined = b"".join(bytes(t["piece"]) if isinstance(t["piece"], list)
                      else t["piece"].encode() for t in items)
    assert joined.decode("utf-8") == text


def test_special_tokens(smol_server: ServerProcess) -> None:
    parsed = post(smol_server, "/tokenize", {"content": "<|im_start|>"}).json()["tokens"]
    literal = post(smol_server, "/tokenize",
                   {"content": "<|im_start|>", "parse_special": False}).json()["tokens"]
    assert len(parsed) == 1 and len(literal) > 1
    assert post(smol_server, "/detokenize", {"tokens": parsed}).json()["content"] == "<|im_start|>"
    bad = post(smol_server, "/detokenize", {"tokens": [49152]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_embeddings_shapes_base64_and_tokens(
    client: openai.OpenAI, smol_server: ServerProcess
) -> None:
    inputs = ["The cat sat on the mat.", "Stock markets fell sharply today.",
              "The cat sat on the mat."]
    sdk = client.embeddings.create(model=SMOL, input=inputs)  # the SDK asks for base64
    raw = post(smol_server, "/v1/embeddings",
               {"model": SMOL, "input": inputs, "encoding_format": "float"}).json()
    b64 = post(smol_server, "/v1/embeddings",
               {"model": SMOL, "input": inputs, "encoding_format": "base64"}).json()
    floats = [d["embedding"] for d in raw["data"]]
    assert len(sdk.data) == 3 and [d.index for d in sdk.data] == [0, 1, 2]
    assert all(len(v) == 576 for v in floats)  # SmolLM2-135M's hidden size
    assert [d.embedding for d in sdk.data] == floats
    decoded = [list(struct.unpack("<576f", base64.b64decode(d["embedding"])))
               for d in b64["data"]]
    assert decoded == floats
    assert all(math.isclose(_norm(v), 1.0, rel_tol=1e-5) for v in floats)
    assert floats[0] == floats[2] and floats[0] != floats[1]
    counts = [len(post(smol_server, "/tokenize", {"content": t, "add_special": True})
                  .json()["tokens"]) for t in inputs]
    assert raw["usage"] == {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
    tokens = post(smol_server, "/tokenize",
                  {"content": inputs[1], "add_special": True}).json()["tokens"]
    by_tokens = post(smol_server, "/v1/embeddings", {"model": SMOL, "input": tokens}).json()
    assert by_tokens["data"][0]["embedding"] == floats[1]
    too_long = post(smol_server, "/v1/embeddings", {"model": SMOL, "input": "word " * 3000})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    assert too_long.json()["error"]["n_ctx"] == 2048
    assert too_long.json()["error"]["n_prompt_tokens"] > 2048


def test_chat_is_unchanged_by_embeddings(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Name two fruits."}]

    def chat() -> str:
        r = client.chat.completions.create(
            model=SMOL, messages=ask, temperature=0, max_tokens=24  # type: ignore[arg-type]
        )
        return r.choices[0].message.content or ""

    before = chat()
    client.embeddings.create(model=SMOL, input="an interleaved embedding request")
    assert chat() == before and before


def test_plain_chat_streams_the_chat_reply(
    client: openai.OpenAI, smol_server: ServerProcess
) -> None:
    prompt = "Write a short sentence about the sea."
    expected = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": prompt}], temperature=0,
        max_tokens=48,
    ).choices[0].message.content
    chunks: list[bytes] = []
    with httpx.stream("POST", f"{smol_server.base_url}/chat", timeout=60,
                      content=f'{{"prompt": "{prompt}", "max_tokens": 48, "temperature": 0}}',
                      headers={"content-type": "application/x-www-form-urlencoded"}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        chunks.extend(resp.iter_raw())
    assert b"".join(chunks).decode() == f"{expected}\n"
    # NOTE: 48 tokens are sent in several pieces as they are generated, not at the end.
    assert len(chunks) > 1


def test_metrics_follow_real_requests(client: openai.OpenAI, smol_server: ServerProcess) -> None:
    before = httpx.get(f"{smol_server.base_url}/metrics").text
    r = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Say hi."}], temperature=0,
        max_tokens=16,
    )
    client.embeddings.create(model=SMOL, input="hello")
    after = httpx.get(f"{smol_server.base_url}/metrics").text
    assert r.usage is not None
    m = {"model": SMOL}
    for name, grew_by in [
        ("llmserve_prompt_tokens_total", r.usage.prompt_tokens),
        ("llmserve_completion_tokens_total", r.usage.completion_tokens),
        ("llmserve_time_to_first_token_seconds_count", 1),
    ]:
        assert value(after, name, **m) - value(before, name, **m) == grew_by, name
    route = {"route": "/v1/chat/completions", "status": "200"}
    assert value(after, "llmserve_requests_total", **route) == (
        value(before, "llmserve_requests_total", **route) + 1
    )
    assert value(after, "llmserve_embedding_tokens_total", **m) > value(
        before, "llmserve_embedding_tokens_total", **m)
    assert value(after, "llmserve_model_loaded", model=SMOL, mode="chat") == 1
    assert value(after, "llmserve_model_loaded", model=SMOL, mode="embedding") == 1
    assert value(after, "llmserve_model_load_seconds", **m) > 0


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    require_model(SMOL)
    d: Path = tmp_path_factory.mktemp("keyed")
    (d / "keys").write_text("file-key\n")
    server = ServerProcess(d / "server.log", "--model_name", SMOL, "--n_ctx", "2048",
                           "--n_threads", "2", "--api_key", "flag-key-1", "--api-key",
                           "flag-key-2", "--api_key_file", str(d / "keys"), "--no_announce")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_sdk_with_api_keys(keyed_server: ServerProcess) -> None:
    url = f"{keyed_server.base_url}/v1"
    for key in ("flag-key-1", "flag-key-2", "file-key"):
        with openai.OpenAI(base_url=url, api_key=key, max_retries=0) as ok:
            assert ok.models.list().data[0].id == SMOL
            reply = ok.chat.completions.create(
                model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
            )
            assert reply.choices[0].message.content is not None
    with (
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        bad.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Hi"}])
    assert info.value.status_code == 401
    assert info.value.body["type"] == "authentication_error"  # type: ignore[index]
    assert httpx.get(f"{keyed_server.base_url}/health").status_code == 200
    assert httpx.get(f"{keyed_server.base_url}/metrics").status_code == 401
    assert "announce" not in keyed_server.log()


def test_uvicorn_serves_the_module_app(tmp_path: Path) -> None:
    require_model(SMOL)
    port = free_port()
    env = {**os.environ, "LLMSERVE_MODEL_NAME": SMOL, "LLMSERVE_MODELS_DIR": str(MODELS_DIR),
           "LLMSERVE_N_CTX": "2048", "LLMSERVE_N_THREADS": "2", "LLMSERVE_NO_ANNOUNCE": "1",
           "LLMSERVE_API_KEY": "env-key-1,env-key-2"}
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "uvicorn.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "llmserve.http.app:app", "--host", "127.0.0.1",
             "--port", str(port)], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                time.sleep(0.2)
            assert httpx.get(f"{base}/health").json()["model"] == SMOL
            assert httpx.get(f"{base}/v1/models").status_code == 401
            keyed = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer env-key-2"})
            assert keyed.json()["data"][0]["id"] == SMOL
        finally:
            proc.terminate()
            proc.wait(timeout=30)


EMBEDDED = """
import asyncio, sys
import httpx
from llmserve import Config, create_app

async def main() -> None:
    app = create_app(Config(model_name=sys.argv[1], models_dir=sys.argv[2], n_ctx=512,
                            n_threads=2, no_announce=True))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            while (await client.get("/health")).status_code != 200:
                await asyncio.sleep(0.05)
            tokens = (await client.post("/tokenize", json={"content": sys.argv[3]})).json()
            text = (await client.post("/detokenize", json=tokens)).json()["content"]
    sys.stdout.write(repr((len(tokens["tokens"]), text)))

asyncio.run(main())
"""


def test_python_api_embeds_the_app() -> None:
    require_model(SMOL)
    # NOTE: a subprocess, so llama.cpp's own stdout/stderr juggling stays out of pytest.
    proc = subprocess.run(
        [sys.executable, "-c", EMBEDDED, SMOL, str(MODELS_DIR), "你好 🎉"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    count, text = ast.literal_eval(proc.stdout)
    assert count > 2 and text == "你好 🎉"
