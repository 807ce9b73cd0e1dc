"""The prompt cache is partitioned by API key and cache_salt (llmserve/tenancy.py), on the
real SmolLM2 through the official SDKs: one key's prompts never show up in another's
cached_tokens, in live slots, the cache tiers or /restore_cache; --share_prompt_cache opts
out of the key partition."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import SMOL, ServerProcess, require_model, started_server

pytestmark = pytest.mark.real_model

A, B = "sk-tenant-a-0123456789", "sk-tenant-b-0123456789"
SYSTEM = "You are a careful agent. " + " ".join(
    f"Rule {i}: use tool_{i} for questions about topic {i}." for i in range(12)
)


def _server(tmp: Path, name: str, *args: str) -> ServerProcess:
    require_model(SMOL)
    return started_server(tmp / f"{name}.log", "--model_name", SMOL, "--n_ctx", "2048",
                          "--n_threads", "2", "--cache_dir", str(tmp / f"{name}-cache"),
                          "--api_key", A, "--api_key", B, *args)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = _server(tmp_path_factory.mktemp("tenancy"), "keyed")
    try:
        yield server
    finally:
        server.stop()


def _sdk(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def cached(server: ServerProcess, key: str, question: str, **extra: Any) -> int:
    """cached_tokens of a chat request with SYSTEM and question, made with key."""
    with _sdk(server, key) as sdk:
        reply = sdk.chat.completions.create(
            model=SMOL, temperature=0, max_tokens=2, extra_body=extra or None,
            messages=[{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": question}],
        )
    assert reply.usage is not None and reply.usage.prompt_tokens > 150
    details = reply.usage.prompt_tokens_details
    return int(details.cached_tokens or 0) if details is not None else 0


def flush(server: ServerProcess, key: str) -> dict[str, Any]:
    """GET /cache: stores the idle slots' KV in the tiers first (deferred saves)."""
    r = httpx.get(f"{server.base_url}/cache", headers={"Authorization": f"Bearer {key}"},
                  timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_keys_do_not_see_each_others_prompts(keyed: ServerProcess) -> None:
    assert cached(keyed, A, "What is 2 plus 2?") == 0
    assert cached(keyed, A, "What is 2 plus 2?") > 150  # A's own: reused
    stats = flush(keyed, A)  # A's KV in the RAM and disk tiers now, and still in its slot
    assert stats["ram"]["entries"] > 0
    # B sends A's exact prompt: nothing of A's (slot, tiers) is reused or reported
    assert cached(keyed, B, "What is 2 plus 2?") == 0
    assert cached(keyed, B, "What is 2 plus 2?") > 150  # B's own: reused
    flush(keyed, B)
    assert cached(keyed, B, "What is 3 plus 3?") > 150  # B's system prompt, B's blocks
    assert cached(keyed, A, "What is 3 plus 3?") > 150  # A's too, from A's own entries


def test_cache_salt_partitions_within_a_key(keyed: ServerProcess) -> None:
    cached(keyed, A, "What is 5 plus 5?")  # A's unsalted entries exist
    flush(keyed, A)
    assert cached(keyed, A, "What is 5 plus 5?", cache_salt="tenant-1") == 0
    assert cached(keyed, A, "What is 5 plus 5?", cache_salt="tenant-1") > 150
    flush(keyed, A)
    assert cached(keyed, A, "What is 5 plus 5?", cache_salt="tenant-2") == 0
    assert cached(keyed, B, "What is 5 plus 5?", cache_salt="tenant-1") == 0  # other key


def test_restore_cache_warms_the_callers_partition(keyed: ServerProcess) -> None:
    # NOTE: a system prompt no other test sends: B's unsalted partition holds none of it
    system = "You warm caches. " + " ".join(f"Step {i}: check cache {i}." for i in range(20))
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": "What is 7 plus 7?"}]

    def restore(key: str, **extra: Any) -> dict[str, Any]:
        r = httpx.post(f"{keyed.base_url}/restore_cache", json={"messages": messages, **extra},
                       headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert r.status_code == 200, r.text
        return dict(r.json())

    warm = restore(B, cache_salt="w")
    assert warm["evaluated_tokens"] > 150
    assert restore(B, cache_salt="w", dry_run=True)["cached_tokens"] == warm["prompt_tokens"]
    assert restore(A, cache_salt="w", dry_run=True)["cached_tokens"] == 0
    assert restore(B, dry_run=True)["cached_tokens"] == 0  # B's unsalted partition: cold
    with _sdk(keyed, B) as sdk:
        reply = sdk.chat.completions.create(model=SMOL, messages=messages,  # type: ignore[arg-type]
                                            temperature=0, max_tokens=2,
                                            extra_body={"cache_salt": "w"})
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert (reply.usage.prompt_tokens_details.cached_tokens or 0) > 150


def test_messages_and_bad_salts(keyed: ServerProcess) -> None:
    def read(key: str) -> int:
        with anthropic.Anthropic(base_url=keyed.base_url, api_key=key, max_retries=0) as sdk:
            msg = sdk.messages.create(
                model=SMOL, max_tokens=2, system=SYSTEM + " Messages.",
                messages=[{"role": "user", "content": "Hello?"}],
                extra_body={"cache_salt": "m", "temperature": 0},
            )
        return msg.usage.cache_read_input_tokens or 0

    assert read(A) == 0
    assert read(A) > 150
    assert read(B) == 0
    with _sdk(keyed, A) as sdk:
        for bad in ("", "x" * 1025, 7):
            with pytest.raises(openai.BadRequestError) as err:
                sdk.chat.completions.create(model=SMOL, max_tokens=2,
                                            messages=[{"role": "user", "content": "hi"}],
                                            extra_body={"cache_salt": bad})
            assert "cache_salt" in str(err.value)


def test_share_prompt_cache_opts_out_of_the_key_partition(tmp_path: Path) -> None:
    server = _server(tmp_path, "shared", "--share_prompt_cache")
    try:
        assert cached(server, A, "What is 4 plus 4?") == 0
        assert cached(server, B, "What is 4 plus 4?") > 150  # A's live KV, shared
        assert cached(server, B, "What is 4 plus 4?", cache_salt="s") == 0  # salt still counts
    finally:
        server.stop()
