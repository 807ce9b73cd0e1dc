"""System messages after the first one, for templates that refuse them.

Agents put system entries mid-conversation (Claude Code adds one after the first user message).
Many GGUF templates `raise_exception` on a system message that is not the first one; for those,
`merge_system_turns` folds each such message into a user-side turn next to it. The rule looks
only backwards where it can (append to the nearest user or tool message before it: a tool
result is where Claude Code itself puts its reminders), so what an agent appends later never
changes how earlier turns render and the prompt prefix stays cacheable across turns; a system
message with no user message before it is prepended to the next user message.
"""

from __future__ import annotations

from typing import Any

SEPARATOR = "\n\n"


def has_late_system(messages: list[dict[str, Any]]) -> bool:
    """Whether a system message stands anywhere but first."""
    return any(m["role"] == "system" for m in messages[1:])


def merge_system_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """messages with every system message but a leading one merged into a user turn."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []  # system texts waiting for the first user message
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            text = m["content"]
            last_user = next((j for j in range(len(out) - 1, -1, -1)
                              if out[j]["role"] in ("user", "tool")), None)
            if last_user is not None:
                before = out[last_user]
                out[last_user] = {**before, "content": _join(before["content"], text)}
            else:
                pending.append(text)
            continue
        if pending and m["role"] == "user":
            m = {**m, "content": _join(*pending, m["content"])}
            pending = []
        out.append(m)
    if pending:  # no user message at all: the system texts become one
        out.append({"role": "user", "content": _join(*pending)})
    return out


def _join(*texts: str) -> str:
    return SEPARATOR.join(t for t in texts if t)
