"""/tokenize, /detokenize, /v1/embeddings and /chat: HTTP logic on the fake engine.

llama.cpp behaviour (real tokenizers, pooled embeddings) is in test_ops_real.py.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import pytest

from tests.test_http import assert_error

pytestmark = pytest.mark.anyio


async def test_tokenize_detokenize_fake(fake_client: Any) -> None:
    async with fake_client() as client:
        tok = await client.post("/tokenize", json={"content": "héllo 世界"})
        text = await client.post("/detokenize", json={"tokens": tok.json()["tokens"]})
    assert tok.json() == {"tokens": [ord(c) for c in "héllo 世界"]}
    assert text.json() == {"content": "héllo 世界"}


async def test_curl_style_form_content_type_is_read_as_json(fake_client: Any) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    async with fake_client() as client:
        tok = await client.post("/tokenize", content=b'{"content": "ab"}', headers=form)
        chat = await client.post("/chat", content=b'{"prompt": "hi"}', headers=form)
    assert tok.json() == {"tokens": [97, 98]}
    assert chat.text == "Hello, world!\n"


@pytest.mark.parametrize(
    ("path", "content", "param"),
    [
        ("/tokenize", b"{oops", None),
        ("/tokenize", b'{"content": "\xff"}', None),
        ("/tokenize", b"{}", "content"),
        ("/tokenize", b'{"content": 5}', "content"),
        ("/tokenize", b'{"content": "\\ud800"}', "content"),
        ("/detokenize", b'{"tokens": "abc"}', "tokens"),
        ("/detokenize", b'{"tokens": [1, "2"]}', "tokens.1"),
        ("/detokenize", b'{"tokens": [1, 2.5]}', "tokens.1"),
        ("/detokenize", b'{"tokens": [-1]}', "tokens"),
        ("/detokenize", b'{"tokens": [99999999999]}', "tokens"),
        ("/chat", b'{"prompt": ""}', "prompt"),
        ("/chat", b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
        ("/chat", b'[]', None),
        ("/v1/embeddings", b'{"input": []}', "input"),
        ("/v1/embeddings", b'{"input": ""}', "input"),
        ("/v1/embeddings", b'{"input": ["a", ""]}', "input.1"),
        ("/v1/embeddings", b'{"input": [[]]}', "input"),
        ("/v1/embeddings", b'{"input": [[1], [-5]]}', "input.1"),
        ("/v1/embeddings", b'{"input": "a", "encoding_format": "hex"}', "encoding_format"),
        ("/v1/embeddings", b'{"input": "a", "dimensions": 3}', "dimensions"),
        ("/v1/embeddings", b'{"input": [1, "a"]}', "input"),
    ],
)
async def test_bad_bodies_are_400(
    fake_client: Any, path: str, content: bytes, param: str | None
) -> None:
    async with fake_client() as client:
        resp = await client.post(path, content=content,
                                 headers={"content-type": "application/json"})
        after = await client.post("/tokenize", json={"content": "ok"})
    err = assert_error(resp, 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    assert after.status_code == 200


async def test_unknown_model_is_404(fake_client: Any) -> None:
    async with fake_client() as client:
        tok = await client.post("/tokenize", json={"content": "x", "model": "nope"})
        emb = await client.post("/v1/embeddings", json={"input": "x", "model": "nope"})
        chat = await client.post("/chat", json={"prompt": "x", "model": "../x"})
    assert_error(tok, 404, "model_not_found")
    assert_error(emb, 404, "model_not_found")
    assert_error(chat, 400, "invalid_model_name")


async def test_embeddings_shapes_and_base64(fake_client: Any) -> None:
    inputs = ["abc", "hello there", [104, 105]]
    async with fake_client() as client:
        floats = await client.post("/v1/embeddings", json={"input": inputs[:2]})
        b64 = await client.post(
            "/v1/embeddings", json={"input": inputs[:2], "encoding_format": "base64"}
        )
        tokens = await client.post("/v1/embeddings", json={"input": [[104, 105], [97]]})
        one = await client.post("/v1/embeddings", json={"input": [104, 105]})
        single = await client.post("/v1/embeddings", json={"input": "hi", "model": "alpha"})
    body = floats.json()
    assert body["object"] == "list" and body["model"] == "alpha.gguf"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in body["data"])
    assert body["usage"] == {"prompt_tokens": 14, "total_tokens": 14}
    for d in body["data"]:
        assert math.isclose(math.sqrt(sum(x * x for x in d["embedding"])), 1.0, rel_tol=1e-6)
    decoded = [
        list(struct.unpack("<8f", base64.b64decode(d["embedding"]))) for d in b64.json()["data"]
    ]
    assert decoded == [d["embedding"] for d in body["data"]]
    assert len(tokens.json()["data"]) == 2 and tokens.json()["usage"]["prompt_tokens"] == 3
    assert one.json()["data"][0]["embedding"] == single.json()["data"][0]["embedding"]
    assert len(one.json()["data"]) == 1


async def test_plain_chat_streams_text(fake_client: Any) -> None:
    async with fake_client(script=["a"] * 10) as client:
        full = await client.post("/chat", json={"prompt": "hi"})
        short = await client.post("/chat", json={"prompt": "hi", "max_tokens": 3})
        too_long = await client.post("/chat", json={"prompt": "x" * 5000})
    assert full.status_code == 200
    assert full.headers["content-type"] == "text/plain; charset=utf-8"
    assert full.text == "a" * 10 + "\n"
    assert short.text == "aaa\n"
    assert_error(too_long, 400, "context_length_exceeded")
