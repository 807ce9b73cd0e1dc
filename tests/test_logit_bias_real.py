"""logit_bias in the per-sequence sampler chain, on the real SmolLM2 through `python server.py`:
a banned token never comes out, a +100 one always does, the grammar gate still wins."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import SMOL, ServerProcess
from tests.test_http import assert_error

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"
COLOURS = 'root ::= "red" | "blue" | "green"'
N_VOCAB = 49152  # SmolLM2's


def token(server: ServerProcess, text: str) -> int:
    [tok] = httpx.post(f"{server.base_url}/tokenize", json={"content": text}).json()["tokens"]
    return int(tok)


def complete(client: openai.OpenAI, prompt: str = PROMPT, **kw: Any) -> str:
    kw.setdefault("temperature", 0)
    reply = client.completions.create(model=SMOL, prompt=prompt, **kw)
    return reply.choices[0].text


def test_banned_first_token_never_comes(client: openai.OpenAI,
                                        smol_server: ServerProcess) -> None:
    first = complete(client, max_tokens=1)
    banned = token(smol_server, first)
    plain = complete(client, max_tokens=12)
    assert plain.startswith(first)
    biased = complete(client, max_tokens=12, logit_bias={str(banned): -100})
    assert biased != plain and not biased.startswith(first)
    assert first not in biased  # the token's text, so the token itself, never appears
    chat = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": f"Finish: {PROMPT}"}],
        temperature=0, max_tokens=12, logit_bias={str(banned): -100})
    assert first not in (chat.choices[0].message.content or "")


@pytest.mark.parametrize("temperature", [0, 1])
def test_plus_100_comes_out(client: openai.OpenAI, smol_server: ServerProcess,
                            temperature: float) -> None:
    banana = token(smol_server, " banana")
    text = complete(client, max_tokens=3, temperature=temperature, seed=7,
                    logit_bias={str(banana): 100})
    assert text == " banana" * 3


def test_grammar_gate_with_biases(client: openai.OpenAI, smol_server: ServerProcess) -> None:
    prompt = "My favourite colour is"
    greedy = complete(client, prompt, max_tokens=5, extra_body={"grammar": COLOURS})
    assert greedy in ("red", "blue", "green")
    # the grammar's greedy pick banned: another alternative (or spelling) still matches it
    banned = complete(client, prompt, max_tokens=5, extra_body={"grammar": COLOURS},
                      logit_bias={str(token(smol_server, greedy)): -100})
    assert banned in ("red", "blue", "green")
    other = "green" if greedy != "green" else "red"
    pushed = complete(client, prompt, max_tokens=5, extra_body={"grammar": COLOURS},
                      logit_bias={str(token(smol_server, other)): 100})
    assert pushed == other
    # a +100 token the grammar rejects is masked out; a grammar forcing a banned token wins
    masked = complete(client, prompt, max_tokens=5, extra_body={"grammar": COLOURS},
                      logit_bias={str(token(smol_server, " banana")): 100})
    assert masked == greedy
    forced = complete(client, prompt, max_tokens=5, extra_body={"grammar": f'root ::= "{greedy}"'},
                      logit_bias={str(token(smol_server, greedy)): -100})
    assert forced == greedy


@pytest.mark.parametrize("bias", [{str(N_VOCAB): 1}, {"1": 100.5}, {"x": 1}])
def test_out_of_range_is_400(smol_server: ServerProcess, bias: dict[str, Any]) -> None:
    for path, body in (("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        resp = httpx.post(f"{smol_server.base_url}{path}",
                          json={**body, "max_tokens": 2, "logit_bias": bias}, timeout=60)
        assert assert_error(resp, 400)["param"] == "logit_bias"
    ok = httpx.post(f"{smol_server.base_url}/v1/completions", timeout=60,
                    json={"prompt": PROMPT, "max_tokens": 1, "logit_bias": {str(N_VOCAB - 1): 1}})
    assert ok.status_code == 200
