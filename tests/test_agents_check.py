"""How `make agents-check` (tests/agents_check.py) reads the CLIs' output, on lines the real
Claude Code 2.1.332 printed against llmserve (trimmed to the fields the check reads)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from tests.agents_check import (
    claude_only_the_model_limit,
    claude_result,
    only_the_model_limit,
)

NOTICE = '[claude-code:unrecognized_model] {"model":"gemma-3-270m-q4_k_m.gguf",' \
    '"query_source":"sdk"}\n'
LIMIT = ("API Error: Claude's response exceeded the 1024 output token maximum. To configure "
         "this behavior, set the CLAUDE_CODE_MAX_OUTPUT_TOKENS environment variable.")


def result_line(**fields: Any) -> str:
    base = {"type": "result", "subtype": "success", "is_error": False, "num_turns": 1,
            "stop_reason": "end_turn", "terminal_reason": "completed", "api_error_status": None,
            "result": "It prints hello.",
            "usage": {"input_tokens": 3, "cache_read_input_tokens": 0, "output_tokens": 9}}
    return json.dumps({**base, **fields})


def stream(*lines: str) -> str:
    """A stream-json transcript: init, the assistant's message, then the given lines."""
    return "\n".join([json.dumps({"type": "system", "subtype": "init"}),
                      json.dumps({"type": "assistant", "message": {"content": []}}),
                      *lines]) + "\n"


def test_a_run_that_ended_at_the_output_limit_is_the_models() -> None:
    # What Claude Code ends with after four answers that all stopped at "max_tokens" (exit 1).
    out = stream(result_line(is_error=True, num_turns=4, stop_reason="stop_sequence",
                             terminal_reason="api_error", api_error="max_output_tokens",
                             result=LIMIT))
    assert claude_only_the_model_limit(out)
    assert "max_output_tokens" in (claude_result(out) or "")


def test_the_context_window_variant_and_http_errors_are_not_excused() -> None:
    window = result_line(is_error=True, api_error="max_output_tokens", terminal_reason="api_error",
                         result="API Error: The model has reached its context window limit.")
    refused = result_line(is_error=True, api_error_status=400, terminal_reason="api_error",
                          result="API Error: 400 prompt is too long")
    for out in (stream(window), stream(refused), "", NOTICE, stream()):
        assert not claude_only_the_model_limit(out)
    assert claude_result(stream(refused)) is not None


def test_a_finished_run_passes_and_the_notice_is_not_json() -> None:
    out = stream(result_line())
    assert claude_result(out) is None
    assert not claude_only_the_model_limit(out)
    assert claude_result(NOTICE) == "no JSON output"


def test_codex_limit_errors() -> None:
    limit = json.dumps({"type": "turn.failed", "error": {
        "message": "Incomplete response returned, reason: max_output_tokens"}})
    other = json.dumps({"type": "error", "message": "unexpected status 400 Bad Request"})
    done = subprocess.CompletedProcess(["codex"], 1, limit + "\n", "")
    assert only_the_model_limit(done)
    both = subprocess.CompletedProcess(["codex"], 1, limit + "\n" + other + "\n", "")
    assert not only_the_model_limit(both)
