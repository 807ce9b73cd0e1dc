"""logprobs / top_logprobs on chat and text completions: the openai SDK against `python
server.py` on SmolLM2, checked against log-softmax of llama-cpp-python's own logits."""

from __future__ import annotations

import math

import numpy as np
import openai
import pytest

from tests.conftest import MODELS_DIR, SMOL

pytestmark = pytest.mark.real_model

ASK = [{"role": "user", "content": "Name three colors of the rainbow."}]


def test_chat_logprobs_shape_and_greedy_choice(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SMOL, messages=ASK, temperature=0, max_tokens=24,  # type: ignore[arg-type]
        logprobs=True, top_logprobs=3,
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert reply.usage is not None and len(entries) == reply.usage.completion_tokens
    assert "".join(e.token for e in entries).startswith(choice.message.content or "\0")
    for e in entries:
        assert e.logprob <= 0
        assert bytes(e.bytes or []).decode("utf-8", errors="replace") == e.token
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert sum(math.exp(t) for t in tops) <= 1 + 1e-6
        # greedy: the token taken is the most likely one
        assert e.top_logprobs[0].token == e.token
        assert e.logprob == pytest.approx(tops[0], abs=1e-6)
    plain = client.chat.completions.create(
        model=SMOL, messages=ASK, temperature=0, max_tokens=8  # type: ignore[arg-type]
    )
    assert plain.choices[0].logprobs is None


def test_chat_stream_logprobs_match_non_stream(client: openai.OpenAI) -> None:
    kw = {"model": SMOL, "messages": ASK, "temperature": 0, "max_tokens": 20, "logprobs": True,
          "top_logprobs": 2}
    whole = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    streamed = [e for c in client.chat.completions.create(stream=True, **kw)  # type: ignore[call-overload]
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole.choices[0].logprobs.content]
    for a, b in zip(streamed, whole.choices[0].logprobs.content, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)


def test_completion_logprobs_equal_llama_cpp_log_softmax(client: openai.OpenAI) -> None:
    import llama_cpp

    prompt = "The capital of France is"
    out = client.completions.create(
        model=SMOL, prompt=prompt, temperature=0, max_tokens=6, logprobs=2, echo=True
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None and lp.text_offset[0] == len(prompt)
    assert out.choices[0].text == prompt + "".join(lp.tokens)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    # an independent computation: llama-cpp-python's Llama with every position's logits
    llm = llama_cpp.Llama(str(MODELS_DIR / SMOL), n_ctx=256, logits_all=True, flash_attn=True,
                          verbose=False)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        gen = llm.tokenize(out.choices[0].text[len(prompt):].encode(), add_bos=False,
                           special=False)
        llm.eval(ids + gen)
        logits = np.array(llm.scores[len(ids) - 1: len(ids) - 1 + len(gen)], dtype=np.float64)
    finally:
        llm.close()
    peak = logits.max(axis=1, keepdims=True)
    logsm = logits - peak - np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))
    expected = [float(logsm[i, t]) for i, t in enumerate(gen)]
    assert len(expected) == len(lp.token_logprobs)
    # NOTE: a batch of one prompt vs token-by-token decode differ in the last digits
    assert lp.token_logprobs == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("kw", [
    {"logprobs": True, "top_logprobs": 21},
    {"top_logprobs": 2},
    {"logprobs": True, "top_logprobs": -1},
])
def test_chat_logprobs_out_of_range_is_400(client: openai.OpenAI, kw: dict[str, object]) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=SMOL, messages=ASK, max_tokens=2,  # type: ignore[call-overload]
                                       **kw)


def test_completion_logprobs_out_of_range_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=SMOL, prompt="Hi", max_tokens=2, logprobs=21)
