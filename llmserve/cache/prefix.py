"""Token blocks chained by hash: the key of a block names its whole prefix (vLLM's idea)."""

from __future__ import annotations

import hashlib
from array import array


def _digest(parent: str, tokens: list[int]) -> str:
    h = hashlib.blake2b(parent.encode(), digest_size=16)
    h.update(array("i", tokens).tobytes())
    return h.hexdigest()


def block_keys(root: str, tokens: list[int], block: int) -> list[str]:
    """Key of every full block of tokens; key i covers tokens[: (i + 1) * block]."""
    keys: list[str] = []
    parent = root
    for start in range(0, len(tokens) - block + 1, block):
        parent = _digest(parent, tokens[start : start + block])
        keys.append(parent)
    return keys


def tail_key(parent: str, tail: list[int]) -> str:
    """Key of a partial last block (a sequence end) after the block chain ending at parent."""
    return "t" + _digest(parent, tail)
