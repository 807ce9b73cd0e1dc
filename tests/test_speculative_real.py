"""Speculative decoding on the real SmolLM2 through the official openai SDK: prompt lookup
(--draft ngram), Predicted Outputs and a draft model give the text plain decoding gives
(up to llama.cpp's batch-shape numerics on a near-tie, checked as such), with logprobs,
grammars, n > 1, cancellation and the usage and metric counts."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmserve.config import Settings
from llmserve.engine.llama import LlamaEngine
from llmserve.errors import ModelLoadError
from tests.conftest import GEMMA, MODELS_DIR, SMOL, ServerProcess, require_model, started_server

pytestmark = pytest.mark.real_model

CODE = '''def parse_config(path):
    """Read a config file of key=value lines."""
    config = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, value = line.split("=", 1)
            config[key.strip()] = value.strip()
    return config


def save_config(path, config):
    """Write a config dict as key=value lines."""
    with open(path, "w") as f:
        for key, value in sorted(config.items()):
            f.write(f"{key}={value}\\n")
'''
EDIT = [{"role": "system", "content": "You are a helpful coding assistant."},
        {"role": "user", "content": "Add type hints to this Python code. Reply with the full "
                                    f"code only.\n\n```python\n{CODE}```"}]
# NOTE: a near-tie: the two best tokens' log-probabilities this close may swap when the same
# position is evaluated in a batch of another shape (a draft's verification)
NEAR_TIE = 0.25


def _server(tmp: Path, name: str, *args: str) -> ServerProcess:
    require_model(SMOL)
    return started_server(tmp / f"{name}.log", "--model_name", SMOL, "--n_ctx", "4096",
                          "--n_threads", "2", "--cache_dir", str(tmp / f"{name}-cache"), *args)


@pytest.fixture(scope="module")
def ngram(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = _server(tmp_path_factory.mktemp("spec"), "ngram", "--draft", "ngram")
    try:
        yield server
    finally:
        server.stop()


def _sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


def _chat(server: ServerProcess, **kw: Any) -> Any:
    with _sdk(server) as sdk:
        kw.setdefault("temperature", 0)
        return sdk.chat.completions.create(model=SMOL, messages=EDIT,  # type: ignore[arg-type]
                                           **kw)


def _metric(server: ServerProcess, name: str, source: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    found = re.search(rf'^{name}_total{{source="{source}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def _tokens(reply: Any) -> list[Any]:
    return list(reply.choices[0].logprobs.content)


def assert_same_or_near_tie(plain: Any, drafted: Any) -> None:
    """drafted's text is plain's, or they part at a token where plain's two best were a
    near-tie (llama.cpp's numerics differ with the batch's shape)."""
    a, b = plain.choices[0].message.content, drafted.choices[0].message.content
    if a == b:
        return
    ta = [t.token for t in _tokens(plain)]
    tb = [t.token for t in _tokens(drafted)]
    i = next(i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y)
    top = _tokens(plain)[i].top_logprobs
    gap = top[0].logprob - top[1].logprob
    assert gap < NEAR_TIE, f"drafting changed token {i} ({ta[i]!r} -> {tb[i]!r}), gap {gap}"


def test_prompt_lookup_keeps_greedy_text(ngram: ServerProcess) -> None:
    before = _metric(ngram, "llmserve_draft_tokens_accepted", "ngram")
    plain = _chat(ngram, max_tokens=120, logprobs=True, top_logprobs=2,
                  extra_body={"draft_max": 0})
    assert _metric(ngram, "llmserve_draft_tokens_accepted", "ngram") == before  # opted out
    drafted = _chat(ngram, max_tokens=120, logprobs=True, top_logprobs=2,
                    extra_body={"draft_min": 3})
    assert "def parse_config" in plain.choices[0].message.content
    assert_same_or_near_tie(plain, drafted)
    # the model copies the file it was given: prompt lookup drafts and most is accepted
    assert _metric(ngram, "llmserve_draft_tokens_accepted", "ngram") > before + 30
    assert _metric(ngram, "llmserve_draft_tokens_proposed", "ngram") >= \
        _metric(ngram, "llmserve_draft_tokens_accepted", "ngram")
    # logprobs: one per completion token, drafted or not; greedy picks the top one
    tokens = _tokens(drafted)
    assert drafted.usage is not None and len(tokens) == drafted.usage.completion_tokens
    for t in tokens:
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-6)
    details = drafted.usage.completion_tokens_details
    assert details is not None
    assert details.accepted_prediction_tokens == 0 and details.rejected_prediction_tokens == 0


def test_predicted_outputs(ngram: ServerProcess) -> None:
    plain = _chat(ngram, max_tokens=100, logprobs=True, top_logprobs=2,
                  extra_body={"draft_max": 0})
    prediction = {"type": "content", "content": f"```python\n{CODE}```"}
    # NOTE: draft_min: drafts this long are verified whatever the step cost model says
    # (it follows measured step times, which a loaded machine makes erratic)
    drafted = _chat(ngram, max_tokens=100, logprobs=True, top_logprobs=2,
                    prediction=prediction, extra_body={"draft_min": 4})  # type: ignore[arg-type]
    assert_same_or_near_tie(plain, drafted)
    assert drafted.usage is not None
    details = drafted.usage.completion_tokens_details
    assert details is not None and details.accepted_prediction_tokens is not None
    assert details.accepted_prediction_tokens > 30
    assert details.rejected_prediction_tokens is not None
    assert details.rejected_prediction_tokens >= 0
    assert details.accepted_prediction_tokens <= drafted.usage.completion_tokens
    # streamed, the final usage chunk carries the counts too (how many depends on how the
    # drafts were sized, which follows measured step times)
    with _sdk(ngram) as sdk:
        stream = sdk.chat.completions.create(
            model=SMOL, messages=EDIT, temperature=0, max_tokens=100,  # type: ignore[arg-type]
            prediction=prediction, stream=True, extra_body={"draft_min": 4},  # type: ignore[arg-type]
            stream_options={"include_usage": True})
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens_details is not None
    streamed = usage.completion_tokens_details
    assert streamed.accepted_prediction_tokens is not None
    assert streamed.accepted_prediction_tokens > 30
    assert text == drafted.choices[0].message.content


def test_prediction_under_a_json_schema(ngram: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    before = _metric(ngram, "llmserve_draft_tokens_proposed", "prediction")
    with _sdk(ngram) as sdk:
        reply = sdk.chat.completions.create(
            model=SMOL, temperature=0, max_tokens=60,
            messages=[{"role": "user", "content": "Give a person as JSON: name and age."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": schema}},
            # NOTE: "age" as a string breaks the schema: the grammar cuts that draft short
            prediction={"type": "content", "content": '{"name": "Ann", "age": "forty"}'})
    data = json.loads(reply.choices[0].message.content or "")
    assert set(data) == {"name", "age"} and isinstance(data["age"], int)
    assert _metric(ngram, "llmserve_draft_tokens_proposed", "prediction") > before


def test_n_choices_sampled_and_cancelled_streams(ngram: ServerProcess) -> None:
    reply = _chat(ngram, max_tokens=40, n=2, temperature=0.8, seed=7)
    assert len(reply.choices) == 2
    assert reply.usage is not None and reply.usage.completion_tokens > 2
    # a client that leaves mid-stream ends its request; the server keeps serving
    with httpx.stream("POST", f"{ngram.base_url}/v1/chat/completions", timeout=60, json={
            "model": SMOL, "messages": EDIT, "temperature": 0, "max_tokens": 200,
            "stream": True}) as resp:
        for i, _line in enumerate(resp.iter_lines()):
            if i > 5:
                break
    again = _chat(ngram, max_tokens=8)
    assert again.choices[0].message.content


def test_bad_draft_fields_are_400s(ngram: ServerProcess) -> None:
    for body in ({"draft_max": -1}, {"draft_max": 65}, {"draft_min": "x"},
                 {"prediction": {"type": "other", "content": "x"}},
                 {"prediction": {"type": "content"}}):
        resp = httpx.post(f"{ngram.base_url}/v1/chat/completions", timeout=30, json={
            "model": SMOL, "messages": EDIT, "max_tokens": 2, **body})
        assert resp.status_code == 400, body
        assert resp.json()["error"]["type"] == "invalid_request_error"


def test_draft_model_keeps_greedy_text(tmp_path: Path) -> None:
    """SmolLM2 drafting for itself (the same vocabulary): the mechanics, not a speed-up."""
    server = _server(tmp_path, "model", "--draft_model", SMOL)
    try:
        plain = _chat(server, max_tokens=60, logprobs=True, top_logprobs=2,
                      extra_body={"draft_max": 0})
        drafted = _chat(server, max_tokens=60, logprobs=True, top_logprobs=2,
                        extra_body={"draft_min": 3})
        assert_same_or_near_tie(plain, drafted)
        assert _metric(server, "llmserve_draft_tokens_accepted", "model") > 10
    finally:
        server.stop()


def test_a_draft_model_of_another_vocab_is_refused() -> None:
    require_model(SMOL)
    gemma = require_model(GEMMA)
    settings = Settings(n_ctx=512, n_threads=1, parallel=1, draft_model=str(gemma))
    with pytest.raises(ModelLoadError) as err:
        LlamaEngine.load(MODELS_DIR / SMOL, settings)
    assert "vocab" in err.value.message
    assert GEMMA in err.value.message and SMOL in err.value.message
